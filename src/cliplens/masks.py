"""Boolean-mask helpers shared by the shapes world and the evaluation metrics (numpy only)."""

from __future__ import annotations

import math

import numpy as np


def dilate_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within Euclidean distance ``radius`` of a True pixel of ``mask``."""
    r = math.floor(radius)
    if r <= 0:
        return mask.copy()
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(ys) == 0:
        return mask.copy()
    # Only pixels within r rows and columns of a True pixel can change: work in that box.
    y0, y1 = max(0, ys[0] - r), min(mask.shape[0], ys[-1] + r + 1)
    x0, x1 = max(0, xs[0] - r), min(mask.shape[1], xs[-1] + r + 1)
    full = np.zeros_like(mask)
    full[y0:y1, x0:x1] = _dilate_box(mask[y0:y1, x0:x1], radius, r)
    return full


def _dilate_box(mask: np.ndarray, radius: float, r: int) -> np.ndarray:
    """dilate_disk of ``mask``, pixels beyond the array's edges counting as False.

    Row by row of the disk: for an offset ``dy`` the disk spans ``|dx| <= w(dy)``, so the
    result ORs, over dy, the mask dilated along x by w(dy) (a sliding-window count from one
    cumulative sum) and shifted by dy. That is r + 1 window widths instead of (2r + 1)^2 shifts.
    """
    h, w = mask.shape
    rad2 = radius * radius
    cum = np.zeros((h, w + 2 * r + 1), np.int32)
    np.cumsum(mask, axis=1, out=cum[:, r + 1 : w + r + 1])
    cum[:, w + r + 1 :] = cum[:, w + r : w + r + 1]
    along_x: dict[int, np.ndarray] = {}
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        half = math.isqrt(int(rad2 - dy * dy)) if rad2 >= dy * dy else -1
        while (half + 1) ** 2 + dy * dy <= rad2:  # rad2 need not be an integer
            half += 1
        while half >= 0 and half * half + dy * dy > rad2:
            half -= 1
        if half < 0:
            continue
        if half not in along_x:
            # window [x - half, x + half] of the mask, i.e. cum[x + r + half + 1] - cum[x + r - half]
            along_x[half] = (cum[:, r + half + 1 : r + half + 1 + w] - cum[:, r - half : r - half + w]) > 0
        row = along_x[half]
        if dy >= 0:
            out[dy:h] |= row[0 : h - dy]
        else:
            out[0 : h + dy] |= row[-dy:h]
    return out
