"""Readers for evaluation datasets: one item type, lazily read, deterministic order.

Every reader yields :class:`EvalItem` objects and is reached through
``open_dataset("KIND:PATH")``:

============================  =================================================================
``imagenet-seg:FILE.mat``     ImageNet-Segmentation (``gtsegs_ijcv.mat``, MATLAB v7.3 = HDF5;
                              needs ``h5py``, the ``eval`` extra). One foreground mask per image,
                              label ``"object"`` (the class is not in the file).
``imagenet-s:DIR``            ImageNet-S (``DIR/validation/<wnid>/<name>.JPEG`` and
                              ``DIR/validation-segmentation/<wnid>/<name>.png``; class id
                              ``R + 256 * G``, 0 = other, 1000 = ignore).
``openimages-points:PATH``    OpenImages V7 point labels (``*point-labels*.csv``), display names
                              from ``*class-descriptions*.csv``, images ``images/<ImageId>.jpg``.
``coco:FILE.json``            COCO instance annotations (polygons and RLE decoded here, without
                              pycocotools), masks merged per category name.
``folder:DIR``                ``DIR/images/NAME.(png|jpg|jpeg)`` with ``DIR/masks/NAME.png``
                              (label ``"object"``) and/or ``DIR/masks/NAME__a_label.png`` (label
                              ``"a label"``).
``shapes:DIR``                the cliplens shapes world (:mod:`cliplens.worlds.shapes`).
============================  =================================================================

Conventions:

- Images are RGB PIL images in their stored pixel orientation (EXIF orientation is *not*
  applied: the annotations index the stored pixels).
- Masks are boolean (H, W) numpy arrays at the image's size. A mask PNG is read as
  ``value != 0`` (any channel for colour PNGs).
- Points are float64 (N, 2) arrays of (x, y) pixel coordinates on the image.
- Order is deterministic (sorted ids or file order, stated per reader); ``limit`` keeps the
  first ``limit`` items of that order. Items are decoded one at a time, when iterated.
- Missing or corrupt files, unknown kinds and malformed annotations raise
  :class:`DatasetError` with a one-line message; paths are checked when the dataset is
  opened, item files when the item is reached.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError  # re-exported: it was defined here

__all__ = [
    "DATASET_KINDS",
    "DatasetError",
    "EvalDataset",
    "EvalItem",
    "decode_rle",
    "open_dataset",
    "rasterize_polygons",
    "read_coco",
    "read_folder",
    "read_imagenet_s",
    "read_imagenet_seg",
    "read_openimages_points",
    "read_shapes",
    "rle_string_to_counts",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _fail(kind: str, message: str) -> DatasetError:
    return DatasetError(f"{kind}: {message}")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation example.

    ``masks`` maps a label to its boolean (H, W) mask (None for point-labelled datasets);
    ``points`` maps a label to ``(positive, negative)`` float64 (N, 2) arrays of (x, y)
    pixels (None for mask datasets); ``labels`` lists the classes present in the image, in
    the reader's order; ``extra`` holds whatever else the format carries (captions, ids).
    """

    id: str
    image: Image.Image
    masks: dict[str, np.ndarray] | None
    points: dict[str, tuple[np.ndarray, np.ndarray]] | None
    labels: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


class EvalDataset:
    """A re-iterable, lazily read dataset: each ``iter()`` starts again from the first item.

    ``size`` is the number of items when known without decoding anything (already capped by
    ``limit``), else None.
    """

    def __init__(
        self,
        kind: str,
        path: Path,
        factory: Callable[[], Iterator[EvalItem]],
        *,
        limit: int | None = None,
        size: int | None = None,
    ) -> None:
        self.kind = kind
        self.path = path
        self.limit = _check_limit(kind, limit)
        self._factory = factory
        self.size = None if size is None else (size if limit is None else min(size, limit))

    def __iter__(self) -> Iterator[EvalItem]:
        if self.limit == 0:
            return
        gen = self._factory()
        try:
            for k, item in enumerate(gen, start=1):
                yield item
                if self.limit is not None and k >= self.limit:
                    break
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    def __repr__(self) -> str:
        return (
            f"EvalDataset(kind={self.kind!r}, path={str(self.path)!r}, limit={self.limit}, size={self.size})"
        )


def _check_limit(kind: str, limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise _fail(kind, f"limit must be a non-negative integer or None, got {limit!r}")
    return limit


# ----------------------------------------------------------------------------- file helpers


def _open_rgb(kind: str, path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                out = Image.new("RGB", rgba.size, (255, 255, 255))
                out.paste(rgba, mask=rgba.getchannel("A"))
                return out
            return im.convert("RGB")
    except FileNotFoundError:
        raise _fail(kind, f"image not found: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise _fail(kind, f"cannot read image {path}: {e}") from None


def _read_mask(kind: str, path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """A mask PNG as bool (H, W): ``value != 0`` (colour PNGs: any of R, G, B non-zero)."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except FileNotFoundError:
        raise _fail(kind, f"mask not found: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise _fail(kind, f"cannot read mask {path}: {e}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].any(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    mask = arr != 0
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise _fail(kind, f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    return mask


def _require_file(kind: str, path: Path, what: str = "file") -> None:
    if not path.exists():
        raise _fail(kind, f"{what} not found: {path}")
    if not path.is_file():
        raise _fail(kind, f"{what} is not a file: {path}")


def _require_dir(kind: str, path: Path, what: str = "folder") -> None:
    if not path.exists():
        raise _fail(kind, f"{what} not found: {path}")
    if not path.is_dir():
        raise _fail(kind, f"{what} is not a folder: {path}")


def _find_image(folder: Path, stem: str, suffixes: Iterable[str] = _IMAGE_SUFFIXES) -> Path | None:
    for suffix in suffixes:
        for s in (suffix, suffix.upper()):
            p = folder / f"{stem}{s}"
            if p.is_file():
                return p
    return None


# ----------------------------------------------------------------------------- imagenet-seg


def _h5_value(h5, obj, depth: int = 0):
    """Follow object references (MATLAB cells are datasets of references) down to numbers."""
    import h5py

    if depth > 4:
        raise ValueError("reference chain too deep")
    if isinstance(obj, h5py.Reference):
        if not obj:
            raise ValueError("null reference")
        return _h5_value(h5, h5[obj], depth + 1)
    if isinstance(obj, h5py.Dataset):
        if h5py.check_dtype(ref=obj.dtype) is not None:
            refs = np.asarray(obj[()]).ravel()
            if refs.size != 1:
                raise ValueError(f"expected one reference in a cell, found {refs.size}")
            return _h5_value(h5, refs[0], depth + 1)
        return np.asarray(obj[()])
    raise ValueError(f"unexpected HDF5 object {type(obj).__name__}")


def read_imagenet_seg(path, *, limit: int | None = None) -> EvalDataset:
    """ImageNet-Segmentation (Guillaumin et al.; the ``gtsegs_ijcv.mat`` of Chefer et al.).

    A MATLAB v7.3 file (HDF5). ``value/img`` and ``value/gt`` are (N, 1) datasets of object
    references, read in index order. An image reference points to a uint8 array stored
    transposed, (3, W, H), read as (H, W, 3) (a 2-D (W, H) grey image is also accepted); a gt
    reference points to a 1 x 1 cell whose reference points to the (W, H) mask, read as its
    transpose, ``!= 0``. The class is not in the file: each item has the one label
    ``"object"``. If ``value/id`` holds the synset string (UTF-16 code units) it goes to
    ``extra["synset"]``. Ids are the zero-padded indices (``"00000"``).
    """
    kind = "imagenet-seg"
    p = Path(path)
    _require_file(kind, p)
    try:
        import h5py
    except ImportError:
        raise _fail(kind, "reading this file needs h5py: pip install 'cliplens[eval]'") from None
    try:
        with h5py.File(p, "r") as f:
            if "value/img" not in f or "value/gt" not in f:
                raise _fail(
                    kind, f"{p} has no value/img and value/gt datasets: not the ImageNet-Segmentation file"
                )
            n_img, n_gt = f["value/img"].size, f["value/gt"].size
    except OSError as e:
        raise _fail(kind, f"cannot open {p} as HDF5 (MATLAB v7.3): {e}") from None
    if n_img != n_gt:
        raise _fail(kind, f"{p} has {n_img} images but {n_gt} masks")

    def items() -> Iterator[EvalItem]:
        with h5py.File(p, "r") as f:
            img_refs = np.asarray(f["value/img"][()]).ravel()
            gt_refs = np.asarray(f["value/gt"][()]).ravel()
            id_refs = np.asarray(f["value/id"][()]).ravel() if "value/id" in f else None
            for i in range(n_img):
                try:
                    img = _h5_value(f, img_refs[i])
                    gt = _h5_value(f, gt_refs[i])
                except (KeyError, ValueError, TypeError, OSError) as e:
                    raise _fail(kind, f"item {i} of {p} is corrupt: {e}") from None
                if img.ndim == 3 and img.shape[0] in (1, 3):
                    hwc = np.transpose(img, (2, 1, 0))
                    if hwc.shape[2] == 1:
                        hwc = np.repeat(hwc, 3, axis=2)
                elif img.ndim == 2:
                    hwc = np.repeat(img.T[:, :, None], 3, axis=2)
                else:
                    raise _fail(
                        kind, f"item {i} of {p}: image array has shape {img.shape}, expected (3, W, H)"
                    )
                if gt.ndim != 2:
                    raise _fail(kind, f"item {i} of {p}: mask array has shape {gt.shape}, expected (W, H)")
                mask = gt.T != 0
                if mask.shape != hwc.shape[:2]:
                    raise _fail(
                        kind, f"item {i} of {p}: mask {mask.shape} and image {hwc.shape[:2]} differ in size"
                    )
                if hwc.dtype != np.uint8:
                    hwc = np.clip(np.rint(hwc.astype(np.float64)), 0, 255).astype(np.uint8)
                extra: dict[str, Any] = {"index": i}
                if id_refs is not None and i < id_refs.size:
                    try:
                        codes = _h5_value(f, id_refs[i]).ravel()
                        extra["synset"] = "".join(chr(int(c)) for c in codes).strip("\x00 ")
                    except (KeyError, ValueError, TypeError, OSError):
                        pass  # the synset is optional metadata
                yield EvalItem(
                    id=f"{i:05d}",
                    image=Image.fromarray(np.ascontiguousarray(hwc), mode="RGB"),
                    masks={"object": mask},
                    points=None,
                    labels=["object"],
                    extra=extra,
                )

    return EvalDataset(kind, p, items, limit=limit, size=n_img)


# ----------------------------------------------------------------------------- imagenet-s

_WNID = re.compile(r"^n\d{8}$")


def _read_class_list(kind: str, path: Path) -> list[str]:
    """One class per line, line k (1-based) = class id k: ``wnid``, ``wnid name`` or ``name``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(kind, f"cannot read class list {path}: {e}") from None
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
    _require_dir(kind, root)
    img_dir, seg_dir = root / split, root / f"{split}-segmentation"
    _require_dir(kind, img_dir, "image folder")
    _require_dir(kind, seg_dir, "segmentation folder")
    names: list[str] | None = None
    if class_names is not None:
        cp = Path(class_names)
        _require_file(kind, cp, "class list")
        names = _read_class_list(kind, cp)
    else:
        found = [root / n for n in ("classes.txt", "categories.txt") if (root / n).is_file()]
        if not found:
            found = sorted(q for q in root.glob("*categories*.txt") if q.is_file())
        if len(found) > 1:
            raise _fail(
                kind, f"several class lists in {root} ({', '.join(q.name for q in found)}): pass class_names="
            )
        if found:
            names = _read_class_list(kind, found[0])
    segs = sorted(seg_dir.rglob("*.png"), key=lambda q: q.relative_to(seg_dir).as_posix())

    def label_of(cid: int, seg: Path) -> str:
        if names is None:
            return f"class_{cid}"
        if not 1 <= cid <= len(names):
            raise _fail(kind, f"{seg} has class id {cid}, the class list has {len(names)} classes")
        return names[cid - 1]

    def items() -> Iterator[EvalItem]:
        for seg in segs:
            rel = seg.relative_to(seg_dir)
            image_path = _find_image(img_dir / rel.parent, seg.stem, (".JPEG", ".jpg", ".jpeg", ".png"))
            if image_path is None:
                raise _fail(kind, f"no image for {seg} in {img_dir / rel.parent}")
            image = _open_rgb(kind, image_path)
            try:
                with Image.open(seg) as im:
                    im.load()
                    rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise _fail(kind, f"cannot read segmentation {seg}: {e}") from None
            ids = rgb[..., 0] + 256 * rgb[..., 1]
            if (ids.shape[1], ids.shape[0]) != image.size:
                got, want = f"{ids.shape[1]}x{ids.shape[0]}", "{}x{}".format(*image.size)
                raise _fail(kind, f"segmentation {seg} is {got}, its image is {want}")
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


# ----------------------------------------------------------------------------- openimages points


def _read_class_descriptions(kind: str, path: Path) -> dict[str, str]:
    """``LabelName,DisplayName`` rows (the v7 file has that header; older ones have none)."""
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for k, row in enumerate(csv.reader(fh)):
                if not row:
                    continue
                if len(row) < 2:
                    raise _fail(kind, f"{path} line {k + 1}: expected LabelName,DisplayName")
                if k == 0 and row[0].strip() == "LabelName":
                    continue
                out[row[0].strip()] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _fail(kind, f"cannot read class descriptions {path}: {e}") from None
    return out


def read_openimages_points(
    path,
    *,
    limit: int | None = None,
    images_dir: str | Path | None = None,
    class_descriptions: str | Path | None = None,
) -> EvalDataset:
    """OpenImages V7 point labels (Benenson & Ferrari 2022), the p-mIoU data of GEM and LeGrad.

    ``PATH`` is the point-label CSV (``oidv7-val-annotations-point-labels.csv``) or a folder
    holding exactly one ``*point-labels*.csv`` (or ``points.csv``). Columns used: ``ImageId``,
    ``X``, ``Y`` (normalised to [0, 1]), ``Label`` (``LabelName`` accepted) and
    ``EstimatedYesNo`` (``yes`` / ``no`` / ``unsure``); the others (``Source``, votes,
    ``TextLabel``) are ignored. Display names come from ``class_descriptions`` or the one
    ``*class-descriptions*.csv`` next to the CSV (else the label id is the name); ids that share
    a display name are merged. Images: ``images_dir`` or ``images/`` next to the CSV, named
    ``<ImageId>.jpg``.

    Per item, ``points[name] = (yes, no)`` in pixels (``X * width``, ``Y * height``); unsure
    points are dropped and counted in ``extra["unsure"]``. ``labels`` lists the classes with
    at least one "yes" point (the classes present, one map each in the protocol) in CSV order;
    ``points`` also keeps classes with only "no" points. Items are sorted by ImageId. The CSV is
    read (once) on the first iteration, as rows of one image may be anywhere in it.
    """
    kind = "openimages-points"
    p = Path(path)
    if p.is_dir():
        root = p
        found = sorted(q for q in p.glob("*point-labels*.csv") if q.is_file())
        if not found and (p / "points.csv").is_file():
            found = [p / "points.csv"]
        if len(found) != 1:
            what = (
                "no *point-labels*.csv"
                if not found
                else f"several point CSVs ({', '.join(q.name for q in found)})"
            )
            raise _fail(kind, f"{what} in {p}: pass the CSV itself")
        csv_path = found[0]
    else:
        _require_file(kind, p, "point-label CSV")
        csv_path, root = p, p.parent
    img_dir = Path(images_dir) if images_dir is not None else root / "images"
    _require_dir(kind, img_dir, "image folder")
    if class_descriptions is not None:
        _require_file(kind, Path(class_descriptions), "class descriptions")
        names = _read_class_descriptions(kind, Path(class_descriptions))
    else:
        desc = sorted(q for q in root.glob("*class-descriptions*.csv") if q.is_file())
        if len(desc) > 1:
            raise _fail(kind, f"several class-description CSVs in {root}: pass class_descriptions=")
        names = _read_class_descriptions(kind, desc[0]) if desc else {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _fail(kind, f"cannot read {csv_path}: {e}") from None
    header = [h.strip() for h in header or []]
    label_col = "Label" if "Label" in header else "LabelName"
    missing = [c for c in ("ImageId", "X", "Y", label_col, "EstimatedYesNo") if c not in header]
    if missing:
        raise _fail(kind, f"{csv_path} lacks the column(s) {', '.join(missing)}")

    cache: dict[str, Any] = {}

    def load() -> dict[str, dict[str, list]]:
        if "rows" in cache:
            return cache["rows"]
        per_image: dict[str, dict[str, list]] = {}
        try:
            with open(csv_path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, skipinitialspace=True)
                for row in reader:
                    line = reader.line_num
                    try:
                        image_id = row["ImageId"].strip()
                        name = names.get(row[label_col].strip(), row[label_col].strip())
                        x, y = float(row["X"]), float(row["Y"])
                        answer = row["EstimatedYesNo"].strip().lower()
                    except (KeyError, ValueError, AttributeError) as e:
                        raise _fail(kind, f"{csv_path} line {line}: malformed row ({e})") from None
                    if answer not in ("yes", "no", "unsure"):
                        raise _fail(
                            kind, f"{csv_path} line {line}: EstimatedYesNo is {answer!r}, not yes/no/unsure"
                        )
                    if not (math.isfinite(x) and math.isfinite(y)):
                        raise _fail(kind, f"{csv_path} line {line}: non-finite point")
                    cls = per_image.setdefault(image_id, {}).setdefault(name, [[], [], 0])
                    if answer == "yes":
                        cls[0].append((x, y))
                    elif answer == "no":
                        cls[1].append((x, y))
                    else:
                        cls[2] += 1
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise _fail(kind, f"cannot read {csv_path}: {e}") from None
        cache["rows"] = per_image
        return per_image

    def items() -> Iterator[EvalItem]:
        per_image = load()
        for image_id in sorted(per_image):
            image_path = _find_image(img_dir, image_id, (".jpg", ".jpeg", ".png"))
            if image_path is None:
                raise _fail(kind, f"image not found: {img_dir / (image_id + '.jpg')}")
            image = _open_rgb(kind, image_path)
            scale = np.array(image.size, dtype=np.float64)
            points: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            unsure: dict[str, int] = {}
            for name, (yes, no, n_unsure) in per_image[image_id].items():
                points[name] = (
                    np.asarray(yes, dtype=np.float64).reshape(-1, 2) * scale,
                    np.asarray(no, dtype=np.float64).reshape(-1, 2) * scale,
                )
                if n_unsure:
                    unsure[name] = n_unsure
            yield EvalItem(
                id=image_id,
                image=image,
                masks=None,
                points=points,
                labels=[name for name, (yes, _) in points.items() if len(yes)],
                extra={"unsure": unsure, "file": str(image_path)},
            )

    return EvalDataset(kind, csv_path, items, limit=limit)


# ----------------------------------------------------------------------------- coco


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths (pycocotools' ``rleFrString``).

    Each count is a little-endian base-32 varint written as characters ``48 + 6-bit value``:
    bit 0x20 continues, bit 0x10 of the last group is the sign; from the third count on, the
    stored value is the difference to the count two places before.
    """
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE string")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {chr(data[p])!r} in RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE (``{"size": [h, w], "counts": list or str}``) as a bool (h, w) mask.

    Runs alternate background / foreground starting with background and scan the image in
    column-major (Fortran) order. The counts must add up to ``h * w``.
    """
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an RLE: {e}") from None
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or (c.size and c.min() < 0):
        raise ValueError("RLE counts must be non-negative integers")
    if int(c.sum()) != h * w:
        raise ValueError(f"RLE counts add up to {int(c.sum())}, the size {h}x{w} needs {h * w}")
    values = np.zeros(c.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, c).reshape(w, h).T.copy()


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Fill COCO polygons (``[[x1, y1, x2, y2, ...], ...]``) into a bool (height, width) mask.

    A pixel is inside when its centre ``(j + 0.5, i + 0.5)`` is (even-odd rule, left edges
    closed, right edges open); several polygons are united. This is close to pycocotools'
    rasteriser (about 1% of pixels differ on small shapes, all on the boundary); PIL's
    ``ImageDraw.polygon``, which also fills boundary pixels, differs on about 15%. Polygons with
    fewer than three points are skipped.
    """
    out = np.zeros((height, width), dtype=bool)
    if height <= 0 or width <= 0:
        return out
    yc = np.arange(height, dtype=np.float64) + 0.5
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).ravel()
        if pts.size < 6 or pts.size % 2:
            continue
        pts = pts.reshape(-1, 2)
        x0, y0 = pts[:, 0], pts[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        cross = (y0[None, :] <= yc[:, None]) != (y1[None, :] <= yc[:, None])
        rows, edges = np.nonzero(cross)
        if rows.size == 0:
            continue
        t = (yc[rows] - y0[edges]) / (y1[edges] - y0[edges])
        xi = x0[edges] + t * (x1[edges] - x0[edges])
        cols = np.clip(np.ceil(xi - 0.5), 0, width).astype(np.int64)
        toggles = np.zeros((height, width + 1), dtype=np.int32)
        np.add.at(toggles, (rows, cols), 1)
        out |= (np.cumsum(toggles, axis=1)[:, :width] % 2) == 1
    return out


def _coco_mask(segmentation, h: int, w: int) -> np.ndarray:
    if isinstance(segmentation, list):
        return rasterize_polygons(segmentation, h, w)
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation)
        if mask.shape != (h, w):
            raise ValueError(f"RLE of size {mask.shape} on a {h}x{w} image")
        return mask
    raise ValueError(f"unknown segmentation of type {type(segmentation).__name__}")


def read_coco(
    path,
    *,
    limit: int | None = None,
    images_dir: str | Path | None = None,
    include_crowd: bool = True,
) -> EvalDataset:
    """COCO instance annotations (``instances_val2017.json`` and friends).

    Segmentations may be polygons (:func:`rasterize_polygons`), uncompressed RLE (counts as
    a list, usual for crowd regions) or compressed RLE (counts as a string); RLE is decoded
    here (:func:`decode_rle`), without pycocotools. All instances of a category are merged
    into one mask keyed by the category name; ``labels`` follow category id order.
    ``include_crowd=False`` drops ``iscrowd`` annotations. Images without annotations are
    yielded with no labels. Order: image id.

    Images are looked up in ``images_dir``, else the first of ``<json dir>/images``,
    ``<json dir>/../<split>``, ``<json dir>/<split>`` and ``<json dir>`` that holds the first
    image (``split`` from ``instances_<split>.json``).
    """
    kind = "coco"
    p = Path(path)
    _require_file(kind, p, "annotation file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(kind, f"cannot read {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise _fail(kind, f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise _fail(kind, f"{p} lacks the images / annotations / categories lists of a COCO file")
    try:
        cat_names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(kind, f"{p}: malformed images, annotations or categories ({e})") from None

    if images_dir is not None:
        img_dir = Path(images_dir)
        _require_dir(kind, img_dir, "image folder")
    else:
        split = p.stem.split("instances_", 1)[1] if "instances_" in p.stem else p.stem
        candidates = [p.parent / "images", p.parent.parent / split, p.parent / split, p.parent]
        first = str(images[0].get("file_name", "")) if images else ""
        img_dir = next((c for c in candidates if c.is_dir() and (not first or (c / first).is_file())), None)
        if img_dir is None:
            raise _fail(kind, f"cannot find image {first!r} next to {p}: pass images_dir=")

    def items() -> Iterator[EvalItem]:
        for info in images:
            try:
                image_id = int(info["id"])
                file_name = str(info["file_name"])
                h, w = int(info["height"]), int(info["width"])
            except (KeyError, TypeError, ValueError) as e:
                raise _fail(kind, f"{p}: malformed image entry {info!r:.80} ({e})") from None
            image = _open_rgb(kind, img_dir / file_name)
            if image.size != (w, h):
                raise _fail(
                    kind, f"{file_name} is {image.size[0]}x{image.size[1]}, the annotations say {w}x{h}"
                )
            masks: dict[int, np.ndarray] = {}
            instances: dict[str, int] = {}
            for ann in by_image.get(image_id, []):
                if ann.get("iscrowd", 0) and not include_crowd:
                    continue
                try:
                    cid = int(ann["category_id"])
                    name = cat_names[cid]
                    m = _coco_mask(ann["segmentation"], h, w)
                except (KeyError, TypeError, ValueError) as e:
                    raise _fail(
                        kind, f"{p}: annotation {ann.get('id')} of image {image_id} is malformed ({e})"
                    ) from None
                masks[cid] = masks[cid] | m if cid in masks else m
                instances[name] = instances.get(name, 0) + 1
            named = {cat_names[c]: masks[c] for c in sorted(masks)}
            yield EvalItem(
                id=str(image_id),
                image=image,
                masks=named,
                points=None,
                labels=list(named),
                extra={"file_name": file_name, "instances": instances},
            )

    return EvalDataset(kind, p, items, limit=limit, size=len(images))


# ----------------------------------------------------------------------------- folder


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
    _require_dir(kind, root)
    img_dir, mask_dir = root / "images", root / "masks"
    _require_dir(kind, img_dir, "image folder")
    _require_dir(kind, mask_dir, "mask folder")
    stems: dict[str, Path] = {}
    for q in sorted(img_dir.iterdir()):
        if not q.is_file() or q.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        if "__" in q.stem:
            raise _fail(kind, f"image name {q.name!r} contains '__', which separates mask labels")
        if q.stem in stems:
            raise _fail(kind, f"two images named {q.stem!r}: {stems[q.stem].name} and {q.name}")
        stems[q.stem] = q
    mask_files: dict[str, list[tuple[str, Path]]] = {}
    for q in sorted(mask_dir.iterdir()):
        if not q.is_file() or q.suffix.lower() != ".png":
            continue
        stem, sep, raw = q.stem.partition("__")
        if stem not in stems:
            raise _fail(kind, f"mask {q.name} has no image {stem}.(png|jpg|jpeg) in {img_dir}")
        label = raw.replace("_", " ").strip() if sep else "object"
        if not label:
            raise _fail(kind, f"mask {q.name} has an empty label after '__'")
        mask_files.setdefault(stem, []).append((label, q))

    def items() -> Iterator[EvalItem]:
        for stem, image_path in stems.items():
            image = _open_rgb(kind, image_path)
            entries = sorted(mask_files.get(stem, []), key=lambda e: (e[1].stem != stem, e[1].name))
            masks: dict[str, np.ndarray] = {}
            for label, mp in entries:
                if label in masks:
                    raise _fail(kind, f"two masks of {stem} have the label {label!r}")
                masks[label] = _read_mask(kind, mp, image.size)
            yield EvalItem(
                id=stem,
                image=image,
                masks=masks,
                points=None,
                labels=list(masks),
                extra={"file": str(image_path)},
            )

    return EvalDataset(kind, root, items, limit=limit, size=len(stems))


# ----------------------------------------------------------------------------- shapes


def read_shapes(path, *, limit: int | None = None) -> EvalDataset:
    """The cliplens shapes world (written by :func:`cliplens.worlds.shapes.write_dataset`).

    ``PATH/dataset.json`` must say ``"kind": "shapes"``; ``PATH/index.jsonl`` holds one scene
    per line in file order. Masks (mode "L", 0/255) are keyed by object label; two objects with
    one label would be merged (the world never draws the same colour and shape twice). The
    record's other fields (``captions``, ``absent``, ``compositional``, ``objects`` with bbox
    and area, ``seed``, ...) go to ``extra``.
    """
    kind = "shapes"
    root = Path(path)
    _require_dir(kind, root)
    meta_path, index_path = root / "dataset.json", root / "index.jsonl"
    _require_file(kind, meta_path)
    _require_file(kind, index_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(kind, f"cannot read {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != "shapes":
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise _fail(kind, f"{meta_path} does not describe a shapes dataset (kind is {found!r})")
    try:
        lines = index_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(kind, f"cannot read {index_path}: {e}") from None
    records = [(no, line) for no, line in enumerate(lines, start=1) if line.strip()]

    def items() -> Iterator[EvalItem]:
        for line_no, line in records:
            try:
                rec = json.loads(line)
                scene_id = str(rec["id"])
                image_rel = rec["image"]
                mask_refs = [(str(o["label"]), o["mask"]) for o in rec.get("objects", [])]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise _fail(kind, f"{index_path} line {line_no}: malformed record ({e})") from None
            image = _open_rgb(kind, root / image_rel)
            if "width" in rec and "height" in rec and image.size != (rec["width"], rec["height"]):
                got, want = "{}x{}".format(*image.size), f"{rec['width']}x{rec['height']}"
                raise _fail(kind, f"{image_rel} is {got}, index.jsonl says {want}")
            masks: dict[str, np.ndarray] = {}
            for label, mask_rel in mask_refs:
                m = _read_mask(kind, root / mask_rel, image.size)
                masks[label] = masks[label] | m if label in masks else m
            extra = {k: v for k, v in rec.items() if k not in ("id", "image")}
            extra["meta"] = meta
            yield EvalItem(
                id=scene_id, image=image, masks=masks, points=None, labels=list(masks), extra=extra
            )

    return EvalDataset(kind, root, items, limit=limit, size=len(records))


# ----------------------------------------------------------------------------- dispatcher

#: Dataset kinds understood by :func:`open_dataset`, and their readers.
DATASET_KINDS: dict[str, Callable[..., EvalDataset]] = {
    "imagenet-seg": read_imagenet_seg,
    "imagenet-s": read_imagenet_s,
    "openimages-points": read_openimages_points,
    "coco": read_coco,
    "folder": read_folder,
    "shapes": read_shapes,
}


def open_dataset(spec: str, *, limit: int | None = None, **options: Any) -> EvalDataset:
    """Open ``"KIND:PATH"`` (e.g. ``"shapes:data/shapes-val"``) with that kind's reader.

    ``options`` go to the reader (e.g. ``images_dir=`` for ``coco``). Raises
    :class:`DatasetError` for a malformed spec, an unknown kind or a path that cannot be read.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise DatasetError(
            f"dataset must be given as KIND:PATH (kinds: {', '.join(DATASET_KINDS)}), got {spec!r}"
        )
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(DATASET_KINDS)}")
    if not path:
        raise _fail(kind, "no path after the colon")
    _check_limit(kind, limit)
    try:
        return DATASET_KINDS[kind](path, limit=limit, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise _fail(kind, f"unknown option: {e}") from None
        raise
