"""The transformers encoder layout that CLIP and SigLIP share, as one adapter base.

Module paths used: ``vision_model`` / ``text_model``, each with ``embeddings`` and
``encoder.layers[i]``; a layer has ``layer_norm1``, ``self_attn.{v_proj, out_proj, num_heads,
head_dim}``, ``layer_norm2`` and ``mlp`` (pre-norm residual blocks). ``config.vision_config.
patch_size`` and ``config.text_config.max_position_embeddings``. Attention probabilities come
from the eager attention path (the only one that returns them), switched on for the call only.

A subclass names its model class and says what differs: its image recipe
(:meth:`_preprocess_from`), the readout (:meth:`_head_modules`, and for attention-pooled towers
:meth:`readout_with_attention`), tokenization and the forward of each tower. Loading a
checkpoint (:meth:`HFEncoderAdapter.load`) is common to all.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from ..errors import ModelLoadError
from ..preprocess import Preprocess
from .base import (
    Checkpoint,
    FanOut,
    ModelAdapter,
    ReadoutParts,
    TowerRun,
    block_entry,
    run_input_embeds,
)
from .capture import Capture
from .kept import EVERY_BLOCK, AttentionReads, transformers_kept_attention, transformers_readout_attention


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No transformers progress bar ("Loading weights") while a checkpoint loads; the setting
    is restored after, so a caller's own choice stands."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _weight_file_errors() -> tuple[type[BaseException], ...]:
    """The error a corrupt or garbage ``model.safetensors`` raises (not an OSError)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        return ()
    return (SafetensorError,)


def load_failure(exc: BaseException, name: str, label: str) -> ModelLoadError:
    """The one-line error for a checkpoint whose config or weights cannot be read."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return ModelLoadError(f"{name}: could not load the {label} checkpoint ({first})")


def load_tokenizer(checkpoint: Checkpoint, source, local: bool, name: str, label: str):
    """The checkpoint's own tokenizer when one was given, else the one saved beside its weights;
    a one-line ModelLoadError when it cannot be read (e.g. SigLIP's SentencePiece tokenizer
    without sentencepiece: name the missing piece rather than fail later)."""
    if checkpoint.tokenizer is not None:
        return checkpoint.tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, ImportError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{name}: could not load the {label} tokenizer ({first})") from None


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2, CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_token_text(raw: str | None) -> str | None:
    """The text of a byte-level BPE token with the bytes that do not form a whole UTF-8
    character escaped as ``\\xNN``; None when ``raw`` is not a byte-level token."""
    if not raw:
        return None
    raw = raw.removesuffix("</w>")
    if not raw or any(c not in _BYTE_OF for c in raw):
        return None
    return bytes(_BYTE_OF[c] for c in raw).decode("utf-8", errors="backslashreplace")


#: two prompts that any real tokenizer encodes differently
_PROBES = ("a photo of a cat", "a diagram of two dogs")


def check_tokenizer_fits(tokenizer, text_model, name: str) -> None:
    """Refuse a tokenizer that does not belong to the text tower: a vocabulary far smaller than
    the token embedding (transformers builds a 2-entry stand-in vocabulary when a checkpoint
    folder has no tokenizer files), ids beyond the embedding, or distinct prompts encoded alike
    (every prompt would then get the same logit). A few added special tokens beyond the
    embedding are tolerated as long as plain prompts do not use them. One-line ModelLoadError."""
    embedding = getattr(getattr(text_model, "embeddings", None), "token_embedding", None)
    rows = getattr(embedding, "num_embeddings", None)
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    hint = "; put the checkpoint's tokenizer files (tokenizer.json or vocab.json + merges.txt) in the folder"
    if rows is not None and size is not None and size < rows // 2:
        raise ModelLoadError(
            f"{name}: the tokenizer's vocabulary ({size} entries) does not fit the model's text "
            f"embedding ({rows} rows){hint}"
        )
    ids = [list(tokenizer(t)["input_ids"]) for t in _PROBES]
    if ids[0] == ids[1]:
        raise ModelLoadError(f"{name}: the tokenizer encodes different prompts alike ({ids[0]}){hint}")
    if rows is not None and max(max(i) for i in ids) >= rows:
        raise ModelLoadError(f"{name}: the tokenizer gives ids beyond the model's text embedding ({rows} rows){hint}")


class HFEncoderAdapter(ModelAdapter):
    """Shared base of the transformers CLIP-family adapters (``CLIPModel``, ``SiglipModel``, ...)."""

    #: the transformers class name this adapter takes, e.g. "CLIPModel"
    model_class: str = ""
    #: how messages name the family's checkpoints, e.g. "CLIP"
    label: str = ""

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess or self._preprocess_from(None, model.config.vision_config)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @staticmethod
    def _preprocess_from(processor_config: dict | None, vision_config) -> Preprocess:
        """The image recipe of a checkpoint's ``preprocessor_config.json`` (None: the defaults)."""
        raise NotImplementedError

    @classmethod
    def _for_config(cls, config) -> type["HFEncoderAdapter"]:
        """The adapter class for a checkpoint with this transformers config (a variant's subclass)."""
        return cls

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> "HFEncoderAdapter":
        """An adapter around a checkpoint directory or a cached/reachable hub name: the model in
        ``checkpoint.dtype``, its own tokenizer (unless one is given), its image recipe."""
        source, local, name = checkpoint.source, checkpoint.local_files_only, checkpoint.name
        with _quiet_progress():
            return cls._load(checkpoint, source, local, name)

    @classmethod
    def _load(cls, checkpoint: Checkpoint, source, local, name) -> "HFEncoderAdapter":
        import transformers
        from transformers import AutoConfig

        try:
            adapter_class = cls._for_config(AutoConfig.from_pretrained(source, local_files_only=local))
            model_class = getattr(transformers, adapter_class.model_class)
            model = model_class.from_pretrained(source, dtype=checkpoint.dtype, local_files_only=local)
        except (OSError, ValueError, RuntimeError, *_weight_file_errors()) as exc:
            raise load_failure(exc, name, cls.label) from None
        tokenizer = load_tokenizer(checkpoint, source, local, name, cls.label)
        check_tokenizer_fits(tokenizer, model.text_model, name)
        preprocess = adapter_class._preprocess_from(checkpoint.processor_config, model.config.vision_config)
        return adapter_class(model, tokenizer, preprocess=preprocess, name=name)

    @classmethod
    def matches(cls, model) -> bool:
        """Whether ``model`` is an instance of :attr:`model_class`. Imports nothing: a
        transformers model object can only exist once transformers has been imported."""
        transformers = sys.modules.get("transformers")
        if transformers is None:
            return False
        model_type = getattr(transformers, cls.model_class, None)
        return model_type is not None and isinstance(model, model_type)

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return (p, p)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        return list(self._tower(tower).encoder.layers)

    def capabilities(self, tower: str) -> frozenset[str]:
        # CLIP's towers read out a token through a layer norm and a linear projection
        return frozenset({"readout_token", "linear_split"})

    def _tower(self, tower: str):
        return self.model.vision_model if tower == "image" else self.model.text_model

    def _layer(self, tower: str, layer_index: int):
        return self._tower(tower).encoder.layers[layer_index]

    # ---- inputs ------------------------------------------------------------------------
    def _token_strings(self, ids: list[int]) -> list[str]:
        """How each token id reads, for the token scores of a text. A byte-level BPE token that
        holds part of a multi-byte character (CLIP splits CJK characters and emoji into byte
        tokens) reads as its text with the loose bytes escaped (``\\xe7``), not as U+FFFD, so
        that a display can join consecutive pieces back into the character
        (:func:`cliplens.viz.html.merge_byte_tokens`)."""
        tok = self.tokenizer
        out = []
        for t in ids:
            text = tok.decode([t]).strip()
            if "\ufffd" in text:
                text = _byte_token_text(tok.convert_ids_to_tokens(t)) or text
            out.append(text or tok.convert_ids_to_tokens(t))
        return out

    # ---- running -----------------------------------------------------------------------
    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        with Capture() as capture:
            capture.freeze(self.model)
            capture.eager_attention(self.model)
            yield

    def _capture(
        self,
        capture: Capture,
        tower_module,
        run: TowerRun,
        detach_blocks: bool,
        input_embeds: torch.Tensor | None = None,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> None:
        """:func:`capture_tower` on ``tower_module``'s ``embeddings``, ``encoder.layers`` and their
        ``self_attn``."""
        layers = list(tower_module.encoder.layers)
        capture_tower(
            capture,
            tower_module.embeddings,
            layers,
            [l.self_attn for l in layers],
            run,
            detach_blocks,
            input_embeds,
            fan_out,
            reads,
        )

    # ---- readout -----------------------------------------------------------------------
    def _head_modules(self, tower: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(final norm, projection) of a token-readout tower."""
        raise NotImplementedError

    def head(self, tower: str, pooled: torch.Tensor) -> torch.Tensor:
        norm, proj = self._head_modules(tower)
        return proj(norm(pooled))

    def readout_parts(self, tower: str) -> ReadoutParts:
        norm, proj = self._head_modules(tower)
        return ReadoutParts("layernorm", norm.weight, norm.bias, float(norm.eps), proj.weight, proj.bias)

    # ---- linear pieces (see ModelAdapter) ------------------------------------------------
    def attention_value_heads(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        attn = self._layer(tower, layer_index).self_attn
        values = self.attention_values(tower, layer_index, block_input)  # (B, H, n, d)
        # out = sum_h W_O[:, h-slice] @ v_h
        w_o = attn.out_proj.weight.reshape(-1, attn.num_heads, attn.head_dim)
        return torch.einsum("bhnd,chd->bhnc", values, w_o)

    def _projected(
        self, tower: str, layer_index: int, block_input: torch.Tensor, names: str
    ) -> list[torch.Tensor]:
        """Block ``layer_index``'s ``q``, ``k`` and/or ``v`` projections (``names``, e.g.
        ``"qk"``) of its pre-normed input, each (B, H, n, d)."""
        layer = self._layer(tower, layer_index)
        attn = layer.self_attn
        x = layer.layer_norm1(block_input)
        b, n, _ = x.shape
        heads = lambda y: y.reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
        return [heads(getattr(attn, f"{name}_proj")(x)) for name in names]

    def attention_qk(
        self, tower: str, layer_index: int, block_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self._projected(tower, layer_index, block_input, "qk")
        return q, k

    def attention_values(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        return self._projected(tower, layer_index, block_input, "v")[0]

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        return self._layer(tower, layer_index).self_attn.out_proj.bias

    def attention_output(self, tower: str, layer_index: int, heads: torch.Tensor) -> torch.Tensor:
        return self._layer(tower, layer_index).self_attn.out_proj(heads.flatten(-2))

    def mlp_hidden(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self._layer(tower, layer_index)
        return layer.mlp.activation_fn(layer.mlp.fc1(layer.layer_norm2(hidden)))

    def mlp_down(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._layer(tower, layer_index).mlp.fc2(hidden)


#: the name transformers dispatches :func:`~cliplens.adapters.kept.transformers_kept_attention` on
KEPT = "cliplens_kept"
#: ... and :func:`~cliplens.adapters.kept.transformers_readout_attention` (the ``"readout"`` path)
READOUT = "cliplens_readout"


def _own_function(name: str):
    """The attention function cliplens registers with transformers under ``name`` (while a
    capture lasts), or None for transformers' own implementations."""
    return {KEPT: transformers_kept_attention, READOUT: transformers_readout_attention}.get(name)


def fused_attention(capture: Capture, attentions: list[torch.nn.Module]):
    """A switch ``fused(implementation)`` of the transformers attention modules ``attentions``
    (through the config they dispatch on) between ``"eager"`` (probabilities returned),
    ``"sdpa"`` (the fused kernel: no probabilities), :data:`KEPT` (the fused kernel, keeping
    a :class:`~cliplens.adapters.kept.KeptAttention` where eager returns probabilities) and
    :data:`READOUT` (the tower stops there, :class:`~cliplens.adapters.kept.ReadoutStop`), each
    config's own setting back when ``capture`` ends. The blocks whose attention no method reads
    (those before a fan-out among them) run fused: the kernel never writes the n x n matrices
    (at 896 px a ViT-B/16 chefer explanation then takes 0.74x the time of the all-eager one on
    a CPU)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    configs = list({id(c): c for c in (getattr(a, "config", None) for a in attentions) if c is not None}.values())
    saved = [(c, c._attn_implementation_internal) for c in configs if hasattr(c, "_attn_implementation_internal")]

    def fused(implementation: str) -> None:
        own = _own_function(implementation)
        if own is not None and implementation not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS[implementation] = own
            capture.on_exit(lambda: ALL_ATTENTION_FUNCTIONS.pop(implementation, None))
        for config, _ in saved:
            config._attn_implementation_internal = implementation

    def restore() -> None:
        for config, value in saved:
            config._attn_implementation_internal = value

    capture.on_exit(restore)
    return fused


#: an :meth:`AttentionReads.path <cliplens.adapters.kept.AttentionReads.path>` as the
#: implementation name transformers dispatches on
IMPLEMENTATION = {"eager": "eager", "fused": "sdpa", "kept": KEPT, "readout": READOUT}


def capture_tower(
    capture: Capture,
    embeddings: torch.nn.Module,
    layers: list[torch.nn.Module],
    attentions: list[torch.nn.Module],
    run: TowerRun,
    detach_blocks: bool,
    input_embeds: torch.Tensor | None,
    fan_out: FanOut | None,
    reads: AttentionReads = EVERY_BLOCK,
) -> None:
    """Hooks (for one run, in ``capture``) that fill ``run``: the embedding output (or
    ``input_embeds`` in its place) as ``run.input_embeds``; each layer's input and output; the
    attention of the layers ``reads`` keeps (the second output of its attention module:
    probabilities, or a :class:`~cliplens.adapters.kept.KeptAttention` where the block runs
    kept), None for the others, which run the fused kernel (``reads.path``); with ``fan_out``,
    the stream and any per-row mask beside it repeated per pair from its block on. A block on
    the ``"readout"`` path stops the forward in its attention: the adapter runs the tower
    through :func:`~cliplens.adapters.base.forward_or_readout`.
    Every transformers tower cliplens runs apart (CLIP, SigLIP, BLIP's ITC towers) is captured
    this way; an adapter names its modules."""

    fused = fused_attention(capture, attentions)

    def on_embed(module, args, output):
        fused("eager")  # any mask the tower builds next is built for the eager path
        leaf = run_input_embeds(output, input_embeds)
        run.input_embeds = leaf
        return leaf

    capture.forward_hook(embeddings, on_embed)
    distinct_rows: list[int] = []  # rows before the fan-out
    for i, (layer, attention) in enumerate(zip(layers, attentions)):

        def pre(module, args, kwargs, i=i):
            positional = bool(args)
            hidden = args[0] if positional else kwargs["hidden_states"]
            rest = args[1:]
            others = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            fused(IMPLEMENTATION[reads.path(i, fan_out, hidden.dtype)])
            if fan_out is not None and i >= fan_out.block:
                if i == fan_out.block:
                    distinct_rows.append(hidden.shape[0])
                    hidden = fan_out.enter(hidden)
                    run.graph_input = hidden
                rows = distinct_rows[0]
                rest = tuple(fan_out.beside(x, rows) for x in rest)
                others = {k: fan_out.beside(v, rows) for k, v in others.items()}
            hidden = block_entry(hidden, i, detach_blocks)
            run.block_inputs.append(hidden)
            if positional:
                return (hidden, *rest), others
            return rest, {**others, "hidden_states": hidden}

        def post(module, args, output):
            run.block_outputs.append(output[0] if isinstance(output, tuple) else output)

        def on_attn(module, args, output, i=i):
            if not reads.keeps(i, fan_out):
                run.attentions.append(None)  # a block no method reads: nothing to keep
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("attention probabilities were not returned; eager attention is required")
            run.attentions.append(weights)

        capture.forward_pre_hook(layer, pre, with_kwargs=True)
        capture.forward_hook(layer, post)
        capture.forward_hook(attention, on_attn)
