"""Loading open_clip models by name: model names, pretrained tags, the weights cache.

``"NAME/PRETRAINED"`` (a built-in config and a pretrained tag or a checkpoint file, e.g.
``ViT-B-16/openai``) or ``"hf-hub:ORG/REPO"``. Weights come from the local cache; they are
downloaded only when the hub is reachable and offline mode is off (:mod:`.hub`). The model
adapter itself is in :mod:`.open_clip`.

open_clip is an optional extra (it needs torchvision): nothing here imports it at module level,
and ``cliplens.adapters`` imports this file only when an ``"open_clip:..."`` spec is given.
"""

from __future__ import annotations

import os
import pickle

import torch

from ..errors import ModelLoadError
from . import hub

INSTALL_HINT = "pip install 'cliplens[open_clip]' (open-clip-torch with a torchvision that matches torch)"

#: the URL-downloaded weights' cache (OpenAI checkpoints), open_clip's default
OPENAI_CACHE = "~/.cache/clip"


def import_open_clip(spec: str = "open_clip"):
    """open_clip, or a one-line :class:`ModelLoadError` saying how to get it."""
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError(f"{spec}: open_clip is not installed; {INSTALL_HINT}") from None
    except (RuntimeError, OSError, AttributeError) as exc:
        # a torchvision that does not match torch fails at import time ("operator
        # torchvision::nms does not exist", a RuntimeError), or half-way through its modules
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{spec}: open_clip cannot be imported ({first}); {INSTALL_HINT}") from None
    return open_clip


def weights_cached(cfg: dict, cache_dir: str | None = None) -> bool:
    """Whether the weights an open_clip pretrained config (``file``, ``hf_hub`` or ``url``)
    points at are on disk already."""
    if "file" in cfg:
        return os.path.isfile(cfg["file"])
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        repo, filename = os.path.split(hf_hub)
        names = [filename] if filename else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            names.append(filename[: -len(".bin")] + ".safetensors")
        if hub.in_cache(repo, names):
            return True
    url = cfg.get("url", "")
    if url:
        root = cache_dir or os.path.expanduser(OPENAI_CACHE)
        return os.path.isfile(os.path.join(root, os.path.basename(url)))
    return False


def _checkpoint_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad or mismatched checkpoint raises: torch.load's unpickling errors,
    safetensors' own error, a missing or cut file, a state dict that does not fit the model."""
    errors: tuple[type[BaseException], ...] = (
        RuntimeError,
        ValueError,
        OSError,
        KeyError,
        EOFError,
        pickle.UnpicklingError,
    )
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        return errors
    return (*errors, SafetensorError)


def _resolve(open_clip, body: str, spec: str) -> tuple[str, str | None, dict]:
    """``(model name, pretrained, create_model keyword arguments)`` of a spec's body, after
    checking that the name exists and that the weights are cached or can be downloaded."""
    missing = (
        f"{spec}: {{what}}not in the local cache and the hub {{why}}; "
        "pass a local checkpoint: open_clip:NAME/path/to/weights.pt"
    )
    if body.startswith("hf-hub:"):
        repo = body[len("hf-hub:") :]
        if not hub.in_cache(repo, ["open_clip_config.json"]) or not hub.in_cache(
            repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        ):
            hub.require_hub(missing.replace("{what}", ""))
        return body, None, {}
    name, _, pretrained = body.partition("/")
    if name not in open_clip.list_models():
        raise ModelLoadError(f"{spec}: unknown open_clip model {name!r} (see open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not pretrained:
        hint = f" (tags: {', '.join(tags)})" if tags else ""
        raise ModelLoadError(
            f"{spec}: name the weights as open_clip:{name}/TAG or open_clip:{name}/FILE{hint}"
        )
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        if not os.path.isfile(pretrained):
            hint = f"; tags for {name}: {', '.join(tags)}" if tags else ""
            raise ModelLoadError(
                f"{spec}: {pretrained!r} is neither a pretrained tag nor a checkpoint file{hint}"
            )
        return name, pretrained, {}
    if not weights_cached(cfg):
        hub.require_hub(missing.replace("{what}", "weights "))
    # OpenAI-trained tags need QuickGELU, as their pretrained config says (open_clip itself only
    # warns when the name lacks ``-quickgelu``)
    return name, pretrained, {"force_quick_gelu": True} if cfg.get("quick_gelu", False) else {}


def load_open_clip(body: str, *, dtype: torch.dtype = torch.float32, tokenizer=None, spec: str | None = None):
    """An :class:`~cliplens.adapters.open_clip.OpenClipAdapter` for ``"NAME/PRETRAINED"`` or
    ``"hf-hub:ORG/REPO"`` (see the module docstring); ``spec`` is the name it goes by."""
    from .open_clip import OpenClipAdapter

    spec = spec or f"open_clip:{body}"
    open_clip = import_open_clip(spec)
    name, pretrained, kwargs = _resolve(open_clip, body, spec)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, precision="fp32", **kwargs)
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(name)
    except _checkpoint_errors() as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{spec}: could not load the open_clip model ({first})") from None
    model = model.to(dtype)
    return OpenClipAdapter(model, tokenizer, name=spec)
