"""Model adapters, one file per family, and :func:`load_model`, which picks the right one.

Accepted model specs:

- an adapter (returned as is) or a model object of a known family (transformers ``CLIPModel``,
  ``SiglipModel``, ``Siglip2Model``; open_clip ``CLIP`` / ``CustomTextCLIP`` ViT models);
- ``"shapes"``: the small CLIP shipped inside cliplens (trained on the shapes world);
- a local directory holding a transformers checkpoint (``config.json`` with model_type
  ``clip``, ``siglip`` or ``siglip2``);
- ``"open_clip:NAME/PRETRAINED"`` (e.g. ``open_clip:ViT-B-16/openai``; PRETRAINED a tag or a
  checkpoint file) or ``"open_clip:hf-hub:ORG/REPO"``: needs the open_clip extra; weights from
  the local cache, downloaded only when the hub is reachable (see docs/models.md);
- a Hugging Face hub name such as ``"openai/clip-vit-base-patch16"``: taken from the local
  cache first; downloaded only when the hub is reachable and offline mode is off.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import ModelLoadError
from .base import ModelAdapter, TextBatch, TokenLayout, TowerRun
from .hf_clip import HFClipAdapter, preprocess_from_config, read_processor_config
from .hf_siglip import HF_SIGLIP_TYPES, HFSiglip2Adapter, HFSiglipAdapter, load_hf_siglip, siglip_adapter

__all__ = [
    "ModelAdapter",
    "TextBatch",
    "TokenLayout",
    "TowerRun",
    "HFClipAdapter",
    "HFSiglip2Adapter",
    "HFSiglipAdapter",
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
ALIASES = {"shapes": ASSETS / "shapes-clip"}
DEFAULT_MODEL = "openai/clip-vit-base-patch16"

#: model_type values in config.json that the transformers CLIP adapter takes
HF_CLIP_TYPES = {"clip"}


def adapt(model, tokenizer=None, *, name: str | None = None, preprocess=None) -> ModelAdapter:
    """Wrap a model object of a known family in its adapter."""
    if isinstance(model, ModelAdapter):
        return model
    if HFClipAdapter.matches(model):
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
        return HFClipAdapter(model, tokenizer, preprocess=preprocess, name=name)
    if HFSiglipAdapter.matches(model) or HFSiglip2Adapter.matches(model):
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
        return siglip_adapter(model, tokenizer, preprocess=preprocess, name=name)
    if _is_open_clip_model(model):
        from .open_clip import adapt_open_clip

        return adapt_open_clip(model, tokenizer, preprocess=preprocess, name=name)
    raise ModelLoadError(
        f"cannot explain a {type(model).__name__}: cliplens supports transformers CLIPModel and SiglipModel "
        "and open_clip CLIP models (and the families listed by `cliplens models`)"
    )


def _is_open_clip_model(model) -> bool:
    """True for open_clip model objects; never imports open_clip (a model object of it can only
    exist once it has been imported)."""
    import sys

    return "open_clip" in sys.modules and type(model).__module__.split(".")[0] == "open_clip"


def _tokenizer_for(model):
    source = getattr(model.config, "_name_or_path", "")
    if source:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError):
            pass
    raise ModelLoadError("this model object carries no tokenizer; pass tokenizer= (e.g. CLIPTokenizer.from_pretrained(...))")


def load_model(spec="shapes", *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, tokenizer=None) -> ModelAdapter:
    """Load a CLIP-family model for explaining. See the module docstring for ``spec``."""
    if not isinstance(spec, (str, os.PathLike)):
        adapter = adapt(spec, tokenizer)
        return adapter
    text = str(spec)
    if text in ALIASES:
        path = ALIASES[text]
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the embedded model '{text}' is missing from this install ({path})")
        adapter = _load_hf_dir(path, dtype, name=text)
    elif Path(text).expanduser().exists():
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{path}: a model must be a checkpoint directory (with config.json), not a file")
        adapter = _load_hf_dir(path, dtype, name=str(path))
    elif text.startswith(("open_clip:", "open-clip:")):
        from .open_clip import load_open_clip

        adapter = load_open_clip(text.split(":", 1)[1], dtype=dtype, tokenizer=tokenizer, spec=text)
    else:
        adapter = _load_hub(text, dtype)
    if device is not None:
        adapter.model.to(device)
    return adapter


def _load_hf_dir(path: Path, dtype: torch.dtype, name: str) -> ModelAdapter:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path}: not a CLIP checkpoint (no config.json)")
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: unreadable config ({exc})") from None
    if model_type in HF_SIGLIP_TYPES:
        return load_hf_siglip(path, dtype, name, processor_config=read_processor_config(path))
    if model_type not in HF_CLIP_TYPES:
        raise ModelLoadError(f"{path}: not a CLIP or SigLIP checkpoint (model_type is {model_type!r})")
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: could not load the CLIP checkpoint ({str(exc).splitlines()[0]})") from None
    pre = preprocess_from_config(read_processor_config(path), model.config.vision_config.image_size)
    return HFClipAdapter(model, tokenizer, preprocess=pre, name=name)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, dtype: torch.dtype) -> ModelAdapter:
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    not_here = (
        f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached"
        "; pass a local checkpoint directory (--model ./my-clip) or use the embedded model (--model shapes)"
    )
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
        local = True
    except (OSError, ValueError):
        if _offline():
            raise ModelLoadError(not_here.replace("cannot be reached", "is off (offline mode)")) from None
        if not _hub_reachable():
            raise ModelLoadError(not_here) from None
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model '{name}': {str(exc).splitlines()[0]}") from None
        local = False
    if getattr(config, "model_type", None) in HF_SIGLIP_TYPES:
        processor_config = _cached_processor_config(name)
        return load_hf_siglip(name, dtype, name, local_files_only=local, processor_config=processor_config)
    if getattr(config, "model_type", None) not in HF_CLIP_TYPES:
        raise ModelLoadError(
            f"model '{name}' is not a CLIP or SigLIP checkpoint (model_type is {config.model_type!r})"
        )
    try:
        model = CLIPModel.from_pretrained(name, dtype=dtype, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model '{name}': {str(exc).splitlines()[0]}") from None
    pre = preprocess_from_config(_cached_processor_config(name), model.config.vision_config.image_size)
    return HFClipAdapter(model, tokenizer, preprocess=pre, name=name)


def _cached_processor_config(name: str) -> dict | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "preprocessor_config.json")
        if isinstance(cached, str):
            return read_processor_config(Path(cached).parent)
    except ImportError:  # pragma: no cover
        pass
    return None
