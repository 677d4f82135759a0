"""A map blended over its original image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .colors import colorize, normalise


def overlay(
    image: np.ndarray | Image.Image,
    heat: np.ndarray,
    *,
    alpha: float = 0.5,
    mode: str = "minmax",
    unseen: str = "hatch",
    value_range: tuple[float, float] | None = None,
) -> Image.Image:
    """Blend ``heat`` (H, W, raw values, NaN = not seen by the model) over ``image``.

    ``mode`` is the normalisation (``minmax``, ``positive``, ``signed``; signed maps use a
    diverging palette). ``value_range`` (lo, hi), when given, pins the two ends of the
    palette to those raw values instead of the ones ``mode`` reads off ``heat`` (so that a
    colour bar can be labelled with them; see :func:`cliplens.viz.pages.display_range`).
    Signed maps are blended by magnitude (a value near 0 leaves the photo visible; white, the
    palette's middle, never washes it out). Pixels the model never saw are darkened and hatched (``unseen="hatch"``) or left
    untouched (``"plain"``), never coloured as if scored.
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if img.shape[:2] != heat.shape:
        raise ValueError(f"map {heat.shape} does not match image {img.shape[:2]}")
    seen = np.isfinite(heat)
    signed = mode == "signed"
    if value_range is None:
        scaled = normalise(heat, mode)
    else:
        lo, hi = value_range
        scaled = np.clip((heat - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(heat)
        if signed:
            scaled = 2 * scaled - 1
    colours = colorize(scaled, signed=signed).astype(np.float32)
    out = img.copy()
    if signed:
        # the diverging palette is white at 0: blend by magnitude instead, so that values near 0
        # leave the photo as it is and only positive (red) and negative (blue) parts are painted
        weight = alpha * np.clip(np.abs(np.nan_to_num(scaled)), 0.0, 1.0) ** 0.5
        weight = weight[..., None].astype(np.float32)
        out[seen] = (1 - weight[seen]) * img[seen] + weight[seen] * colours[seen]
    else:
        out[seen] = (1 - alpha) * img[seen] + alpha * colours[seen]
    del colours, scaled
    if unseen == "hatch" and (~seen).any():
        yy, xx = np.indices(heat.shape)
        stripes = ((xx + yy) // 6) % 2 == 0
        dim = img * 0.35
        dim[stripes] = dim[stripes] * 0.5 + 40
        out[~seen] = dim[~seen]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
