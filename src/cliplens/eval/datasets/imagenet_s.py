"""Reader of ImageNet-S (``validation/<wnid>/`` images, ``validation-segmentation/<wnid>/`` class-id PNGs).

The conventions every reader follows: :mod:`cliplens.eval.datasets`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import EvalDataset, EvalItem, fail, find_image, open_rgb, require_dir, require_file

__all__ = ["read_imagenet_s"]


_WNID = re.compile(r"^n\d{8}$")


def _read_class_list(kind: str, path: Path) -> list[str]:
    """One class per line, line k (1-based) = class id k: ``wnid``, ``wnid name`` or ``name``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise fail(kind, f"cannot read class list {path}: {e}") from None
    names = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        head, _, rest = text.partition(" ")
        if _WNID.match(head) and rest.strip():
            text = rest.strip()
        elif "," in text and _WNID.match(text.split(",", 1)[0].strip()):
            text = text.split(",", 1)[1].strip() or text.split(",", 1)[0].strip()
        names.append(text)
    return names


def read_imagenet_s(
    path,
    *,
    limit: int | None = None,
    split: str = "validation",
    class_names: str | Path | None = None,
) -> EvalDataset:
    """ImageNet-S (Gao et al., LUSSeg): semantic masks for ImageNet images.

    Layout: ``PATH/<split>/<wnid>/<name>.JPEG`` and ``PATH/<split>-segmentation/<wnid>/<name>.png``
    (``split`` is ``"validation"`` by default). A segmentation PNG stores the class id as
    ``R + 256 * G``; 0 is "other" (background) and 1000 "ignore". Each class id present becomes
    one mask; the ignore pixels go to ``extra["ignore"]`` (set the map to NaN there and the
    metrics leave them out). Labels come from a class list, line k
    = id k (``class_names``, or ``classes.txt`` / ``categories.txt`` / one ``*categories*.txt``
    in PATH; lines ``wnid``, ``wnid name`` or ``name``); without one the label is ``"class_<id>"``.
    Order: segmentation files sorted by relative path.
    """
    kind = "imagenet-s"
    root = Path(path)
    require_dir(kind, root)
    img_dir, seg_dir = root / split, root / f"{split}-segmentation"
    require_dir(kind, img_dir, "image folder")
    require_dir(kind, seg_dir, "segmentation folder")
    names: list[str] | None = None
    if class_names is not None:
        cp = Path(class_names)
        require_file(kind, cp, "class list")
        names = _read_class_list(kind, cp)
    else:
        found = [root / n for n in ("classes.txt", "categories.txt") if (root / n).is_file()]
        if not found:
            found = sorted(q for q in root.glob("*categories*.txt") if q.is_file())
        if len(found) > 1:
            raise fail(
                kind, f"several class lists in {root} ({', '.join(q.name for q in found)}): pass class_names="
            )
        if found:
            names = _read_class_list(kind, found[0])
    segs = sorted(seg_dir.rglob("*.png"), key=lambda q: q.relative_to(seg_dir).as_posix())

    def label_of(cid: int, seg: Path) -> str:
        if names is None:
            return f"class_{cid}"
        if not 1 <= cid <= len(names):
            raise fail(kind, f"{seg} has class id {cid}, the class list has {len(names)} classes")
        return names[cid - 1]

    def items() -> Iterator[EvalItem]:
        for seg in segs:
            rel = seg.relative_to(seg_dir)
            image_path = find_image(img_dir / rel.parent, seg.stem, (".JPEG", ".jpg", ".jpeg", ".png"))
            if image_path is None:
                raise fail(kind, f"no image for {seg} in {img_dir / rel.parent}")
            image = open_rgb(kind, image_path)
            try:
                with Image.open(seg) as im:
                    im.load()
                    rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise fail(kind, f"cannot read segmentation {seg}: {e}") from None
            ids = rgb[..., 0] + 256 * rgb[..., 1]
            if (ids.shape[1], ids.shape[0]) != image.size:
                got, want = f"{ids.shape[1]}x{ids.shape[0]}", "{}x{}".format(*image.size)
                raise fail(kind, f"segmentation {seg} is {got}, its image is {want}")
            class_ids = [int(c) for c in np.unique(ids) if c not in (0, 1000)]
            masks: dict[str, np.ndarray] = {}
            for cid in class_ids:
                label = label_of(cid, seg)
                masks[label] = masks[label] | (ids == cid) if label in masks else ids == cid
            yield EvalItem(
                id=rel.with_suffix("").as_posix(),
                image=image,
                masks=masks,
                points=None,
                labels=list(masks),
                extra={"class_ids": class_ids, "ignore": ids == 1000, "wnid": rel.parent.name or None},
            )

    return EvalDataset(kind, root, items, limit=limit, size=len(segs))
