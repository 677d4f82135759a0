"""Reading images safely and the geometry of preprocessing.

Every image goes through :func:`load_image` (orientation, modes, size budget) and then an
adapter's preprocessing recipe (:mod:`cliplens.preprocess`), which records a :class:`Geometry`:
how the original pixels map onto the model input. Maps are brought back onto the original image
with that record, so the heatmap lands where the model looked; pixels the model never saw (cut
off by a centre crop) come back as NaN instead of being filled in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

#: names that moved to :mod:`cliplens.preprocess`, still importable from here
_MOVED = {"Preprocess", "SquashPreprocess", "SquashCropPreprocess", "NaFlexPreprocess"}


def __getattr__(name: str):
    # the recipes import Geometry from this module, so they are re-exported lazily
    if name in _MOVED:
        from . import preprocess

        return getattr(preprocess, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Default pixel budget (width x height) above which an image is refused as a possible
#: decompression bomb. Raise it with ``CLIPLENS_MAX_PIXELS`` or ``max_pixels=``.
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold (about 9459 x 9459)


def max_pixels_budget() -> int:
    value = os.environ.get("CLIPLENS_MAX_PIXELS")
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        budget = int(value)
    except ValueError:
        raise ImageError(f"CLIPLENS_MAX_PIXELS must be an integer, got {value!r}") from None
    if budget <= 0:
        raise ImageError(f"CLIPLENS_MAX_PIXELS must be positive, got {budget}")
    return budget


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha (RGBA, LA, palette transparency) is composited over white; 16-bit and 32-bit
    greyscale are rescaled from their full range rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if image.mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        else:
            arr = arr / hi * 255.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | os.PathLike | Image.Image | np.ndarray, *, max_pixels: int | None = None) -> Image.Image:
    """Open an image file (or take a PIL image / HxWx3 uint8 array) as upright 8-bit RGB.

    Raises :class:`ImageError` with a one-line reason for missing, unreadable, truncated,
    non-image and over-budget files. EXIF orientation is applied.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ImageError(f"max_pixels must be a positive whole number, got {max_pixels!r}")
    budget = max_pixels if max_pixels is not None else max_pixels_budget()
    if isinstance(source, np.ndarray):
        if source.ndim in (2, 3) and min(source.shape[:2]) == 0:
            raise ImageError(f"an image array is empty (shape {source.shape})")
        if source.ndim == 2:
            source = np.stack([source] * 3, axis=-1)
        if source.ndim != 3 or source.shape[2] not in (3, 4):
            raise ImageError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {source.shape}")
        if source.dtype != np.uint8:
            raise ImageError(f"an image array must be uint8, got {source.dtype}")
        _check_budget((source.shape[1], source.shape[0]), budget, "the image array")
        return to_rgb(Image.fromarray(source))
    if isinstance(source, Image.Image):
        _check_budget(source.size, budget, "the image")
        try:
            source.load()
            return to_rgb(ImageOps.exif_transpose(source))
        except ValueError as exc:  # "Operation on closed image"
            raise ImageError(f"the PIL image cannot be read ({exc}); pass it before closing it") from None
        except (OSError, SyntaxError) as exc:
            raise ImageError(f"the PIL image is unreadable or truncated ({exc})") from None
    if not isinstance(source, (str, os.PathLike)):
        what = type(source).__name__
        hint = {
            "NoneType": "an image is None",
            "bytes": "an image given as bytes: open it with PIL.Image.open(io.BytesIO(data))",
            "Tensor": "an image given as a torch tensor: pass tensor.permute(1, 2, 0) as a uint8 numpy array",
        }.get(what, f"an image given as a {what}")
        raise ImageError(f"{hint}; images are paths, PIL images or HxWx3 uint8 arrays")
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as img:
            _check_budget(img.size, budget, str(path))
            img.load()
            rgb = to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"{path}: larger than the pixel budget of {budget} pixels; "
            "raise it with CLIPLENS_MAX_PIXELS or --max-pixels"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable or truncated image ({exc})") from None
    return rgb


def display_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) of an image shown with its longest side at most ``max_side`` (None or 0: as is)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    f = max_side / max(width, height)
    return max(1, round(width * f)), max(1, round(height * f))


def _check_budget(size: tuple[int, int], budget: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > budget:
        raise ImageError(
            f"{name}: {w}x{h} = {w * h} pixels is above the pixel budget of {budget}; "
            "raise it with CLIPLENS_MAX_PIXELS or --max-pixels"
        )


@dataclass(frozen=True)
class Geometry:
    """How an original image became the model input.

    The original (``width`` x ``height``) was resized by ``scale_x``/``scale_y`` and then
    the box ``crop`` = (left, top) of size ``input_size`` = (w, h) was cut out of the
    resized image (offsets may be negative when the input is padded). A point ``(x, y)`` in
    original pixel coordinates sits at ``(x * scale_x - left, y * scale_y - top)`` in the
    model input.
    """

    width: int
    height: int
    scale_x: float
    scale_y: float
    crop: tuple[float, float]
    input_size: tuple[int, int]

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "scale_x": self.scale_x,
            "scale_y": self.scale_y,
            "crop": list(self.crop),
            "input_size": list(self.input_size),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(
            int(d["width"]),
            int(d["height"]),
            float(d["scale_x"]),
            float(d["scale_y"]),
            (float(d["crop"][0]), float(d["crop"][1])),
            (int(d["input_size"][0]), int(d["input_size"][1])),
        )

    def resized(self, width: int, height: int) -> "Geometry":
        """The same model input seen from a copy of the original shown at ``width`` x ``height``
        (a display-size overlay): only the scales change."""
        return Geometry(
            int(width),
            int(height),
            self.scale_x * self.width / width,
            self.scale_y * self.height / height,
            self.crop,
            self.input_size,
        )

    def seen_mask(self) -> np.ndarray:
        """(height, width) bool: True where the pixel centre falls inside the model input."""
        u, v = self._input_coords()
        w_in, h_in = self.input_size
        return ((u >= 0) & (u < w_in))[None, :] & ((v >= 0) & (v < h_in))[:, None]

    def _input_coords(self) -> tuple[np.ndarray, np.ndarray]:
        xs = (np.arange(self.width) + 0.5) * self.scale_x - self.crop[0]
        ys = (np.arange(self.height) + 0.5) * self.scale_y - self.crop[1]
        return xs, ys

    def grid_to_original(self, grid_map: np.ndarray, dtype=np.float64) -> np.ndarray:
        """Bilinearly resample a (Gh, Gw) map, which tiles the model input evenly, onto the
        original image. Pixels the model never saw are NaN. ``dtype`` float32 halves the
        memory of a display map."""
        grid_map = np.asarray(grid_map, dtype=dtype)
        gh, gw = grid_map.shape
        u, v = self._input_coords()
        w_in, h_in = self.input_size
        # normalised coordinates in [-1, 1] across the input (align_corners=False convention)
        gx = torch.from_numpy((2.0 * u / w_in - 1.0).astype(dtype))
        gy = torch.from_numpy((2.0 * v / h_in - 1.0).astype(dtype))
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        src = torch.from_numpy(grid_map)[None, None]
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
        result = out.numpy()
        result[~self.seen_mask()] = np.nan
        return result

    def input_to_original_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A (x0, y0, x1, y1) box in model-input pixels, in original pixels."""
        x0, y0, x1, y1 = box
        left, top = self.crop
        return (
            (x0 + left) / self.scale_x,
            (y0 + top) / self.scale_y,
            (x1 + left) / self.scale_x,
            (y1 + top) / self.scale_y,
        )
