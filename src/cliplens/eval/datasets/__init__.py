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

from collections.abc import Callable
from typing import Any

from ...errors import DatasetError  # re-exported: it was defined here
from .base import EvalDataset, EvalItem, check_limit, fail
from .coco import decode_rle, rasterize_polygons, read_coco, rle_string_to_counts
from .folder import read_folder
from .imagenet_s import read_imagenet_s
from .imagenet_seg import read_imagenet_seg
from .openimages import read_openimages_points
from .shapes import read_shapes

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
        raise fail(kind, "no path after the colon")
    check_limit(kind, limit)
    try:
        return DATASET_KINDS[kind](path, limit=limit, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise fail(kind, f"unknown option: {e}") from None
        raise
