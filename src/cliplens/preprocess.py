"""Preprocessing recipes: how an image becomes a model input, and the :class:`Geometry` of it.

Each recipe is a frozen dataclass called as ``recipe(image, resize=..., patch_size=...)`` that
returns ``(pixels (3, h, w) float32, Geometry)``. ``resize="model"`` follows the checkpoint's
own processor; ``resize="full"`` is common to all recipes: the shortest edge to ``size`` and the
other side to whole patches, nothing cropped. A recipe only decides how the image is resized and
cut; turning the result into normalised pixels is one shared step (:meth:`Preprocess.to_tensor`).

- :class:`Preprocess`: resize the shortest edge, centre crop (CLIP, open_clip ``shortest``);
- :class:`SquashPreprocess`: resize to the model size without keeping the aspect ratio (SigLIP,
  open_clip ``squash``);
- :class:`SquashCropPreprocess`: resize to ``{height, width}``, then (optionally) centre crop
  (CLIP checkpoints whose processor's ``size`` is a height and width);
- :class:`NaFlexPreprocess`: keep the aspect ratio, at most ``max_patches`` whole patches
  (SigLIP 2).

The ``*_from_config`` readers build them from a checkpoint's ``preprocessor_config.json`` (or an
open_clip ``preprocess_cfg``), with each family's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .images import Geometry

#: how an image reaches the model: the checkpoint's own recipe, or the whole image
RESIZE_MODES = ("model", "full")


def check_resize(resize) -> str:
    """``resize`` itself when it is one of :data:`RESIZE_MODES`; else a one-line InputError."""
    if resize not in RESIZE_MODES:
        raise InputError(f"resize must be 'model' or 'full', got {resize!r}")
    return resize

#: Default limit on the patch tokens of one ``resize="full"`` input (a 64 x 64 grid). Attention
#: and the relevance maps grow with its square. Raise it with ``CLIPLENS_MAX_TOKENS`` (the CLI's
#: ``--max-tokens``).
DEFAULT_MAX_TOKENS = 4096


def max_tokens_budget() -> int:
    """The patch-token limit of one image input: ``CLIPLENS_MAX_TOKENS`` or the default."""
    import os

    value = os.environ.get("CLIPLENS_MAX_TOKENS")
    if value is None:
        return DEFAULT_MAX_TOKENS
    try:
        budget = int(value)
    except ValueError:
        raise InputError(f"CLIPLENS_MAX_TOKENS must be an integer, got {value!r}") from None
    if budget <= 0:
        raise InputError(f"CLIPLENS_MAX_TOKENS must be positive, got {budget}")
    return budget


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

#: open_clip's interpolation names
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """Resize-shortest-edge, centre-crop, normalise: the CLIP recipe, with its geometry.

    ``resize="model"`` follows the checkpoint's processor (shortest edge to ``size``, centre
    crop ``crop``); ``resize="full"`` keeps the whole image: the shortest edge goes to
    ``size`` and the other side to the nearest multiple of the patch size, so nothing is
    cropped (the tower then runs at a non-square grid with interpolated position embeddings).
    """

    size: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.BICUBIC
    do_center_crop: bool = True

    def __call__(
        self, image: Image.Image, *, resize: str = "model", patch_size: int | None = None
    ) -> tuple[torch.Tensor, Geometry]:
        if check_resize(resize) == "full":
            seen, geometry = self._full(image, patch_size)
        else:
            seen, geometry = self._model_input(image)
        return self.to_tensor(seen), geometry

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """(3, h, w) float32 pixels of an RGB image already at the input size, normalised by
        this recipe's mean and std: the one normalising step of every recipe."""
        arr = np.asarray(image, dtype=np.float32) / 255.0
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())

    def _model_input(self, image: Image.Image) -> tuple[Image.Image, Geometry]:
        """The checkpoint's own resize (and crop): the input image and its geometry."""
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        resized = image.resize((new_w, new_h), resample=self.resample)
        crop_h, crop_w = self.crop if self.do_center_crop else (new_h, new_w)
        top = (new_h - crop_h) // 2
        left = (new_w - crop_w) // 2
        # PIL crop pads with black outside the image, which is what a crop larger than the
        # resized image means (torchvision pads the same way).
        cropped = resized.crop((left, top, left + crop_w, top + crop_h))
        return cropped, Geometry(w, h, new_w / w, new_h / h, (float(left), float(top)), (crop_w, crop_h))

    def _full(self, image: Image.Image, patch_size: int | None) -> tuple[Image.Image, Geometry]:
        """The whole image: shortest edge to ``size``, each side to whole patches, no crop."""
        if patch_size is None:
            raise ValueError("resize='full' needs the patch size")
        w, h = image.size
        factor = self.size / min(w, h)
        new_w = max(patch_size, int(round(w * factor / patch_size)) * patch_size)
        new_h = max(patch_size, int(round(h * factor / patch_size)) * patch_size)
        tokens, budget = (new_w // patch_size) * (new_h // patch_size), max_tokens_budget()
        if tokens > budget:  # checked before resizing: a thin image would become a huge one
            raise InputError(
                f"resize='full' turns this {w}x{h} image into {new_w}x{new_h} pixels = {tokens} patch tokens, "
                f"above the limit of {budget}; raise it with CLIPLENS_MAX_TOKENS or --max-tokens, "
                "or use resize='model'"
            )
        resized = image.resize((new_w, new_h), resample=self.resample)
        return resized, Geometry(w, h, new_w / w, new_h / h, (0.0, 0.0), (new_w, new_h))


@dataclass(frozen=True)
class SquashPreprocess(Preprocess):
    """``resize="model"`` resizes the whole image to ``crop`` (height, width) without keeping the
    aspect ratio and without cropping, as SigLIP's processor (and open_clip's ``squash`` resize
    mode) do; ``resize="full"`` is the common aspect-keeping recipe of :class:`Preprocess`."""

    def _model_input(self, image: Image.Image) -> tuple[Image.Image, Geometry]:
        w, h = image.size
        crop_h, crop_w = self.crop
        resized = image.resize((crop_w, crop_h), resample=self.resample)
        return resized, Geometry(w, h, crop_w / w, crop_h / h, (0.0, 0.0), (crop_w, crop_h))


@dataclass(frozen=True)
class SquashCropPreprocess(Preprocess):
    """A CLIP processor whose ``size`` is ``{height, width}``: ``resize="model"`` resizes the whole
    image to ``resize_to`` (height, width) without keeping the aspect ratio, then, when
    ``do_center_crop``, cuts the centre ``crop`` (height, width) out of it, exactly as
    ``CLIPImageProcessor`` does with such a config; ``resize="full"`` is the common recipe."""

    resize_to: tuple[int, int] = (224, 224)  # (height, width)

    def _model_input(self, image: Image.Image) -> tuple[Image.Image, Geometry]:
        w, h = image.size
        new_h, new_w = self.resize_to
        resized = image.resize((new_w, new_h), resample=self.resample)
        crop_h, crop_w = self.crop if self.do_center_crop else (new_h, new_w)
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        cropped = resized.crop((left, top, left + crop_w, top + crop_h))
        return cropped, Geometry(w, h, new_w / w, new_h / h, (float(left), float(top)), (crop_w, crop_h))


def size_for_max_patches(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """SigLIP 2's NaFlex size: the aspect ratio kept, each side rounded up to whole patches, the
    largest such size with at most ``max_patches`` patches (a bisection on the scale, as the
    transformers image processor does it)."""

    def side(scale: float, size: int) -> int:
        return max(patch, math.ceil(size * scale / patch) * patch)

    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        if (side(mid, height) // patch) * (side(mid, width) // patch) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


@dataclass(frozen=True)
class NaFlexPreprocess(Preprocess):
    """SigLIP 2 (NaFlex): ``resize="model"`` keeps the aspect ratio and resizes to the largest
    whole-patch size with at most ``max_patches`` patches (no crop, no padding patches);
    ``resize="full"`` is the common shortest-edge recipe of :class:`Preprocess`."""

    patch: int = 16
    max_patches: int = 256

    def _model_input(self, image: Image.Image) -> tuple[Image.Image, Geometry]:
        w, h = image.size
        new_h, new_w = size_for_max_patches(h, w, self.patch, self.max_patches)
        resized = image.resize((new_w, new_h), resample=self.resample)
        return resized, Geometry(w, h, new_w / w, new_h / h, (0.0, 0.0), (new_w, new_h))


# ---- recipes from checkpoint configs --------------------------------------------------------------


def preprocess_from_config(processor_config: dict | None, image_size: int) -> Preprocess:
    """The CLIP image recipe from a ``preprocessor_config.json`` dict (or OpenAI defaults), as
    ``CLIPImageProcessor`` reads it: ``size: {shortest_edge}`` (or a plain int) resizes the
    shortest edge; ``size: {height, width}`` squashes to that size; either is followed by the
    centre crop ``crop_size`` when ``do_center_crop`` (true unless the config says otherwise)."""
    cfg = processor_config or {}
    size = cfg.get("size", image_size)
    squash = None
    if isinstance(size, dict):
        if size.get("shortest_edge"):
            size = size["shortest_edge"]
        elif size.get("height") and size.get("width"):
            squash = (int(size["height"]), int(size["width"]))
            size = min(squash)
        else:
            size = size.get("height") or size.get("width") or image_size
    crop = cfg.get("crop_size", size)
    if isinstance(crop, dict):
        crop = (int(crop.get("height", size)), int(crop.get("width", size)))
    else:
        crop = (int(crop), int(crop))
    common = {
        "size": int(size),
        "crop": crop,
        "mean": tuple(cfg.get("image_mean", OPENAI_MEAN)),
        "std": tuple(cfg.get("image_std", OPENAI_STD)),
        "resample": int(cfg.get("resample", Image.BICUBIC)),
        "do_center_crop": bool(cfg.get("do_center_crop", True)),
    }
    if squash is not None:
        return SquashCropPreprocess(**common, resize_to=squash)
    return Preprocess(**common)


def squash_preprocess_from_config(
    processor_config: dict | None, image_size: int, mean: tuple, std: tuple
) -> Preprocess:
    """A squash-to-size recipe (no crop) from a ``preprocessor_config.json`` dict: ``size`` as
    ``{height, width}``, ``{shortest_edge}`` or an int; ``mean``/``std``: the family's defaults."""
    cfg = processor_config or {}
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        height = int(size.get("height") or size.get("shortest_edge") or image_size)
        width = int(size.get("width") or size.get("shortest_edge") or image_size)
    else:
        height = width = int(size)
    return SquashPreprocess(
        size=min(height, width),
        crop=(height, width),
        mean=tuple(cfg.get("image_mean", mean)),
        std=tuple(cfg.get("image_std", std)),
        resample=int(cfg.get("resample", Image.BICUBIC)),
        do_center_crop=False,
    )


def siglip_preprocess_from_config(processor_config: dict | None, image_size: int) -> Preprocess:
    """The SigLIP image recipe from a ``preprocessor_config.json`` dict (or SigLIP defaults)."""
    return squash_preprocess_from_config(processor_config, image_size, SIGLIP_MEAN, SIGLIP_STD)


def naflex_preprocess_from_config(processor_config: dict | None, patch: int, num_patches: int) -> Preprocess:
    """The SigLIP 2 recipe from a ``preprocessor_config.json`` dict (or its defaults)."""
    cfg = processor_config or {}
    max_patches = int(cfg.get("max_num_patches", num_patches))
    side = int(round(math.sqrt(max_patches))) * patch
    return NaFlexPreprocess(
        size=side,
        crop=(side, side),
        mean=tuple(cfg.get("image_mean", SIGLIP_MEAN)),
        std=tuple(cfg.get("image_std", SIGLIP_STD)),
        resample=int(cfg.get("resample", Image.BILINEAR)),
        do_center_crop=False,
        patch=int(cfg.get("patch_size", patch)),
        max_patches=max_patches,
    )


def open_clip_preprocess_from_config(
    preprocess_cfg: dict | None, image_size: int | tuple[int, int]
) -> Preprocess:
    """The image recipe of an open_clip ``preprocess_cfg`` dict (``size``, ``mean``, ``std``,
    ``interpolation``, ``resize_mode``; OpenAI defaults). ``resize_mode="squash"`` gives a
    :class:`SquashPreprocess`; ``"shortest"`` the CLIP recipe, which also stands in for
    ``"longest"`` (resize-and-pad)."""
    cfg = dict(preprocess_cfg or {})
    size = cfg.get("size", image_size)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    resample = RESAMPLE.get(str(cfg.get("interpolation", "bicubic")), Image.BICUBIC)
    mean = tuple(cfg.get("mean") or OPENAI_MEAN)
    std = tuple(cfg.get("std") or OPENAI_STD)
    if cfg.get("resize_mode", "shortest") == "squash":
        return SquashPreprocess(
            size=min(h, w), crop=(h, w), mean=mean, std=std, resample=resample, do_center_crop=False
        )
    return Preprocess(size=min(h, w), crop=(h, w), mean=mean, std=std, resample=resample, do_center_crop=True)
