"""The method template, typed options, capability flags and the registry.

A method is only its idea: it declares what it needs (which towers run per pair with a
gradient, whether blocks get detached inputs, what a tower must offer) and implements
:meth:`Method.attribute`, which turns the pair runs into an :class:`Attribution`. The template
(:meth:`Method.compute`) validates the options, checks the model can express the method, runs
both towers inside ``adapter.explaining()`` and assembles the :class:`MethodResult`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..adapters.base import READOUT_ROW_NEEDS, ImageBatch, ModelAdapter, TextBatch
from ..adapters.fusion import FusionAdapter
from ..adapters.kept import AttentionReads
from ..errors import InputError
from ..targets import Target
from .fusion_pairs import FusionRuns, forward_fusion
from .pairs import PairRuns, forward_pairs, tower_result


@dataclass
class Attribution:
    """What a method's idea gives for B images x P prompts, in the tower's own units.

    image_maps:   (B, P, Gh, Gw) or None
    token_scores: (B, P, T) with NaN on padding, or None
    extras:       named arrays a method exposes besides the maps (per-layer maps, ...)
    """

    image_maps: torch.Tensor | None = None
    token_scores: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_rows(cls, runs: PairRuns, rows: dict[str, torch.Tensor]) -> "Attribution":
        """From per-row token values of each explained tower ({tower: (rows, n)}): the image
        tower's as patch maps, the text tower's as token scores."""
        return cls(
            image_maps=tower_result(runs, "image", rows["image"]) if "image" in rows else None,
            token_scores=tower_result(runs, "text", rows["text"]) if "text" in rows else None,
        )


@dataclass
class MethodResult:
    """Raw output of a method for B images x P prompts: the attribution plus the pairs'
    logits, probabilities and explained values, each (B, P)."""

    image_maps: torch.Tensor | None
    token_scores: torch.Tensor | None
    logits: torch.Tensor
    probs: torch.Tensor
    target_values: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


# ---- typed options -------------------------------------------------------------------------

#: value kinds an option can take (checked before any model runs)
KINDS = ("int", "positive_int", "positive_number", "choice")


def option(
    default: Any, help: str, kind: str, choices: tuple[str, ...] = (), *, nullable: bool = False
) -> Any:
    """A field of a method's ``Options`` dataclass: its default, one line of help, and the kind
    of value it takes (``None`` is always allowed where the default is ``None``, and where
    ``nullable`` says None means something, e.g. "all layers")."""
    if kind not in KINDS:
        raise ValueError(f"unknown option kind {kind!r}")
    return field(
        default=default,
        metadata={"help": help, "kind": kind, "choices": choices, "nullable": nullable or default is None},
    )


@dataclass(frozen=True)
class NoOptions:
    pass


def _check_value(method: str, f: dataclasses.Field, value: Any) -> Any:
    kind, choices = f.metadata["kind"], f.metadata["choices"]
    if value is None and f.metadata.get("nullable", f.default is None):
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and number and isinstance(value, int):
        return value
    if kind == "positive_int" and number and isinstance(value, int) and value >= 1:
        return value
    if kind == "positive_number" and number and value > 0:
        return value
    if kind == "choice" and value in choices:
        return value
    wanted = {
        "int": "an integer",
        "positive_int": "a positive integer",
        "positive_number": "a positive number",
        "choice": "one of " + ", ".join(choices),
    }[kind]
    raise InputError(f"{method} option {f.name} must be {wanted}, got {value!r}")


# ---- the template ----------------------------------------------------------------------------


class Method:
    """Base class. A method sets the class attributes and implements :meth:`attribute`
    (or, for a method that does not fit the pair template, overrides :meth:`compute`)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `cliplens methods`
    #: one line for what the method does on a fusion model, where that differs
    fusion_summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    towers: ClassVar[tuple[str, ...]] = ("image", "text")  # towers it gives a result for
    Options: ClassVar[type] = NoOptions
    #: option name -> one-line help (derived from ``Options``)
    options: ClassVar[dict[str, str]] = {}

    # capability flags, read by the template and by the contract tests
    #: the explained towers run with a gradient (per pair, or once per distinct input with
    #: :attr:`shared_graph`; else: one forward each, no graph)
    needs_gradient: ClassVar[bool] = True
    #: every block receives a detached copy of the previous block's output (LeGrad)
    detach_blocks: ClassVar[bool] = False
    #: what an explained tower must offer (``ModelAdapter.capabilities``)
    requires: ClassVar[frozenset[str]] = frozenset()
    #: extras with no prompt axis (B, ...): the same for every prompt of an image
    image_only_extras: ClassVar[frozenset[str]] = frozenset()
    #: the result carries a completeness check (``delta_*`` extras: how far the parts' sum is
    #: from the explained value)
    complete: ClassVar[bool] = False
    #: each gradient tower runs ONCE over its distinct inputs with a graph from ``graph_from``, and
    #: the method takes the pairs' gradients through it as batched vector-Jacobian products
    #: (:func:`~cliplens.methods.pairs.block_gradients`, ``PairRuns.pair_gradients``) instead of
    #: one backward pass over per-pair rows; :meth:`shares_graph` may decide per call
    shared_graph: ClassVar[bool] = False
    #: the method reads the attention of its blocks (:meth:`attention_blocks`) only through the
    #: functions that take a :class:`~cliplens.adapters.kept.KeptAttention` (``row_times_abar``,
    #: ``head_mean_row``, ``rollout_step``, ``attention_positive_mean``, ``query_rows``, or the
    #: gradient at ``in_graph``): the towers may run those blocks on the fused kernel and keep one
    kept_attention: ClassVar[bool] = False
    #: the method also explains fusion models (image and text scored together: BLIP ITM, ViLT),
    #: through :meth:`attribute_fusion`
    fusion: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Options" in cls.__dict__ or "options" not in cls.__dict__:
            cls.options = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls.Options)}

    @classmethod
    def describe(cls, adapter=None) -> str:
        """One line: what the method computes (on ``adapter``'s kind of model, when given)."""
        if adapter is not None and adapter.fusion and cls.fusion_summary:
            return cls.fusion_summary
        return cls.summary

    # ---- what the template asks of a method --------------------------------------------
    def parse_options(self, options: dict) -> Any:
        """The typed options from user values; a one-line InputError for an unknown name or a
        value of the wrong kind (before any model runs)."""
        known = {f.name: f for f in dataclasses.fields(self.Options)}
        unknown = set(options) - set(known)
        if unknown:
            names = ", ".join(sorted(known)) or "none"
            raise InputError(f"method {self.name!r} has no option {sorted(unknown)[0]!r} (options: {names})")
        return self.Options(**{k: _check_value(self.name, known[k], v) for k, v in options.items()})

    def check_options(self, options: dict) -> None:
        self.parse_options(options)

    def requirements(self, tower: str, opts: Any) -> frozenset[str]:
        """What ``tower`` must offer for this method with these options (default: :attr:`requires`)."""
        return self.requires

    def unsupported(self, adapter: ModelAdapter, towers: tuple[str, ...], opts: Any) -> str | None:
        """Why this method cannot explain ``towers`` of this model, or None."""
        if adapter.fusion:
            if not self.fusion:
                usable = ", ".join(
                    name
                    for name, cls in REGISTRY.items()
                    if cls.fusion and cls().fusion_unsupported(adapter, cls().parse_options({})) is None
                )
                return (
                    f"method {self.name!r} explains dual encoders (separate image and text towers); "
                    f"{adapter.name} is a fusion model ({adapter.family}): use one of {usable}"
                )
            return self.fusion_unsupported(adapter, opts)
        for tower in towers:
            missing = self.requirements(tower, opts) - adapter.capabilities(tower)
            if missing:
                return (
                    f"method {self.name!r} cannot explain the {tower} tower of a {adapter.family or 'this'} model: "
                    + "; ".join(CAPABILITY_TEXT.get(m, m) for m in sorted(missing))
                )
        return None

    def check_target(self, target: Target) -> None:
        """Refuse a target this method cannot explain (InputError); default: any target."""

    def gradient_towers(self, towers: tuple[str, ...], opts: Any) -> tuple[bool, bool]:
        """(image per pair with a gradient, text per pair with a gradient)."""
        return (self.needs_gradient and "image" in towers, self.needs_gradient and "text" in towers)

    def graph_from(self, tower: str, opts: Any, num_layers: int) -> int | None:
        """The first block of ``tower`` whose tensors this method needs a gradient at; the
        blocks before it run once per distinct input without a graph (see ``forward_pairs``).
        None (default): the gradient is needed down to the input."""
        return None

    def attention_blocks(self, tower: str, opts: Any, num_layers: int) -> frozenset[int] | None:
        """The blocks of an explained ``tower`` whose attention (``TowerRun.attentions``) this
        method reads; the others run the fused kernel and keep None, and so do every block of a
        tower it does not explain (but the last, where it stops at the readout row: see
        :meth:`attention_reads`) and the blocks before a fan-out. None (default): every block."""
        return None

    def reads_readout_row(self, tower: str, opts: Any, num_layers: int) -> bool:
        """Whether this method reads an explained tower's last block only at the readout
        token's row, on a shared run (:attr:`shared_graph`): its gradients come through that
        row alone (:func:`~cliplens.methods.pairs.readout_attention_gradients`,
        :func:`~cliplens.methods.pairs.readout_input_gradients`). The tower may then stop in
        that block's attention and finish its embedding from the row
        (:attr:`AttentionReads.readout_block <cliplens.adapters.kept.AttentionReads>`). Default:
        False."""
        return False

    def attention_reads(self, adapter: ModelAdapter, towers: tuple[str, ...], opts: Any) -> dict[str, AttentionReads]:
        """What each tower's run keeps of its blocks' attention for this call. A tower that reads
        out a token with linear pieces stops at its last block's readout row
        (``AttentionReads.readout_block``) where only that row is read: for a method that
        says so (:meth:`reads_readout_row`), or where the call needs the tower's embedding alone
        (a tower it does not explain, run without a gradient)."""
        grads = dict(zip(("image", "text"), self.gradient_towers(towers, opts)))
        reads = {}
        for tower, n in adapter.num_layers.items():
            if tower in towers:
                stops = (
                    READOUT_ROW_NEEDS <= adapter.capabilities(tower)
                    and self.shares_graph(opts)
                    and self.reads_readout_row(tower, opts, n)
                )
                blocks = self.attention_blocks(tower, opts, n)
                reads[tower] = AttentionReads(blocks, self.kept_attention, n - 1 if stops else None)
            elif not grads.get(tower, False):  # its embedding alone
                reads[tower] = adapter.embedding_reads(tower)
            else:
                reads[tower] = AttentionReads(frozenset(), self.kept_attention)
        return reads

    def shares_graph(self, opts: Any) -> bool:
        """Whether this call runs with :attr:`shared_graph` (default: the flag, whatever the
        options)."""
        return self.shared_graph

    def prepare_images(self, images: ImageBatch, opts: Any) -> ImageBatch:
        """The images as the forward pass takes them (default: unchanged)."""
        return images

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Any
    ) -> Attribution:
        raise NotImplementedError

    def attribute_fusion(
        self, adapter: FusionAdapter, runs: FusionRuns, target: Target, towers: tuple[str, ...], opts: Any
    ) -> Attribution:
        """The method on a fusion model's pair runs (for methods with :attr:`fusion`)."""
        raise NotImplementedError

    def fusion_unsupported(self, adapter: FusionAdapter, opts: Any) -> str | None:
        """Why this method (with :attr:`fusion`) cannot explain this fusion model with these
        options, or None (default)."""
        return None

    # ---- the template ------------------------------------------------------------------
    def compute(
        self,
        adapter: ModelAdapter,
        images: ImageBatch,
        texts: TextBatch,
        target: Target,
        *,
        towers: tuple[str, ...] | None = None,
        **options,
    ) -> MethodResult:
        towers = tuple(self.towers if towers is None else towers)
        opts = self.parse_options(options)
        self.check_target(target)
        reason = self.unsupported(adapter, towers, opts)
        if reason:
            raise InputError(reason)
        with adapter.explaining():
            if adapter.fusion:  # image and text scored together: one model run per pair
                runs = forward_fusion(adapter, self.prepare_images(images, opts), texts, target, grad=self.needs_gradient)
                out = self.attribute_fusion(adapter, runs, target, towers, opts)
            else:
                image_grad, text_grad = self.gradient_towers(towers, opts)
                runs = forward_pairs(
                    adapter,
                    self.prepare_images(images, opts),
                    texts,
                    target,
                    image_grad=image_grad,
                    text_grad=text_grad,
                    detach_blocks=self.detach_blocks,
                    graph_from={t: self.graph_from(t, opts, n) for t, n in adapter.num_layers.items()},
                    shared=self.shares_graph(opts),
                    reads=self.attention_reads(adapter, towers, opts),
                )
                out = self.attribute(adapter, runs, target, towers, opts)
        return MethodResult(
            image_maps=out.image_maps,
            token_scores=out.token_scores,
            logits=runs.logits,
            probs=runs.probs,
            target_values=runs.y.detach(),
            extras=out.extras,
        )


#: how a missing capability reads in an error message
CAPABILITY_TEXT = {
    "readout_token": "it needs a tower that reads its embedding out of one token (class / end-of-text), "
    "and this one pools with an attention head",
    "linear_split": "it needs the tower's blocks and readout as exact linear pieces, which this model's "
    "tower does not have",
}


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


# ---- layer selection: one convention for every layer option ----------------------------------


def resolve_layer(value: int | None, num_layers: int, default: int, option: str = "layer") -> int:
    """One block index from a user option: None -> ``default``; negative counts from the end."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"option {option} must be a block index (an integer), got {value!r}")
    idx = value + num_layers if value < 0 else value
    if not 0 <= idx < num_layers:
        raise InputError(f"{option} {value} is out of range for a tower with {num_layers} blocks")
    return idx


def last_layers(count: int | None, num_layers: int, option: str = "layers") -> list[int]:
    """The last ``count`` blocks in forward order (None, or more than the tower has: all of them)."""
    if count is None:
        return list(range(num_layers))
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"option {option} must be a positive integer (the last K blocks), got {count!r}")
    return list(range(max(0, num_layers - count), num_layers))
