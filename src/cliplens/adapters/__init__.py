"""Model adapters, one file per family, and :func:`load_model`, which picks the right one.

Accepted model specs:

- an adapter (returned as is) or a model object of a known family (transformers ``CLIPModel``,
  ``SiglipModel``, ``Siglip2Model``; open_clip ``CLIP`` / ``CustomTextCLIP`` ViT models);
- ``"shapes"``: the small CLIP shipped inside cliplens (trained on the shapes world);
- a local directory holding a transformers checkpoint (``config.json`` with model_type
  ``clip``, ``siglip``, ``siglip2``, ``blip``, ``vilt``, ``lxmert``, ``bridgetower`` or ``detr``);
- ``"open_clip:NAME/PRETRAINED"`` (e.g. ``open_clip:ViT-B-16/openai``; PRETRAINED a tag or a
  checkpoint file) or ``"open_clip:hf-hub:ORG/REPO"``: needs the open_clip extra; weights from
  the local cache, downloaded only when the hub is reachable (see docs/models.md);
- a Hugging Face hub name such as ``"openai/clip-vit-base-patch16"``: taken from the local
  cache first; downloaded only when the hub is reachable and offline mode is off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from . import hub
from .base import Checkpoint, ModelAdapter, TextBatch, TokenLayout, TowerRun
from .families import FAMILIES, Family, family_of_model, family_of_spec, family_of_type
from .hf_clip import HF_CLIP_TYPES, HFClipAdapter, preprocess_from_config  # noqa: F401
from .hf_siglip import HF_SIGLIP_TYPES, HFSiglip2Adapter, HFSiglipAdapter, load_hf_siglip, siglip_adapter  # noqa: F401
from .hub import read_processor_config  # noqa: F401 (its old import path)

__all__ = [
    "ModelAdapter",
    "TextBatch",
    "TokenLayout",
    "TowerRun",
    "HFClipAdapter",
    "HFSiglip2Adapter",
    "HFSiglipAdapter",
    "FAMILIES",
    "Family",
    "load_model",
    "adapt",
]


def __getattr__(name):
    # open_clip (and with it torchvision) is an optional extra: its adapter is imported on demand
    # only (and kept out of __all__, so that a star import never pulls it in)
    if name == "OpenClipAdapter":
        from .open_clip import OpenClipAdapter

        return OpenClipAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ASSETS = Path(__file__).resolve().parent.parent / "assets"
ALIASES = {"shapes": ASSETS / "shapes-clip", "shapes-blip": ASSETS / "shapes-blip"}
DEFAULT_MODEL = "openai/clip-vit-base-patch16"


def adapt(model, tokenizer=None, *, name: str | None = None, preprocess=None) -> ModelAdapter:
    """Wrap a model object of a known family in its adapter (an adapter is returned as is)."""
    if isinstance(model, ModelAdapter):
        return model
    family = family_of_model(model)
    if family is None:
        raise ModelLoadError(
            f"cannot explain a {type(model).__name__}: cliplens supports transformers CLIPModel, SiglipModel, "
            "BlipForImageTextRetrieval, Blip2ForImageTextRetrieval, ViltForImageAndTextRetrieval, LxmertForPreTraining, "
            "LxmertForQuestionAnswering, BridgeTowerForImageAndTextRetrieval, DetrForObjectDetection and open_clip CLIP models (and the families listed by `cliplens models`)"
        )
    return family.adapt(model, tokenizer, preprocess=preprocess, name=name)


def load_model(
    spec="shapes",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
) -> ModelAdapter:
    """Load a CLIP-family model for explaining. See the module docstring for ``spec``."""
    if not isinstance(spec, (str, os.PathLike)):
        return adapt(spec, tokenizer)
    text = str(spec)
    prefixed = family_of_spec(text)
    if text in ALIASES:
        path = ALIASES[text]
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the embedded model '{text}' is missing from this install ({path})")
        adapter = _load_directory(path, text, dtype, tokenizer)
    elif Path(text).expanduser().exists():
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ModelLoadError(
                f"{path}: a model must be a checkpoint directory (with config.json), not a file"
            )
        adapter = _load_directory(path, str(path), dtype, tokenizer)
    elif prefixed is not None:
        family, rest = prefixed
        adapter = family.load(Checkpoint(rest, text, dtype, tokenizer))
    else:
        adapter = _load_hub(text, dtype, tokenizer)
    if device is not None:
        adapter.model.to(device)
    return adapter


def _load_directory(path: Path, name: str, dtype: torch.dtype, tokenizer) -> ModelAdapter:
    """A transformers checkpoint directory, by the model_type in its config.json."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path}: not a CLIP checkpoint (no config.json)")
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: unreadable config ({exc})") from None
    family = family_of_type(model_type)
    if family is None:
        raise ModelLoadError(f"{path}: not a CLIP, SigLIP, BLIP, BLIP-2, ViLT, LXMERT or BridgeTower image-text checkpoint, nor a DETR detector (model_type is {model_type!r})")
    checkpoint = Checkpoint(
        str(path), name, dtype, tokenizer, processor_config=hub.read_processor_config(path)
    )
    return family.load(checkpoint)


def _load_hub(name: str, dtype: torch.dtype, tokenizer) -> ModelAdapter:
    """A hub name: from the local cache, else downloaded when the hub can be used."""
    config, local = hub.hub_config(name)
    model_type = getattr(config, "model_type", None)
    family = family_of_type(model_type)
    if family is None:
        raise ModelLoadError(
            f"model '{name}' is not a CLIP, SigLIP, BLIP, BLIP-2, ViLT, LXMERT or BridgeTower image-text checkpoint, nor a DETR detector (model_type is {model_type!r})"
        )
    checkpoint = Checkpoint(
        name,
        name,
        dtype,
        tokenizer,
        local_files_only=local,
        processor_config=hub.cached_processor_config(name),
    )
    return family.load(checkpoint)
