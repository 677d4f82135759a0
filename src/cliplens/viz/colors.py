"""Colormaps without matplotlib: piecewise-linear tables sampled from perceptual maps."""

from __future__ import annotations

import numpy as np

# Control points (position, r, g, b) approximating 'inferno' (sequential) and a
# blue-white-red diverging map for signed values.
_SEQUENTIAL = np.array(
    [
        (0.00, 0, 0, 4),
        (0.13, 31, 12, 72),
        (0.25, 85, 15, 109),
        (0.38, 136, 34, 106),
        (0.50, 186, 54, 85),
        (0.63, 227, 89, 51),
        (0.75, 249, 140, 10),
        (0.88, 249, 201, 50),
        (1.00, 252, 255, 164),
    ],
    dtype=np.float64,
)
_DIVERGING = np.array(
    [
        (0.0, 5, 48, 97),
        (0.25, 67, 147, 195),
        (0.5, 247, 247, 247),
        (0.75, 214, 96, 77),
        (1.0, 103, 0, 31),
    ],
    dtype=np.float64,
)


def _lookup(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    out = np.empty(x.shape + (3,), dtype=np.float64)
    for c in range(3):
        out[..., c] = np.interp(x, table[:, 0], table[:, c + 1])
    return out


def normalise(values: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Scale a raw map for display, ignoring NaN.

    ``minmax``: to [0, 1]. ``signed``: to [-1, 1] by the largest magnitude, zero stays zero.
    ``positive``: negative values to 0, then divided by the maximum.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return np.zeros_like(v)
    if mode == "minmax":
        lo, hi = np.nanmin(v), np.nanmax(v)
        return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    if mode == "signed":
        m = np.nanmax(np.abs(v))
        return v / m if m > 0 else np.zeros_like(v)
    if mode == "positive":
        p = np.clip(v, 0, None)
        m = np.nanmax(p)
        return p / m if m > 0 else np.zeros_like(v)
    raise ValueError(f"unknown normalisation {mode!r}")


def colorize(values: np.ndarray, *, signed: bool = False) -> np.ndarray:
    """Normalised values ([0, 1], or [-1, 1] when ``signed``) -> (..., 3) uint8 colours.
    NaN becomes mid grey."""
    v = np.asarray(values, dtype=np.float64)
    nan = ~np.isfinite(v)
    v = np.where(nan, 0.0, v)
    rgb = _lookup(_DIVERGING, (v + 1) / 2) if signed else _lookup(_SEQUENTIAL, v)
    rgb[nan] = 128
    return np.rint(rgb).astype(np.uint8)
