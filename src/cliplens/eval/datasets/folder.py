"""Reader of ``DIR/images/NAME.ext`` with ``DIR/masks/NAME.png`` or ``DIR/masks/NAME__a_label.png``.

The conventions every reader follows: :mod:`cliplens.eval.datasets`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .base import IMAGE_SUFFIXES, EvalDataset, EvalItem, fail, open_rgb, read_mask, require_dir

__all__ = ["read_folder"]


def read_folder(path, *, limit: int | None = None) -> EvalDataset:
    """A folder of images and mask PNGs, the simplest way to bring your own data.

    ::

        PATH/images/NAME.png | NAME.jpg | NAME.jpeg
        PATH/masks/NAME.png              one mask, label "object"
        PATH/masks/NAME__red_car.png     one mask per label: the text after "__", with
                                         underscores read as spaces ("red car")

    A mask is ``value != 0``; it must have its image's size. Image names may not contain
    ``"__"`` (it separates the label) and may not repeat with another suffix. Images without
    a mask are yielded with no labels. Order: image name; labels: mask file name order, the
    plain ``NAME.png`` first.
    """
    kind = "folder"
    root = Path(path)
    require_dir(kind, root)
    img_dir, mask_dir = root / "images", root / "masks"
    require_dir(kind, img_dir, "image folder")
    require_dir(kind, mask_dir, "mask folder")
    stems: dict[str, Path] = {}
    for q in sorted(img_dir.iterdir()):
        if not q.is_file() or q.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if "__" in q.stem:
            raise fail(kind, f"image name {q.name!r} contains '__', which separates mask labels")
        if q.stem in stems:
            raise fail(kind, f"two images named {q.stem!r}: {stems[q.stem].name} and {q.name}")
        stems[q.stem] = q
    mask_files: dict[str, list[tuple[str, Path]]] = {}
    for q in sorted(mask_dir.iterdir()):
        if not q.is_file() or q.suffix.lower() != ".png":
            continue
        stem, sep, raw = q.stem.partition("__")
        if stem not in stems:
            raise fail(kind, f"mask {q.name} has no image {stem}.(png|jpg|jpeg) in {img_dir}")
        label = raw.replace("_", " ").strip() if sep else "object"
        if not label:
            raise fail(kind, f"mask {q.name} has an empty label after '__'")
        mask_files.setdefault(stem, []).append((label, q))

    def items() -> Iterator[EvalItem]:
        for stem, image_path in stems.items():
            image = open_rgb(kind, image_path)
            entries = sorted(mask_files.get(stem, []), key=lambda e: (e[1].stem != stem, e[1].name))
            masks: dict[str, np.ndarray] = {}
            for label, mp in entries:
                if label in masks:
                    raise fail(kind, f"two masks of {stem} have the label {label!r}")
                masks[label] = read_mask(kind, mp, image.size)
            yield EvalItem(
                id=stem,
                image=image,
                masks=masks,
                points=None,
                labels=list(masks),
                extra={"file": str(image_path)},
            )

    return EvalDataset(kind, root, items, limit=limit, size=len(stems))
