"""What every dataset reader shares: the item and dataset types, the limit check, the one-line
error of a kind, and the file helpers (images, mask PNGs, required files and folders).

The conventions every reader follows are in :mod:`cliplens.eval.datasets`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...errors import DatasetError

__all__ = [
    "IMAGE_SUFFIXES",
    "EvalDataset",
    "EvalItem",
    "check_limit",
    "fail",
    "find_image",
    "open_rgb",
    "read_mask",
    "require_dir",
    "require_file",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def fail(kind: str, message: str) -> DatasetError:
    """The one-line error of a reader: ``"KIND: message"``."""
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
        self.limit = check_limit(kind, limit)
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


def check_limit(kind: str, limit: int | None) -> int | None:
    """``limit`` if it is None or a non-negative int, else a DatasetError."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise fail(kind, f"limit must be a non-negative integer or None, got {limit!r}")
    return limit


# ----------------------------------------------------------------------------- file helpers


def open_rgb(kind: str, path: Path) -> Image.Image:
    """An image file as RGB (stored orientation; transparency on white); DatasetError if unreadable."""
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
        raise fail(kind, f"image not found: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise fail(kind, f"cannot read image {path}: {e}") from None


def read_mask(kind: str, path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """A mask PNG as bool (H, W): ``value != 0`` (colour PNGs: any of R, G, B non-zero)."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except FileNotFoundError:
        raise fail(kind, f"mask not found: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise fail(kind, f"cannot read mask {path}: {e}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].any(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    mask = arr != 0
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise fail(kind, f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    return mask


def require_file(kind: str, path: Path, what: str = "file") -> None:
    """DatasetError unless ``path`` is an existing file."""
    if not path.exists():
        raise fail(kind, f"{what} not found: {path}")
    if not path.is_file():
        raise fail(kind, f"{what} is not a file: {path}")


def require_dir(kind: str, path: Path, what: str = "folder") -> None:
    """DatasetError unless ``path`` is an existing folder."""
    if not path.exists():
        raise fail(kind, f"{what} not found: {path}")
    if not path.is_dir():
        raise fail(kind, f"{what} is not a folder: {path}")


def find_image(folder: Path, stem: str, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> Path | None:
    """``folder/stem.SUFFIX`` for the first suffix that exists (either case), else None."""
    for suffix in suffixes:
        for s in (suffix, suffix.upper()):
            p = folder / f"{stem}{s}"
            if p.is_file():
                return p
    return None
