"""The family-neutral contract between methods and models.

A method sees a model only through a :class:`ModelAdapter`: it asks for a tower to be run
(:meth:`ModelAdapter.run_image`, :meth:`ModelAdapter.run_text`) inside
:meth:`ModelAdapter.explaining`, and gets back a :class:`TowerRun` holding the embeddings,
the token layout and what was captured on the way (attention probabilities per block, the
residual stream around each block, the embedding input). Only adapters know module paths.

Shapes use named letters: B batch rows, n tokens, H heads, C tower width, D embedding width,
Gh x Gw patch grid.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import InputError
from ..images import Geometry
from ..preprocess import Preprocess

# the temporary-change helpers live in capture.py; their old import path stays
from .capture import frozen_eval, mha_probabilities, mha_with_probabilities, module_hooks  # noqa: F401
from .kept import EVERY_BLOCK, NO_BLOCK, AttentionReads, ReadoutStop, readout_heads

#: what a tower must offer for its last block to be read at the readout token's row alone
READOUT_ROW_NEEDS = frozenset({"readout_token", "linear_split"})


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one tower run are.

    readout:  (B,) index of the token the tower reads its embedding from (class token, end of
              text), or -1 for every row when the tower pools with an attention head instead.
    content:  (B, n) bool: the tokens a map is reported for (image patches; text tokens between
              the start and end markers).
    valid:    (B, n) bool: real tokens, not padding.
    grid:     (Gh, Gw) for an image tower, None for text.
    patches:  (Gh*Gw,) token indices of the patches in row-major grid order (image towers).
    """

    readout: torch.Tensor
    content: torch.Tensor
    valid: torch.Tensor
    grid: tuple[int, int] | None = None
    patches: torch.Tensor | None = None

    @property
    def has_readout_token(self) -> bool:
        return bool((self.readout >= 0).all())


@dataclass
class TowerRun:
    """What one forward pass of a tower left behind (tensors still in the autograd graph).

    embeds:        (B, D) projected embedding, not normalised.
    attentions:    per block, (B, H, n, n) attention probabilities, a
                   :class:`~cliplens.adapters.kept.KeptAttention`, or None for the blocks the run
                   was not asked to keep (``reads``) and those before a :class:`FanOut`.
    block_inputs:  per block, (B, n, C) residual stream entering the block.
    block_outputs: per block, (B, n, C) residual stream leaving the block.
    input_embeds:  (B, n, C) token embeddings (with positions) entering the first block's
                   stack; a leaf that requires grad, so gradients w.r.t. it can be asked for.
    pooled:        (B, C) the pooled token state before the final projection (after final norm).
    pool_attention: (B, H, q, n) probabilities of an attention-pooling head, or None.
    """

    tower: str
    embeds: torch.Tensor
    layout: TokenLayout
    attentions: list[torch.Tensor] = field(default_factory=list)
    block_inputs: list[torch.Tensor] = field(default_factory=list)
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    input_embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    pool_attention: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    #: with a :class:`FanOut`: the per-pair leaf entering its block (where a backward can stop)
    graph_input: torch.Tensor | None = None


# ---- the pair layout: pair (b, p) of B images x P prompts is row b*P + p -------------------------


def pair_copies(x: torch.Tensor, copies: int, tile: bool) -> torch.Tensor:
    """(rows, ...) one tower's distinct inputs -> their per-pair rows: each image ``copies`` (= P)
    times in a row (``tile`` False: pair b*P + p reads image b), or the prompts ``copies``
    (= B) times over (``tile`` True: pair b*P + p reads prompt p)."""
    if tile:
        return x.repeat(copies, *([1] * (x.dim() - 1)))
    return x.repeat_interleave(copies, dim=0)


def swap_pairs(tower: str, x: torch.Tensor) -> torch.Tensor:
    """(B, P, ...) per pair <-> (K, rows, ...) batched over the other tower's inputs: the image
    tower's batch is over prompts (K = P, rows = B), the text tower's over images. The same swap
    both ways."""
    return x.transpose(0, 1) if tower == "image" else x


def against_pairs(tower: str, x: torch.Tensor) -> torch.Tensor:
    """(rows, ...) values of one tower's distinct inputs, broadcastable against (B, P, ...)."""
    return x[:, None] if tower == "image" else x[None]


@dataclass(frozen=True)
class FanOut:
    """Per-pair rows from one block on, for a run over B distinct inputs.

    Blocks before ``block`` run once per distinct input, without building a graph. Entering
    ``block``, the residual stream is repeated ``copies`` times per input (row ``b*copies + k``,
    as :func:`torch.repeat_interleave`) as a new leaf that requires grad, and gradients are
    recorded from there on. Everything a run reports from that block on has B*copies rows
    (``embeds``, ``layout``, the block lists); the block lists before it keep B rows and no
    graph. A backward pass then stops at ``TowerRun.graph_input`` instead of running through
    every block to the input: the work a method does not need is never done."""

    block: int
    copies: int
    #: how rows repeat: each input ``copies`` times in a row (False: the image tower, pair
    #: b*P + p is image b), or the whole batch ``copies`` times over (True: the text tower)
    tile: bool = False

    def enter(self, hidden: torch.Tensor) -> torch.Tensor:
        """The stream entering :attr:`block`, fanned out; switches gradient recording on (the
        caller's grad mode is restored when its own ``torch.no_grad()`` context ends)."""
        torch.set_grad_enabled(True)
        return self.rows(hidden.detach()).requires_grad_(True)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return pair_copies(t, self.copies, self.tile)

    def beside(self, x, rows: int):
        """An argument passed beside the stream (a per-row attention mask): fanned out when it
        has a leading axis of ``rows``, else as it is."""
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows and rows > 1:
            return self.rows(x)
        return x

    def layout(self, layout: "TokenLayout") -> "TokenLayout":
        return TokenLayout(
            readout=self.rows(layout.readout),
            content=self.rows(layout.content),
            valid=self.rows(layout.valid),
            grid=layout.grid,
            patches=layout.patches,
        )


@dataclass
class TextBatch:
    """Tokenised prompts. tokens[p] are the decoded strings of input_ids[p, :length[p]]."""

    texts: list[str]
    input_ids: torch.Tensor  # (P, T)
    attention_mask: torch.Tensor  # (P, T)
    tokens: list[list[str]]
    truncated: list[bool]
    content: torch.Tensor  # (P, T) bool: tokens between the start and end markers

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, prompts: slice) -> "TextBatch":
        """The prompts of ``prompts`` (same token width, so their numbers do not change)."""
        if prompts == slice(0, len(self.texts)):
            return self
        return TextBatch(
            self.texts[prompts],
            self.input_ids[prompts],
            self.attention_mask[prompts],
            self.tokens[prompts],
            self.truncated[prompts],
            self.content[prompts],
        )


@dataclass
class ImageBatch:
    """Preprocessed images with the geometry that maps the input back onto each original."""

    pixel_values: torch.Tensor  # (B, 3, h, w)
    geometries: list[Geometry]
    originals: list[Image.Image]
    indices: list[int]  # positions of these images in the caller's list

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def rows(self, images: slice) -> "ImageBatch":
        """The images of ``images``, with their geometries and positions."""
        return ImageBatch(
            self.pixel_values[images], self.geometries[images], self.originals[images], self.indices[images]
        )


@dataclass(frozen=True)
class ReadoutParts:
    """What a token-readout tower applies to the readout token's residual stream z (C,):
    ``embed = proj_weight @ norm(z) + proj_bias`` with
    ``norm(z) = norm_weight * (z - mean(z)) / sqrt(var(z) + eps) + norm_bias`` for
    ``norm="layernorm"`` (``"rmsnorm"``: no centring, ``sqrt(mean(z^2) + eps)``; ``"none"``).
    Any of the tensors may be None (identity / zero)."""

    norm: str
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    eps: float
    proj_weight: torch.Tensor | None  # (D, C)
    proj_bias: torch.Tensor | None  # (D,)


@dataclass(frozen=True)
class Checkpoint:
    """What a family is asked to load (see ``adapters.families``).

    source: a checkpoint directory or hub name (transformers families), or the spec after its
            prefix (``"ViT-B-16/openai"`` for ``"open_clip:ViT-B-16/openai"``).
    name:   what the adapter is called (the spec as the user gave it).
    tokenizer: the caller's tokenizer, or None for the checkpoint's own.
    local_files_only: False only for a hub name whose files may be downloaded.
    processor_config: the checkpoint's ``preprocessor_config.json`` as a dict, or None.
    """

    source: str
    name: str
    dtype: torch.dtype = torch.float32
    tokenizer: object | None = None
    local_files_only: bool = True
    processor_config: dict | None = None


class ModelAdapter(ABC):
    """One model family's view for the methods. Subclasses live one per file in ``adapters/``."""

    #: family name, e.g. "hf-clip"
    family: str = ""
    #: how a pair's probability is formed: "softmax" over the prompts, or "sigmoid" per pair
    pair_probability: str = "softmax"
    #: True for models that score an image and a text together (:mod:`.fusion`); False for
    #: dual encoders, whose towers run apart
    fusion: bool = False

    model: torch.nn.Module
    name: str
    preprocess: Preprocess

    # ---- what the model is -------------------------------------------------------------
    @property
    @abstractmethod
    def patch_size(self) -> tuple[int, int]: ...

    @property
    def num_layers(self) -> dict[str, int]:
        """Blocks per tower: {"image": L_i, "text": L_t} (by default, of :meth:`blocks`)."""
        return {"image": len(self.blocks("image")), "text": len(self.blocks("text"))}

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of the cosine similarity (already exponentiated)."""

    def logit_bias(self) -> torch.Tensor | None:
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @abstractmethod
    def blocks(self, tower: str) -> list[torch.nn.Module]:
        """The residual blocks of ``tower`` ("image" or "text"), first to last (the modules
        whose weights a sanity check randomises; what each method's per-block captures refer to)."""

    def capabilities(self, tower: str) -> frozenset[str]:
        """What ``tower`` offers the methods (their ``requires`` flags are checked against it):

        - ``"readout_token"``: the tower reads its embedding out of one token (class token,
          end-of-text token), not through an attention-pooling head;
        - ``"linear_split"``: its blocks and readout are exposed as exact linear pieces
          (:meth:`attention_value_heads`, :meth:`attention_qk`, :meth:`attention_values`,
          :meth:`attention_out_bias`, :meth:`attention_output`, :meth:`mlp_hidden`,
          :meth:`mlp_down`,
          :meth:`readout_parts`), for exact decompositions and for a last block's readout row
          computed on its own;
        - ``"pool_split"``: the tower pools with an attention head whose linear pieces are
          exposed (:meth:`pool_value_heads`, :meth:`pool_out_bias`, :meth:`pool_mlp_output`):
          its embedding splits exactly per (head, token) plus the head's bias and MLP.
        """
        return frozenset()

    def with_model(self, model: torch.nn.Module) -> "ModelAdapter":
        """The same adapter (tokenizer, preprocessing, name) around another instance of the same
        architecture, e.g. a deep copy whose weights are changed."""
        clone = copy.copy(self)
        clone.model = model
        return clone

    # ---- inputs ------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: list[str]) -> TextBatch: ...

    def prepare_images(self, images: list[Image.Image], *, resize: str = "model") -> list[ImageBatch]:
        """Preprocess images; images whose input sizes differ land in separate batches."""
        groups: dict[tuple[int, ...], list[tuple[torch.Tensor, Geometry, Image.Image, int]]] = {}
        for i, img in enumerate(images):
            pixels, geom = self.preprocess(img, resize=resize, patch_size=self.patch_size[0])
            groups.setdefault(tuple(pixels.shape[1:]), []).append((pixels, geom, img, i))
        return [
            ImageBatch(
                torch.stack([g[0] for g in group]).to(self.device, self.dtype),
                [g[1] for g in group],
                [g[2] for g in group],
                [g[3] for g in group],
            )
            for group in groups.values()
        ]

    # ---- running -----------------------------------------------------------------------
    def embedding_reads(self, tower: str) -> AttentionReads:
        """What a run of ``tower`` for its embedding alone, without a gradient, keeps: its last
        block, where the tower stops at the readout row (``AttentionReads.readout_block``: a
        tower that reads out a token with linear pieces; the rest of that block feeds nothing
        the embedding reads), else nothing. A stopped run's embedding carries no graph."""
        if not READOUT_ROW_NEEDS <= self.capabilities(tower):
            return NO_BLOCK
        last = self.num_layers[tower] - 1
        return AttentionReads(frozenset({last}), kept=True, readout_block=last)

    def score_table(self, images: ImageBatch, texts: TextBatch) -> torch.Tensor:
        """(B, P) logits of every image against every prompt, no gradients: one forward per
        tower, every pair scored by :class:`~cliplens.targets.PairScores`."""
        from ..targets import PairScores

        with torch.no_grad():
            img = self.run_image(images.pixel_values, reads=self.embedding_reads("image")).embeds
            txt = self.run_text(texts.input_ids, texts.attention_mask, reads=self.embedding_reads("text")).embeds
            return PairScores.of(self, txt.dtype).table(img, txt)

    @abstractmethod
    def explaining(self) -> contextlib.AbstractContextManager:
        """Context for a call: eval mode, attention path that returns probabilities,
        parameters frozen. Everything is restored on exit, also on exceptions."""

    @abstractmethod
    def run_image(
        self,
        pixel_values: torch.Tensor,
        *,
        detach_blocks: bool = False,
        input_embeds: torch.Tensor | None = None,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        """Run the image tower, capturing per-block tensors. Call inside :meth:`explaining`.

        With ``detach_blocks`` every block receives a detached copy of the previous block's
        output (same values), so a gradient reaching block l's attention only comes from
        what is read out of block l directly (LeGrad's one-backward trick).

        ``input_embeds`` (B, n, C), when given, replaces what the embedding stage produces
        (the tensor a run reports as :attr:`TowerRun.input_embeds`: patch embedding with
        positions and class token, before any pre-norm), for this call only and without
        editing the model; it is used as the run's ``input_embeds`` (kept as is when it
        requires grad). ``pixel_values`` still fixes the input size and layout.

        ``fan_out`` (:class:`FanOut`), for a call under ``torch.no_grad()``: per-pair rows with a
        graph from one block on, the earlier blocks run once per image without one.

        ``reads`` (:class:`~cliplens.adapters.kept.AttentionReads`): which blocks keep their
        attention in :attr:`TowerRun.attentions`, and as what; the others run the fused kernel
        and keep None (default: every block keeps its probabilities)."""

    @abstractmethod
    def run_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        detach_blocks: bool = False,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        """Run the text tower (see :meth:`run_image`; a text ``fan_out`` tiles: ``tile=True``)."""

    def head(self, tower: str, pooled: torch.Tensor) -> torch.Tensor:
        """The tower's final norm and projection applied to an already pooled (B, C) vector (the
        readout token's residual stream as it leaves the last block). Returns (B, D). Towers that
        read out through an attention-pooling head have no such step and raise
        NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its {tower} head")

    def readout(self, tower: str, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Read a (B, n, C) residual stream out as if it left the last block:
        pooling, final norm, projection. Returns (B, D)."""
        return self.readout_with_attention(tower, hidden, layout)[0]

    def readout_with_attention(
        self, tower: str, hidden: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`readout`, plus the pooling head's probabilities (B, H, q, n) of this very call
        for towers that pool with an attention head (``layout.readout == -1``); None for towers
        that read a token out. The probabilities are in the graph: gradients can be asked at them.

        Here: the token-readout case, the readout token picked and passed to :meth:`head`.
        Adapters with an attention-pooled tower override it for that tower."""
        if not layout.has_readout_token:
            raise NotImplementedError(
                f"{type(self).__name__}: the {tower} tower pools with an attention head; "
                "its adapter must read it out through that head"
            )
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(tower, hidden[rows, layout.readout]), None

    def _image_layout(self, pixel_values: torch.Tensor, *, class_token: bool, pooled: bool) -> TokenLayout:
        """The token layout of an image tower run on (B, 3, h, w) pixels: an optional class token
        first, then the patches in row-major grid order; the readout is the class token, or -1
        for every row when ``pooled`` (an attention-pooling head reads the tower out).
        InputError when h or w is not a multiple of the patch size."""
        b, _, h, w = pixel_values.shape
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise InputError(f"image input {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        if not (class_token or pooled):
            raise ValueError("an image tower without a class token must pool with a head")
        gh, gw = h // ph, w // pw
        first = 1 if class_token else 0
        n = first + gh * gw
        dev = pixel_values.device
        content = torch.zeros(b, n, dtype=torch.bool, device=dev)
        content[:, first:] = True
        return TokenLayout(
            readout=torch.full((b,), -1 if pooled else 0, dtype=torch.long, device=dev),
            content=content,
            valid=torch.ones(b, n, dtype=torch.bool, device=dev),
            grid=(gh, gw),
            patches=torch.arange(first, n, device=dev),
        )

    # ---- linear pieces, for exact decompositions -----------------------------------------
    # Optional for an adapter; methods that need them (``decomposition``) report a family
    # without them as unsupported. Every block must be pre-norm residual:
    #   Z = X + attn(X) ; out = Z + mlp(Z)   with   attn(X)_i = sum_h sum_j A^h_ij V^h_j + b_O.

    def attention_value_heads(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        """(B, n, C) residual stream entering block ``layer_index`` -> (B, H, n, C): each
        head's value vectors already mapped by that head's slice of the output projection
        (no bias), so the attention branch's output at token i is
        ``sum_h sum_j A[:, h, i, j] * V[:, h, j] + attention_out_bias`` (any layer scale
        folded in)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose per-head value vectors")

    def attention_qk(
        self, tower: str, layer_index: int, block_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, C) residual stream entering block ``layer_index`` -> ``(q, k)``, each
        (B, H, n, d): every head's query and key vectors as its attention scores use them
        (after the pre-norm and the projections with their biases, before the 1/sqrt(d)
        scaling), so ``softmax(q k^T / sqrt(d) + mask)`` is the block's attention."""
        raise NotImplementedError(f"{type(self).__name__} does not expose per-head queries and keys")

    def attention_values(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        """(B, n, C) residual stream entering block ``layer_index`` -> (B, H, n, d): every head's
        value vectors (after the pre-norm and the value projection with its bias), so the
        attention output per head is ``A V`` (what :meth:`attention_output` maps)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose per-head values")

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        """(C,) the bias the attention branch of block ``layer_index`` adds (after its output
        projection and any layer scale), or None."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the attention output bias")

    def attention_output(self, tower: str, layer_index: int, heads: torch.Tensor) -> torch.Tensor:
        """(..., H, d) block ``layer_index``'s attention output per head (``A V``, before the
        output projection) -> (..., C): what its attention branch adds to the residual stream
        (the output projection with its bias, and any layer scale)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the attention output projection")

    def mlp_output(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) residual stream after block ``layer_index``'s attention branch -> what
        the block's MLP branch adds to it (its norm, MLP and any layer scale):
        ``mlp_down(mlp_hidden(hidden))``."""
        return self.mlp_down(tower, layer_index, self.mlp_hidden(tower, layer_index, hidden))

    def mlp_hidden(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) residual stream after block ``layer_index``'s attention branch -> (..., F) its
        MLP branch up to the last linear map (the norm, the up-projection, the activation), token
        by token."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the MLP branch")

    def mlp_down(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """(..., F) :meth:`mlp_hidden`'s output -> (..., C) what the MLP branch adds to the
        residual stream: its last linear map (the down-projection) and any layer scale, an affine
        map of ``hidden``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the MLP branch")

    # an attention-pooling head (one probe query; SigLIP's MAP head), for towers with "pool_split":
    #   embed = a + pool_mlp(a),   a = sum_h sum_j P_hj U_hj + pool_out_bias,
    # P: TowerRun.pool_attention[:, :, 0]; U: pool_value_heads of the last block's output.

    def pool_value_heads(self, tower: str, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, C) residual stream leaving the last block -> (B, H, n, C): the pooling head's
        value vectors per head (after any norm the head reads through), mapped by that head's
        slice of its output projection (no output bias)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its pooling head's values")

    def pool_out_bias(self, tower: str) -> torch.Tensor | None:
        """(C,) the bias of the pooling head's output projection, or None."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its pooling head's bias")

    def pool_mlp_output(self, tower: str, attended: torch.Tensor) -> torch.Tensor:
        """(B, C) the pooling head's attention output -> what its residual MLP adds to it."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its pooling head's MLP")

    def readout_parts(self, tower: str) -> "ReadoutParts":
        """The final norm and projection applied to the readout token's residual stream."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its readout parts")


def readout_row_embeds(
    adapter: ModelAdapter, tower: str, layer: int, x: torch.Tensor, heads: torch.Tensor
) -> torch.Tensor:
    """(rows, D) a tower's embedding from the readout token's row of its last block ``layer``
    alone (of an earlier block: its readout as if it were the last): ``head(z + mlp(z))`` with
    ``z = x + attention_output(heads)``, x (rows, C) the row of the block's input, ``heads``
    (rows, H, d) its attention output per head (the adapter's linear pieces; the pre-norm
    residual block of :class:`ModelAdapter`)."""
    z = x + adapter.attention_output(tower, layer, heads)
    return adapter.head(tower, z + adapter.mlp_output(tower, layer, z))


def forward_or_readout(adapter: ModelAdapter, run: TowerRun, forward):
    """``forward()``'s result (a tower's forward, filling ``run`` through its hooks; their
    capture ends inside it, so the tower's modules are themselves again), or None where the
    tower stopped in its last block's attention (the ``"readout"`` path of
    :class:`~cliplens.adapters.kept.AttentionReads`; :class:`~cliplens.adapters.kept.ReadoutStop`).
    The stop's kept attention is then the run's last, and ``run.embeds`` is finished from the
    readout token's row alone (:func:`readout_row_embeds`): the rest of that block, over every
    other row, feeds nothing the embedding reads. The run then has no output for that block
    (``block_outputs``) and no ``pooled``."""
    try:
        return forward()
    except ReadoutStop as stop:
        kept = stop.kept
    run.attentions.append(kept)
    last = len(run.block_inputs) - 1
    readout = run.layout.readout
    rows = torch.arange(readout.shape[0], device=readout.device)
    with torch.no_grad():
        x = run.block_inputs[last][rows, readout]
        run.embeds = readout_row_embeds(adapter, run.tower, last, x, readout_heads(kept, readout))
    return None


def as_grad_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when gradients already flow into it (e.g. from pixels that require
    grad), else a detached copy that requires grad: the point input gradients are asked at."""
    if tensor.requires_grad:
        return tensor
    return tensor.detach().requires_grad_(True)


def run_input_embeds(computed: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """What a run reports as :attr:`TowerRun.input_embeds` and feeds on: the embedding stage's
    own output ``computed``, or the caller's ``given`` replacement (checked against its shape),
    as a tensor gradients can be asked at (see :func:`as_grad_leaf`)."""
    if given is not None:
        if given.shape != computed.shape:
            raise InputError(
                f"input_embeds of shape {tuple(given.shape)} do not fit this input "
                f"(the embeddings are {tuple(computed.shape)})"
            )
        computed = given.to(computed.dtype)
    return as_grad_leaf(computed)


def block_entry(hidden: torch.Tensor, index: int, detach_blocks: bool) -> torch.Tensor:
    """The residual stream entering block ``index``: with ``detach_blocks`` (and after the first
    block) a new leaf with the same values, so gradients still reach this block's attention but
    stop here instead of flowing into earlier blocks."""
    if detach_blocks and index > 0:
        return hidden.detach().requires_grad_(hidden.requires_grad)
    return hidden
