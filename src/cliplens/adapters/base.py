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
from typing import Callable, Iterator

import torch
from PIL import Image

from ..images import Geometry
from ..preprocess import Preprocess


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
    attentions:    per block, (B, H, n, n) attention probabilities.
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


@dataclass
class ImageBatch:
    """Preprocessed images with the geometry that maps the input back onto each original."""

    pixel_values: torch.Tensor  # (B, 3, h, w)
    geometries: list[Geometry]
    originals: list[Image.Image]
    indices: list[int]  # positions of these images in the caller's list

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


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


class ModelAdapter(ABC):
    """One model family's view for the methods. Subclasses live one per file in ``adapters/``."""

    #: family name, e.g. "hf-clip"
    family: str = ""
    #: how a pair's probability is formed: "softmax" over the prompts, or "sigmoid" per pair
    pair_probability: str = "softmax"

    model: torch.nn.Module
    name: str
    preprocess: Preprocess

    # ---- what the model is -------------------------------------------------------------
    @property
    @abstractmethod
    def patch_size(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def num_layers(self) -> dict[str, int]:
        """Blocks per tower: {"image": L_i, "text": L_t}."""

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
    @abstractmethod
    def explaining(self) -> contextlib.AbstractContextManager:
        """Context for a call: eval mode, attention path that returns probabilities,
        parameters frozen. Everything is restored on exit, also on exceptions."""

    @abstractmethod
    def run_image(
        self, pixel_values: torch.Tensor, *, detach_blocks: bool = False, input_embeds: torch.Tensor | None = None
    ) -> TowerRun:
        """Run the image tower, capturing per-block tensors. Call inside :meth:`explaining`.

        With ``detach_blocks`` every block receives a detached copy of the previous block's
        output (same values), so a gradient reaching block l's attention only comes from
        what is read out of block l directly (LeGrad's one-backward trick).

        ``input_embeds`` (B, n, C), when given, replaces what the embedding stage produces
        (the tensor a run reports as :attr:`TowerRun.input_embeds`: patch embedding with
        positions and class token, before any pre-norm), for this call only and without
        editing the model; it is used as the run's ``input_embeds`` (kept as is when it
        requires grad). ``pixel_values`` still fixes the input size and layout."""

    @abstractmethod
    def run_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, detach_blocks: bool = False
    ) -> TowerRun: ...

    @abstractmethod
    def readout(self, tower: str, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Read a (B, n, C) residual stream out as if it left the last block:
        pooling, final norm, projection. Returns (B, D)."""

    def readout_with_attention(
        self, tower: str, hidden: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`readout`, plus the pooling head's probabilities (B, H, q, n) of this very call
        for towers that pool with an attention head (``layout.readout == -1``); None for towers
        that read a token out. The probabilities are in the graph: gradients can be asked at them."""
        return self.readout(tower, hidden, layout), None

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

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        """(C,) the bias the attention branch of block ``layer_index`` adds (after its output
        projection and any layer scale), or None."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the attention output bias")

    def mlp_output(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, C) residual stream after block ``layer_index``'s attention branch -> what
        the block's MLP branch adds to it (its norm, MLP and any layer scale)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the MLP branch")

    def readout_parts(self, tower: str) -> "ReadoutParts":
        """The final norm and projection applied to the readout token's residual stream."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its readout parts")


@contextlib.contextmanager
def module_hooks(registrations: list[Callable[[], torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    """Register hooks for the duration of a ``with`` block; always remove them."""
    handles = []
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the call; restores mode and flags exactly."""
    modes = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def as_grad_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when gradients already flow into it (e.g. from pixels that require
    grad), else a detached copy that requires grad: the point input gradients are asked at."""
    if tensor.requires_grad:
        return tensor
    return tensor.detach().requires_grad_(True)


# ---- nn.MultiheadAttention with per-head probabilities, for one call --------------------------


def mha_with_probabilities(
    mha: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``mha(query, key, value, ...)[0]`` computes, from the module's own weights, one head
    at a time, returning ``(output, probabilities)``; probabilities are (B, H, Lq, Lk) and the
    output is computed from exactly that tensor, so gradients reach it. Inputs follow the
    module's ``batch_first`` layout (or are unbatched (L, E))."""
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise NotImplementedError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, Lq, E = query.shape
    Lk = key.shape[1]
    H = mha.num_heads
    d = E // H
    bias = mha.in_proj_bias
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    q = torch.nn.functional.linear(query, w_q, b_q).reshape(B, Lq, H, d).transpose(1, 2)
    k = torch.nn.functional.linear(key, w_k, b_k).reshape(B, Lk, H, d).transpose(1, 2)
    v = torch.nn.functional.linear(value, w_v, b_v).reshape(B, Lk, H, d).transpose(1, 2)
    scores = (q * d**-0.5) @ k.transpose(-1, -2)  # (B, H, Lq, Lk)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1)
    for mask in (attn_mask, key_padding_mask):
        if mask is None:
            continue
        if mask is key_padding_mask:
            mask = mask[:, None, None, :]
        elif mask.dim() == 3:
            mask = mask.reshape(B, H, Lq, Lk)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    mixed = torch.nn.functional.dropout(probs, mha.dropout, mha.training) @ v
    out = mha.out_proj(mixed.transpose(1, 2).reshape(B, Lq, E))
    if unbatched:
        out = out.squeeze(0)
    elif not mha.batch_first:
        out = out.transpose(0, 1)
    return out, probs


@contextlib.contextmanager
def mha_probabilities(
    modules: list[torch.nn.MultiheadAttention], sink: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """For the ``with`` block, route each listed ``nn.MultiheadAttention`` instance through
    :func:`mha_with_probabilities` and hand its per-head probabilities to ``sink(i, probs)``
    (i: the module's position in ``modules``). The fused kernels return no probabilities (or
    only their head mean, not in the graph), hence the swap. Only these instances are touched
    (an instance attribute ``forward``), never the class; removed on exit, also on exceptions."""
    patched: list[tuple[torch.nn.MultiheadAttention, bool, object]] = []
    try:
        for i, mha in enumerate(modules):

            def forward(
                query,
                key,
                value,
                key_padding_mask=None,
                need_weights=True,
                attn_mask=None,
                average_attn_weights=True,
                is_causal=False,
                _i=i,
                _mha=mha,
            ):
                out, probs = mha_with_probabilities(
                    _mha, query, key, value, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal
                )
                sink(_i, probs)
                if not need_weights:
                    return out, None
                return out, probs.mean(dim=1) if average_attn_weights else probs

            patched.append((mha, "forward" in mha.__dict__, mha.__dict__.get("forward")))
            mha.forward = forward  # instance attribute: shadows the class method for this module only
        yield
    finally:
        for mha, had, previous in reversed(patched):
            if had:
                mha.forward = previous
            else:
                mha.__dict__.pop("forward", None)
