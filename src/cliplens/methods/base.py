"""The method interface and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..adapters.base import ImageBatch, ModelAdapter, TextBatch, TowerRun
from ..errors import InputError
from ..targets import Target


@dataclass
class MethodResult:
    """Raw output of a method for B images x P prompts, in the tower's own units.

    image_maps:   (B, P, Gh, Gw) or None
    token_scores: (B, P, T) with NaN on padding, or None
    extras:       named arrays a method exposes besides the maps (per-layer maps, ...)
    logits, probs, target_values: (B, P)
    """

    image_maps: torch.Tensor | None
    token_scores: torch.Tensor | None
    logits: torch.Tensor
    probs: torch.Tensor
    target_values: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`compute`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `cliplens methods`
    reference: ClassVar[str] = ""
    towers: ClassVar[tuple[str, ...]] = ("image", "text")  # towers it gives a map for
    options: ClassVar[dict[str, str]] = {}  # option name -> one-line help

    def compute(
        self,
        adapter: ModelAdapter,
        images: ImageBatch,
        texts: TextBatch,
        target: Target,
        *,
        towers: tuple[str, ...],
        **options,
    ) -> MethodResult:
        raise NotImplementedError

    def check_options(self, options: dict) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise InputError(f"method {self.name!r} has no option {sorted(unknown)[0]!r} (options: {known})")


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError("a method needs a name")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise InputError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def list_methods() -> dict[str, str]:
    """name -> one-line description, in registration order."""
    return {name: cls.summary for name, cls in REGISTRY.items()}


# ---- helpers shared by methods -------------------------------------------------------------


def grid_maps(run: TowerRun, token_values: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P or B, n) per-token values of an image tower -> (B, P, Gh, Gw) patch maps."""
    gh, gw = run.layout.grid
    vals = token_values[:, run.layout.patches]
    if vals.shape[0] == B:
        vals = vals[:, None].expand(B, P, -1)
    return vals.reshape(B, P, gh, gw)


def token_rows(run: TowerRun, token_values: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P or P, T) per-token values of a text tower -> (B, P, T), NaN on padding."""
    vals = token_values.masked_fill(~run.layout.valid, float("nan"))
    if vals.shape[0] == P:
        vals = vals[None].expand(B, P, -1)
    return vals.reshape(B, P, -1)


def resolve_layer(start_layer: int | None, num_layers: int, default: int) -> int:
    """A block index from a user option: None -> default, negative counts from the end."""
    if start_layer is None:
        return default
    idx = start_layer + num_layers if start_layer < 0 else start_layer
    if not 0 <= idx < num_layers:
        raise InputError(f"layer {start_layer} is out of range for a tower with {num_layers} blocks")
    return idx


def one_hot_rows(run: TowerRun) -> torch.Tensor:
    """(rows, n) one-hot rows at each row's readout token."""
    rows = run.layout.readout.shape[0]
    n = run.layout.valid.shape[1]
    dtype = run.attentions[0].dtype if run.attentions else torch.float32
    out = torch.zeros(rows, n, dtype=dtype, device=run.layout.readout.device)
    out[torch.arange(rows), run.layout.readout] = 1.0
    return out


def require_readout_token(method: str, run: TowerRun) -> None:
    if not run.layout.has_readout_token:
        raise InputError(
            f"method {method!r} needs a {run.tower} tower that reads out a token (class token / end of text); "
            "this model pools with an attention head"
        )
