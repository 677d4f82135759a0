"""The model families cliplens explains, as one table that :func:`~cliplens.adapters.adapt` and
:func:`~cliplens.adapters.load_model` loop over.

A family says which model objects it takes (``matches``, which must import nothing: a model
object of a library can only exist once that library is imported), how it wraps one (``adapt``),
which checkpoints it loads (``model_types``: ``config.json`` model_type values of transformers
checkpoints; ``prefixes``: spec prefixes such as ``"open_clip:"``) and how (``load``). A new
family is one adapter file plus one entry here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ModelLoadError
from ..preprocess import Preprocess
from .base import Checkpoint, ModelAdapter
from .hf_blip import HF_BLIP_TYPES, HFBlipITMAdapter
from .hf_blip2 import HF_BLIP2_TYPES, HFBlip2ITMAdapter
from .hf_blip_itc import BLIP_ITC_PREFIXES, HFBlipITCAdapter
from .hf_bridgetower import HF_BRIDGETOWER_TYPES, HFBridgeTowerITMAdapter
from .hf_clip import HF_CLIP_TYPES, HFClipAdapter
from .hf_detr import HF_DETR_TYPES, HFDetrAdapter
from .hf_lxmert import HF_LXMERT_TYPES, HFLxmertAdapter
from .hf_siglip import HF_SIGLIP_TYPES, HFSiglip2Adapter, HFSiglipAdapter, siglip_adapter
from .hf_vilt import HF_VILT_TYPES, HFViltITMAdapter


@dataclass(frozen=True)
class Family:
    """One model family: how its model objects are recognised, wrapped and loaded."""

    name: str
    matches: Callable[[object], bool]
    adapt: Callable[..., ModelAdapter]  # (model, tokenizer, *, preprocess, name) -> adapter
    load: Callable[[Checkpoint], ModelAdapter]
    model_types: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()


# ---- transformers families ----------------------------------------------------------------------


def _tokenizer_for(model):
    """The tokenizer saved next to a transformers model's checkpoint, if it names one."""
    source = getattr(model.config, "_name_or_path", "")
    if source:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError):
            pass
    raise ModelLoadError(
        "this model object carries no tokenizer; pass tokenizer= (e.g. CLIPTokenizer.from_pretrained(...))"
    )


def _hf_clip_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    return HFClipAdapter(
        model, tokenizer if tokenizer is not None else _tokenizer_for(model), preprocess=preprocess, name=name
    )


def _siglip_matches(model) -> bool:
    return HFSiglip2Adapter.matches(model) or HFSiglipAdapter.matches(model)


def _siglip_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    return siglip_adapter(
        model, tokenizer if tokenizer is not None else _tokenizer_for(model), preprocess=preprocess, name=name
    )


def _blip_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    return HFBlipITMAdapter(
        model, tokenizer if tokenizer is not None else _tokenizer_for(model), preprocess=preprocess, name=name
    )


def _blip_itc_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    return HFBlipITCAdapter(
        model, tokenizer if tokenizer is not None else _tokenizer_for(model), preprocess=preprocess, name=name
    )


def _blip2_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    return HFBlip2ITMAdapter(
        model, tokenizer if tokenizer is not None else _tokenizer_for(model), preprocess=preprocess, name=name
    )


def _vilt_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    return HFViltITMAdapter(
        model, tokenizer if tokenizer is not None else _tokenizer_for(model), preprocess=preprocess, name=name
    )


def _bridgetower_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    return HFBridgeTowerITMAdapter(
        model, tokenizer if tokenizer is not None else _tokenizer_for(model), preprocess=preprocess, name=name
    )


def _detr_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    # DETR has no text model: its prompts are class names, no tokenizer is taken
    return HFDetrAdapter(model, preprocess=preprocess, name=name)


def _lxmert_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    # LXMERT reads region features, never pixels: there is no image recipe to take
    return HFLxmertAdapter(model, tokenizer if tokenizer is not None else _tokenizer_for(model), name=name)


# ---- open_clip (an optional extra: imported only for its model objects or specs) ----------------


def _open_clip_matches(model) -> bool:
    """True for open_clip model objects; never imports open_clip."""
    return "open_clip" in sys.modules and type(model).__module__.split(".")[0] == "open_clip"


def _open_clip_adapt(model, tokenizer=None, *, preprocess: Preprocess | None = None, name: str | None = None):
    from .open_clip import OpenClipAdapter

    return OpenClipAdapter(model, tokenizer, preprocess=preprocess, name=name)


def _open_clip_load(checkpoint: Checkpoint) -> ModelAdapter:
    from .open_clip_load import load_open_clip

    return load_open_clip(
        checkpoint.source, dtype=checkpoint.dtype, tokenizer=checkpoint.tokenizer, spec=checkpoint.name
    )


#: every family, in the order model objects are tried
FAMILIES: list[Family] = [
    Family("hf-clip", HFClipAdapter.matches, _hf_clip_adapt, HFClipAdapter.load, frozenset(HF_CLIP_TYPES)),
    Family(
        "hf-siglip",  # SiglipModel and Siglip2Model: one loader picks the class from the config
        _siglip_matches,
        _siglip_adapt,
        HFSiglipAdapter.load,
        frozenset(HF_SIGLIP_TYPES),
    ),
    Family(
        "hf-blip-itm",  # fusion: image and text scored together (adapters/fusion.py)
        HFBlipITMAdapter.matches,
        _blip_adapt,
        HFBlipITMAdapter.load,
        frozenset(HF_BLIP_TYPES),
    ),
    Family(
        "hf-blip-itc",  # BLIP ITM checkpoints in their contrastive mode, a dual encoder; by spec
        # prefix only ("blip-itc:..."): a BlipForImageTextRetrieval object stays hf-blip-itm's
        HFBlipITCAdapter.matches,
        _blip_itc_adapt,
        HFBlipITCAdapter.load,
        prefixes=BLIP_ITC_PREFIXES,
    ),
    Family(
        "hf-blip2-itm",  # fusion: ViT, then a Q-Former over query tokens and text (adapters/hf_blip2.py)
        HFBlip2ITMAdapter.matches,
        _blip2_adapt,
        HFBlip2ITMAdapter.load,
        frozenset(HF_BLIP2_TYPES),
    ),
    Family(
        "hf-vilt-itm",  # fusion, one joint self-attention stack (adapters/hf_vilt.py)
        HFViltITMAdapter.matches,
        _vilt_adapt,
        HFViltITMAdapter.load,
        frozenset(HF_VILT_TYPES),
    ),
    Family(
        "hf-lxmert",  # fusion, co-attention over region features (adapters/hf_lxmert.py)
        HFLxmertAdapter.matches,
        _lxmert_adapt,
        HFLxmertAdapter.load,
        frozenset(HF_LXMERT_TYPES),
    ),
    Family(
        "hf-bridgetower-itm",  # fusion, co-attention fed by link towers (adapters/hf_bridgetower.py)
        HFBridgeTowerITMAdapter.matches,
        _bridgetower_adapt,
        HFBridgeTowerITMAdapter.load,
        frozenset(HF_BRIDGETOWER_TYPES),
    ),
    Family(
        "hf-detr",  # fusion, encoder-decoder detector; prompts are class names (adapters/hf_detr.py)
        HFDetrAdapter.matches,
        _detr_adapt,
        HFDetrAdapter.load,
        frozenset(HF_DETR_TYPES),
    ),
    Family(
        "open_clip",
        _open_clip_matches,
        _open_clip_adapt,
        _open_clip_load,
        prefixes=("open_clip:", "open-clip:"),
    ),
]


def family_of_model(model) -> Family | None:
    """The family whose ``matches`` takes ``model``, or None."""
    return next((f for f in FAMILIES if f.matches(model)), None)


def family_of_type(model_type: str | None) -> Family | None:
    """The family that loads transformers checkpoints of ``model_type``, or None."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of_spec(spec: str) -> tuple[Family, str] | None:
    """``(family, rest of the spec)`` for a spec with a family prefix, or None."""
    for family in FAMILIES:
        for prefix in family.prefixes:
            if spec.startswith(prefix):
                return family, spec[len(prefix) :]
    return None
