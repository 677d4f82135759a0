"""Reader of ImageNet-Segmentation (``gtsegs_ijcv.mat``, MATLAB v7.3 = HDF5, read with ``h5py``).

The conventions every reader follows: :mod:`cliplens.eval.datasets`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import EvalDataset, EvalItem, fail, require_file

__all__ = ["read_imagenet_seg"]


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
    require_file(kind, p)
    try:
        import h5py
    except ImportError:
        raise fail(kind, "reading this file needs h5py: pip install 'cliplens[eval]'") from None
    try:
        with h5py.File(p, "r") as f:
            if "value/img" not in f or "value/gt" not in f:
                raise fail(
                    kind, f"{p} has no value/img and value/gt datasets: not the ImageNet-Segmentation file"
                )
            n_img, n_gt = f["value/img"].size, f["value/gt"].size
    except OSError as e:
        raise fail(kind, f"cannot open {p} as HDF5 (MATLAB v7.3): {e}") from None
    if n_img != n_gt:
        raise fail(kind, f"{p} has {n_img} images but {n_gt} masks")

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
                    raise fail(kind, f"item {i} of {p} is corrupt: {e}") from None
                if img.ndim == 3 and img.shape[0] in (1, 3):
                    hwc = np.transpose(img, (2, 1, 0))
                    if hwc.shape[2] == 1:
                        hwc = np.repeat(hwc, 3, axis=2)
                elif img.ndim == 2:
                    hwc = np.repeat(img.T[:, :, None], 3, axis=2)
                else:
                    raise fail(
                        kind, f"item {i} of {p}: image array has shape {img.shape}, expected (3, W, H)"
                    )
                if gt.ndim != 2:
                    raise fail(kind, f"item {i} of {p}: mask array has shape {gt.shape}, expected (W, H)")
                mask = gt.T != 0
                if mask.shape != hwc.shape[:2]:
                    raise fail(
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
