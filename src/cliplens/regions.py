"""Region-feature images: what models such as LXMERT see instead of pixels.

LXMERT reads an image as R object regions found by a Faster R-CNN detector that is not part of
the model: one feature vector per region and its box. A :class:`RegionImage` carries those,
with the original image (or only its size) so that the region relevance can be shown on it:

    region = cliplens.RegionImage(features, boxes, image="photo.jpg")   # boxes in pixels
    ex = cliplens.explain(lxmert, region, ["is there a dog?"], method="chefer")
    ex.image_maps[0, 0]               # (1, R): one cell per region, in the regions' order
    ex.extras["region_maps"][0, 0]    # (H', W'): the same relevance painted onto the image

Boxes are ``(x0, y0, x1, y1)`` in PIXELS of the original image (what the detector reports
before LXMERT's own normalisation); :meth:`RegionImage.normalized_boxes` divides by the width
and height, which is the ``visual_pos`` LXMERT takes.

The painting (:func:`paint_regions`) gives every pixel the SUM of the relevance of the boxes
that cover it (overlapping boxes add up; a pixel no box covers is 0), at display size (the
longer side at most :data:`REGION_MAP_SIDE` pixels). A display pixel that a box covers only in
part gets that fraction of the box's relevance, so the painting at display size is exactly the
full-resolution painting averaged over each display pixel, and no small box vanishes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .images import Geometry, display_size, load_image

#: the longer side, in pixels, of the region maps an explanation carries (``extras["region_maps"]``)
REGION_MAP_SIDE = 64

#: mid-grey: the canvas shown for a region image given by its size only
CANVAS_GREY = 128


class RegionImage:
    """An image given as region features (an object detector's output), for region-feature
    models (LXMERT).

    Args:
        features: (R, D) float array or tensor, one feature vector per region (D must be the
            model's ``visual_feat_dim``, 2048 for the released LXMERT checkpoints).
        boxes: (R, 4) ``(x0, y0, x1, y1)`` of each region in pixels of the original image.
        image: the original image (a path, PIL image or HxWx3 uint8 array), for display; or
        size: ``(width, height)`` of the original image when the image itself is not at hand
            (the explanation then shows the regions on a grey canvas of that size).

    A bad shape, a box outside the image or boxes that look normalised raise a one-line
    :class:`~cliplens.errors.InputError`.
    """

    def __init__(self, features, boxes, image=None, size: tuple[int, int] | None = None):
        feats = _as_tensor(features, "features")
        if feats.dim() != 2 or feats.shape[0] < 1 or feats.shape[1] < 1:
            raise InputError(
                f"RegionImage features must be (R, D) with R >= 1 regions, got shape {tuple(feats.shape)}"
            )
        if not bool(torch.isfinite(feats).all()):
            raise InputError("RegionImage features hold NaN or infinite values")
        box = _as_tensor(boxes, "boxes").to(torch.float64).cpu().numpy()
        if box.shape != (feats.shape[0], 4):
            raise InputError(
                f"RegionImage boxes must be (R, 4) = ({feats.shape[0]}, 4) for {feats.shape[0]} regions, "
                f"got shape {box.shape}"
            )
        if not np.isfinite(box).all():
            raise InputError("RegionImage boxes hold NaN or infinite values")
        pil = None
        if image is not None:
            if isinstance(image, RegionImage):
                raise InputError(
                    "RegionImage image must be a picture (path, PIL image or array), not a RegionImage"
                )
            pil = load_image(image)
            if size is not None and tuple(size) != pil.size:
                raise InputError(f"RegionImage size {tuple(size)} differs from its image's size {pil.size}")
            size = pil.size
        if size is None:
            raise InputError(
                "RegionImage needs the original image (image=...) or its size (size=(width, height)): "
                "its boxes are in pixels of that image"
            )
        width, height = _check_size(size)
        _check_boxes(box, width, height)
        self._features = feats
        self._boxes = box
        self._image = pil
        self._size = (width, height)

    # ---- what it holds -------------------------------------------------------------------
    @property
    def features(self) -> torch.Tensor:
        """(R, D) the region features."""
        return self._features

    @property
    def boxes(self) -> np.ndarray:
        """(R, 4) float64 boxes ``(x0, y0, x1, y1)`` in pixels of the original image."""
        return self._boxes.copy()

    @property
    def num_regions(self) -> int:
        return int(self._features.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the original image."""
        return self._size

    @property
    def image(self) -> Image.Image | None:
        """The original image, or None when only its size was given."""
        return self._image

    def normalized_boxes(self) -> np.ndarray:
        """(R, 4) boxes divided by (width, height, width, height): LXMERT's ``visual_pos``."""
        w, h = self._size
        return self._boxes / np.array([w, h, w, h], dtype=np.float64)

    def geometry(self) -> Geometry:
        """The region "grid" (1, R) as a :class:`Geometry`: the model input is taken to be a
        strip of R cells, one per region, stretched over the original image. It records the
        original's size (what displays and saved explanations need); a region map belongs on
        the image through its boxes (:func:`paint_regions`), not through this stretch."""
        w, h = self._size
        r = self.num_regions
        return Geometry(w, h, r / w, 1.0 / h, (0.0, 0.0), (r, 1))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """(H, W, 3) uint8: the original image, or a grey canvas of its size (what an
        :class:`~cliplens.explanation.Explanation` keeps for display)."""
        if self._image is not None:
            out = np.asarray(self._image)
        else:
            w, h = self._size
            out = np.full((h, w, 3), CANVAS_GREY, dtype=np.uint8)
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        w, h = self._size
        return f"RegionImage({self.num_regions} regions x {self._features.shape[1]} features, {w}x{h})"


def _as_tensor(value, what: str) -> torch.Tensor:
    try:
        t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            f"RegionImage {what} must be a numeric array or tensor, got a {type(value).__name__}"
        ) from None
    if t.dtype == torch.bool or not (
        t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    ):
        raise InputError(f"RegionImage {what} must be numbers, got {t.dtype}")
    return t if t.is_floating_point() else t.to(torch.float32)


def _check_size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
        ok = all(float(v) == int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"RegionImage size must be (width, height), got {size!r}") from None
    if not ok or width < 1 or height < 1:
        raise InputError(f"RegionImage size must be two positive whole numbers (width, height), got {size!r}")
    return width, height


#: how far (pixels) a box may stick out of the image: detectors' boxes are clipped to it, up to rounding
BOX_SLACK = 1.0


def _check_boxes(box: np.ndarray, width: int, height: int) -> None:
    x0, y0, x1, y1 = box.T
    if np.any(x1 < x0) or np.any(y1 < y0):
        i = int(np.flatnonzero((x1 < x0) | (y1 < y0))[0])
        raise InputError(
            f"RegionImage box {i} {box[i].tolist()} is not (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1"
        )
    if max(width, height) > 2 and box.max() <= 1.0:
        raise InputError(
            f"RegionImage boxes all lie within [0, 1], they look normalised; give them in pixels of the "
            f"{width}x{height} image (multiply by width and height)"
        )
    outside = (x0 < -BOX_SLACK) | (y0 < -BOX_SLACK) | (x1 > width + BOX_SLACK) | (y1 > height + BOX_SLACK)
    if np.any(outside):
        i = int(np.flatnonzero(outside)[0])
        raise InputError(f"RegionImage box {i} {box[i].tolist()} lies outside the {width}x{height} image")


# ---- painting region values onto the image ---------------------------------------------------------


def paint_regions(values, boxes, size: tuple[int, int], max_side: int | None = REGION_MAP_SIDE) -> np.ndarray:
    """Region values painted onto the image: (..., R) values, (R, 4) boxes in pixels of a
    ``size`` = (width, height) image -> (..., H', W'), the image at display size (longer side at
    most ``max_side``; None: full size). Each pixel is the SUM over the boxes of the box's value
    times the fraction of the pixel the box covers (1 inside, 0 outside, in between on a box
    edge that cuts a display pixel): the full-resolution painting averaged over each pixel."""
    values = np.asarray(values, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    width, height = size
    w, h = display_size(width, height, max_side)
    cover_x = _coverage(boxes[:, 0], boxes[:, 2], width, w)  # (R, W')
    cover_y = _coverage(boxes[:, 1], boxes[:, 3], height, h)  # (R, H')
    return np.einsum("...r,rv,ru->...vu", values, cover_y, cover_x)


def _coverage(lo: np.ndarray, hi: np.ndarray, extent: int, cells: int) -> np.ndarray:
    """(R, cells): the fraction of each of ``cells`` equal pixels across ``extent`` original
    pixels that the interval [lo, hi] of each region covers."""
    step = extent / cells
    left = np.arange(cells) * step
    right = left + step
    overlap = np.minimum(hi[:, None], right[None]) - np.maximum(lo[:, None], left[None])
    return np.clip(overlap, 0.0, None) / step


# ---- the hooks the public API calls -------------------------------------------------------------


def takes_regions(adapter) -> bool:
    """Whether ``adapter`` reads images as region features (:class:`RegionImage`) instead of pixels."""
    return bool(getattr(adapter, "region_inputs", False))


def check_image_inputs(adapter, images: list) -> None:
    """A one-line InputError when the images are not of the kind the model reads: a
    :class:`RegionImage` given to a pixel model, or a picture given to a region-feature model."""
    regions = [i for i, img in enumerate(images) if isinstance(img, RegionImage)]
    if takes_regions(adapter):
        plain = [i for i in range(len(images)) if i not in set(regions)]
        if plain:
            raise InputError(
                f"{adapter.name} ({adapter.family}) reads region features from an object detector, not pixels: "
                f"image {plain[0]} is a picture; pass cliplens.RegionImage(features, boxes, image=...)"
            )
    elif regions:
        raise InputError(
            f"image {regions[0]} is a RegionImage (region features), but {adapter.name} ({adapter.family}) reads "
            "pixels; RegionImage is for region-feature models (LXMERT): pass the picture itself"
        )


def region_extras(images: list, image_maps) -> dict:
    """``{"region_maps": ...}`` for a call on region images: each pair's (1, R) map painted onto
    its image by :func:`paint_regions` ((P, H', W') per image, stacked when the sizes agree);
    empty for pixel images or without image maps."""
    if image_maps is None or not images or not all(isinstance(img, RegionImage) for img in images):
        return {}
    painted = []
    for b, img in enumerate(images):
        maps = np.asarray(image_maps[b], dtype=np.float64)  # (P, 1, R)
        painted.append(paint_regions(maps[:, 0, :], img.boxes, img.size))
    if len({p.shape for p in painted}) == 1:
        return {"region_maps": np.stack(painted)}
    return {"region_maps": painted}


__all__ = ["REGION_MAP_SIDE", "RegionImage", "check_image_inputs", "paint_regions", "region_extras"]
