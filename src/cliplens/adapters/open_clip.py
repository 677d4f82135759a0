"""open_clip ViT CLIP models (``open_clip.CLIP`` / ``CustomTextCLIP``), OpenAI weights included.

open_clip is an optional extra (it needs torchvision): nothing here imports it at module level,
and ``cliplens.adapters`` imports this file only when an open_clip model or an
``"open_clip:..."`` name is asked for.

Module paths used: image tower ``visual.{conv1, class_embedding, positional_embedding,
patch_dropout, ln_pre, transformer.resblocks[i], attn_pool, ln_post, proj}``; text tower
(``CLIP``: on the model itself, ``CustomTextCLIP``: under ``text``) ``{token_embedding,
positional_embedding, transformer.resblocks[i], ln_final, text_projection, attn_mask}``,
``logit_scale``, ``logit_bias``. Blocks are ``ResidualAttentionBlock`` (``attn`` is an
``nn.MultiheadAttention``) or ``CustomResidualAttentionBlock`` (``attn`` is open_clip's own
``Attention``).

How attention probabilities are obtained. Both attention paths are fused (the
``nn.MultiheadAttention`` call passes ``need_weights=False``; ``Attention`` uses
``scaled_dot_product_attention``): neither gives per-head probabilities. For the call only,
each block's attention module of this one model instance computes attention head by head
from its own weights (``in_proj_weight``/``in_proj_bias``/``out_proj``, and for ``Attention``
its q/k norms, scaled-cosine logits, head scales and inner norm), returning the same output
and handing the probabilities over; the instance attribute is removed on exit. The classes
are never patched. ``tests/test_open_clip.py`` checks that embeddings through this path equal
the model's own ``encode_image`` / ``encode_text``.

The adapter runs a tower the way the model's ``forward`` does, stage by stage, calling the
model's own modules: the patch convolution, class token and (interpolated, for inputs of
another size than the checkpoint's) position embeddings, ``ln_pre``, each block as a module
(so the user's hooks still fire), then the readout. Text: token + position embeddings, the
causal mask (``attn_mask``), blocks, ``ln_final``, pooling by ``text_pool_type`` (``argmax``:
the end-of-text token has the largest id; ``eos``, ``last``, ``first``), projection.

Supported: ViT image towers reading out the class token (``pool_type="tok"``) or an
attentional pooler whose first query is read out (CoCa-style ``attentional_pool=True``);
QuickGELU or GELU; layer scale; the custom block's attention variants. Refused with a
:class:`ModelLoadError` naming what is missing: timm image trunks (SigLIP / ConvNeXt / EVA
inside open_clip), ModifiedResNet towers, mean-pooled towers, Hugging Face text towers,
CoCa's appended text class token.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import InputError, ModelLoadError
from ..preprocess import Preprocess, open_clip_preprocess_from_config
from .base import (
    FanOut,
    ModelAdapter,
    ReadoutParts,
    TextBatch,
    TokenLayout,
    TowerRun,
    block_entry,
    forward_or_readout,
    run_input_embeds,
)
from .capture import Capture, mha_with_probabilities
from .kept import EVERY_BLOCK, AttentionReads, additive_mask, fused_attention_kept
from .open_clip_load import import_open_clip, load_open_clip  # noqa: F401 (load_open_clip: its old import path)

# ---- what the model is ------------------------------------------------------------------------


def _text_parts(model):
    """The text tower's modules: ``CLIP`` keeps them on the model, ``CustomTextCLIP`` under
    ``text``. Returns a namespace-like object (the module holding them) or raises."""
    text = getattr(model, "text", None)
    if text is None:
        return model
    if not hasattr(text, "token_embedding") or not hasattr(text, "transformer"):
        kind = type(text).__name__
        raise ModelLoadError(
            f"open_clip model with a {kind} text tower (e.g. a Hugging Face text encoder): not supported; "
            "cliplens explains open_clip's own TextTransformer"
        )
    if getattr(text, "cls_emb", None) is not None:
        raise ModelLoadError("open_clip text tower with an appended class token (CoCa): not supported")
    return text


def check_supported(model) -> None:
    """Raise a one-line :class:`ModelLoadError` naming what this adapter cannot read."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise ModelLoadError(f"{type(model).__name__} has no image tower (visual)")
    if type(model).__name__ == "CoCa":
        raise ModelLoadError(
            "open_clip CoCa models are not supported (text tower with an appended class token)"
        )
    if hasattr(visual, "trunk"):
        raise ModelLoadError(
            f"open_clip model with a timm image tower ({type(visual.trunk).__name__}, e.g. SigLIP or "
            "ConvNeXt inside open_clip): not supported; cliplens reads attention from open_clip's own "
            "VisionTransformer (for SigLIP weights use the transformers SiglipModel)"
        )
    missing = [
        a
        for a in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post")
        if not hasattr(visual, a)
    ]
    if missing:
        raise ModelLoadError(
            f"open_clip image tower {type(visual).__name__} is not a ViT "
            f"(no {', '.join(missing)}): not supported"
        )
    attn_pool = getattr(visual, "attn_pool", None)
    if attn_pool is not None and getattr(visual, "attn_pool_contrastive", None) is not None:
        raise ModelLoadError("open_clip image tower with parallel/cascade attentional pooling: not supported")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise ModelLoadError(
            f"open_clip image tower with pool_type={visual.pool_type!r}: not supported "
            "(needs a class-token readout or an attentional pooler)"
        )
    text = _text_parts(model)
    pool = getattr(model, "text_pool_type", getattr(text, "pool_type", "argmax"))
    if pool not in ("argmax", "eos", "last", "first"):
        raise ModelLoadError(f"open_clip text tower with pool_type={pool!r}: not supported")
    for tower, blocks in (("image", visual.transformer.resblocks), ("text", text.transformer.resblocks)):
        for blk in blocks:
            if not isinstance(blk.attn, torch.nn.MultiheadAttention) and not hasattr(
                blk.attn, "in_proj_weight"
            ):
                raise ModelLoadError(
                    f"open_clip {tower} block with a {type(blk.attn).__name__} attention: not supported"
                )


def preprocess_for(model) -> Preprocess:
    """The checkpoint's image recipe from open_clip's ``preprocess_cfg`` (OpenAI defaults)."""
    visual = model.visual
    return open_clip_preprocess_from_config(
        getattr(visual, "preprocess_cfg", None), getattr(visual, "image_size", 224)
    )


# ---- attention with probabilities, for the call -------------------------------------------------


def open_clip_attention(
    attn, x: torch.Tensor, attn_mask: torch.Tensor | None = None, kept: bool = False, stop: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``Attention.forward`` (batch first, self-attention), computed with explicit
    per-head probabilities: returns ``(output, probs)`` with probs (N, H, L, L) (``kept``: the
    fused kernel, and a :class:`~cliplens.adapters.kept.KeptAttention` for the probabilities;
    ``stop``: raising :class:`~cliplens.adapters.kept.ReadoutStop` with it instead)."""
    N, L, C = x.shape
    H = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = q.reshape(N, L, H, -1).transpose(1, 2)
    k = k.reshape(N, L, H, -1).transpose(1, 2)
    v = v.reshape(N, L, H, -1).transpose(1, 2)
    if attn_mask is not None:
        if attn_mask.ndim == 3:
            attn_mask = attn_mask.reshape(N, H, L, L)
        attn_mask = additive_mask(attn_mask, q.dtype)
    cosine = getattr(attn, "logit_scale", None) is not None
    if kept:
        if cosine:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = float(torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp())
        else:
            q, k, scale = attn.ln_q(q), attn.ln_k(k), attn.scale
        out, probs = fused_attention_kept(q, k, v, attn_mask, scale, stop=stop)
    else:
        if cosine:
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            scores = scores * torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp()
        else:
            q, k = attn.ln_q(q), attn.ln_k(k)
            scores = (q * attn.scale) @ k.transpose(-1, -2)
        if attn_mask is not None:
            scores = scores + attn_mask
        probs = scores.softmax(dim=-1)
        out = F.dropout(probs, attn.attn_drop.p, attn.training) @ v
    if getattr(attn, "head_scale", None) is not None:
        out = out * attn.head_scale
    out = out.transpose(1, 2).reshape(N, L, C)
    out = attn.out_drop(attn.out_proj(attn.ln_inner(out)))
    return out, probs


def attention_probabilities(
    capture: Capture, blocks, sink: Callable[[torch.Tensor], None], kept: bool = False, stop: bool = False
) -> None:
    """In ``capture`` (for its ``with`` block), every block's attention of ``blocks`` hands its
    per-head probabilities (``kept``: a :class:`~cliplens.adapters.kept.KeptAttention`) to
    ``sink`` (in call order): ``nn.MultiheadAttention`` through :meth:`Capture.mha_probabilities`,
    open_clip's ``Attention`` through :func:`open_clip_attention`. ``stop`` (with ``kept``): the
    ``"readout"`` path, raising :class:`~cliplens.adapters.kept.ReadoutStop` instead. Patches of
    these module instances only."""
    for blk in blocks:
        if not isinstance(blk.attn, torch.nn.MultiheadAttention):

            def forward(x, attn_mask=None, _attn=blk.attn):
                out, probs = open_clip_attention(_attn, x, attn_mask, kept, stop)
                sink(probs)
                return out

            capture.patch_forward(blk.attn, forward)
    mhas = [blk.attn for blk in blocks if isinstance(blk.attn, torch.nn.MultiheadAttention)]
    capture.mha_probabilities(mhas, lambda i, p: sink(p), kept, stop)


# ---- the adapter ------------------------------------------------------------------------------


class OpenClipAdapter(ModelAdapter):
    family = "open_clip"

    def __init__(self, model, tokenizer=None, preprocess: Preprocess | None = None, name: str | None = None):
        check_supported(model)
        self.model = model
        self.text = _text_parts(model)
        if tokenizer is None:
            tokenizer = default_tokenizer(model)
        self.tokenizer = tokenizer
        self.preprocess = preprocess or preprocess_for(model)
        self.name = name or type(model).__name__
        self.pair_probability = "sigmoid" if getattr(model, "logit_bias", None) is not None else "softmax"

    @staticmethod
    def matches(model) -> bool:
        """Whether ``model`` is an open_clip model object (imports nothing)."""
        return type(model).__module__.split(".")[0] == "open_clip" and hasattr(model, "visual")

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.visual.patch_size
        return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))

    @property
    def num_layers(self) -> dict[str, int]:
        return {
            "image": len(self.model.visual.transformer.resblocks),
            "text": len(self.text.transformer.resblocks),
        }

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().reshape(())

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        tm = self.model.visual if tower == "image" else self.text
        return list(tm.transformer.resblocks)

    def capabilities(self, tower: str) -> frozenset[str]:
        pooled = tower == "image" and getattr(self.model.visual, "attn_pool", None) is not None
        if pooled:
            return frozenset()
        found = {"readout_token"}
        if all(isinstance(blk.attn, torch.nn.MultiheadAttention) for blk in self.blocks(tower)):
            found.add("linear_split")  # custom attention (qk norm, scaled cosine) has no exact split
        return frozenset(found)

    def with_model(self, model) -> "OpenClipAdapter":
        clone = super().with_model(model)
        clone.text = _text_parts(model)
        return clone

    def logit_bias(self) -> torch.Tensor | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else bias.detach().reshape(())

    @property
    def _text_pool(self) -> str:
        return getattr(self.model, "text_pool_type", getattr(self.text, "pool_type", "argmax"))

    @property
    def _pad_id(self) -> int:
        return int(getattr(self.text, "pad_id", 0) or 0)

    @property
    def _causal(self) -> torch.Tensor | None:
        return getattr(self.model, "attn_mask", None) if self.text is self.model else self.text.attn_mask

    # ---- inputs ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TextBatch:
        tok = self.tokenizer
        limit = self.context_length
        takes_limit = _takes_context_length(tok)
        ids = tok(list(texts), context_length=limit) if takes_limit else tok(list(texts))
        ids = torch.as_tensor(ids, dtype=torch.long)
        # a tokenizer that takes no context length fixes its own: it cannot be asked what it cut
        truncated = _truncated(tok, texts, ids, limit) if takes_limit else [False] * len(texts)
        P, T = ids.shape
        pad = self._pad_id
        positions = torch.arange(T)[None]
        nonpad = ids != pad
        # real tokens: up to the last non-padding one (a text token may share the padding id)
        length = torch.where(
            nonpad.any(1), T - nonpad.flip(1).int().argmax(1), torch.zeros(P, dtype=torch.long)
        )
        valid = positions < length[:, None]
        content = self._content(ids, valid)
        readout = self._readout_positions(ids)
        if self._causal is not None and self._text_pool != "last":
            # causal towers: the padding after the readout token cannot change anything before
            # it, so the batch is cut after the longest prompt (same numbers, less work)
            width = int(max(int(length.max()), int(readout.max()) + 1))
            ids, valid, content = ids[:, :width], valid[:, :width], content[:, :width]
        tokens = [[_decode(tok, t) for t in row[: int(n)].tolist()] for row, n in zip(ids, length)]
        return TextBatch(
            list(texts),
            ids.to(self.device),
            valid.long().to(self.device),
            tokens,
            truncated,
            content.to(self.device),
        )

    def _content(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Real tokens that are not start/end markers."""
        tok = self.tokenizer
        special = {
            getattr(tok, a) for a in ("sot_token_id", "eot_token_id") if getattr(tok, a, None) is not None
        }
        special |= set(getattr(tok, "all_special_ids", []) or [])
        return valid & ~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long, device=ids.device))

    def _readout_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token the text tower pools, as open_clip's ``text_global_pool`` chooses it."""
        pool = self._text_pool
        rows = input_ids.shape[0]
        if pool == "argmax":
            return input_ids.argmax(dim=-1).long()
        if pool == "eos":
            eos = getattr(self.model, "text_eos_id", getattr(self.text, "eos_id", None))
            return (input_ids == eos).int().argmax(dim=-1).long()
        if pool == "last":
            return torch.full((rows,), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
        return torch.zeros(rows, dtype=torch.long, device=input_ids.device)

    # ---- running -----------------------------------------------------------------------
    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        with Capture() as capture:
            capture.freeze(self.model)
            yield

    def _blocks(
        self,
        transformer,
        x: torch.Tensor,
        attn_mask,
        run: TowerRun,
        detach_blocks: bool,
        fan_out: FanOut | None = None,
        fanned_mask=None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> torch.Tensor:
        """Every block of ``transformer`` over a (B, n, C) stream, capturing what the contract asks
        (with ``fan_out``: per-pair rows from its block on, see :class:`FanOut`). The blocks
        ``reads`` does not keep (those before the fan-out among them) run their own fused
        attention and keep None. A block on the ``"readout"`` path raises
        :class:`~cliplens.adapters.kept.ReadoutStop` out of it (callers run it through
        :func:`~cliplens.adapters.base.forward_or_readout`)."""
        batch_first = getattr(transformer, "batch_first", True)
        blocks = transformer.resblocks
        keeps = [reads.keeps(i, fan_out) for i in range(len(blocks))]
        stops = [reads.path(i, fan_out, x.dtype) == "readout" for i in range(len(blocks))]
        with Capture() as capture:
            read = [blk for blk, keep, stop in zip(blocks, keeps, stops) if keep and not stop]
            attention_probabilities(capture, read, run.attentions.append, reads.runs_kept(x.dtype))
            stopping = [blk for blk, stop in zip(blocks, stops) if stop]
            attention_probabilities(capture, stopping, run.attentions.append, kept=True, stop=True)
            for i, blk in enumerate(blocks):
                if fan_out is not None and i == fan_out.block:
                    x = run.graph_input = fan_out.enter(x)
                    attn_mask = fanned_mask
                x = block_entry(x, i, detach_blocks)
                run.block_inputs.append(x)
                out = blk(x if batch_first else x.transpose(0, 1), attn_mask=attn_mask)
                if not keeps[i]:
                    run.attentions.append(None)
                x = out if batch_first else out.transpose(0, 1)
                run.block_outputs.append(x)
        return x

    def _positions(self, gh: int, gw: int) -> torch.Tensor:
        """(1 + gh*gw, C) position embeddings for a gh x gw grid: the checkpoint's own at its
        grid, else the patch part resampled bicubically (as transformers' CLIP does)."""
        visual = self.model.visual
        pos = visual.positional_embedding
        g0h, g0w = visual.grid_size
        if (gh, gw) == (g0h, g0w):
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        c = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, g0h, g0w, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(gh * gw, c)])

    def run_image(
        self,
        pixel_values: torch.Tensor,
        *,
        detach_blocks: bool = False,
        input_embeds: torch.Tensor | None = None,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        visual = self.model.visual
        layout = self._image_layout(pixel_values, class_token=True, pooled=self._attention_pooled)
        if fan_out is not None:
            layout = fan_out.layout(layout)
        b = pixel_values.shape[0]
        gh, gw = layout.grid
        run = TowerRun("image", embeds=None, layout=layout, pixel_values=pixel_values)  # type: ignore[arg-type]
        dtype = visual.conv1.weight.dtype
        x = visual.conv1(pixel_values.to(dtype))  # (B, C, gh, gw)
        x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positions(gh, gw).to(x.dtype)
        x = run_input_embeds(x, input_embeds)
        run.input_embeds = x
        x = visual.ln_pre(visual.patch_dropout(x))
        stream = x

        def blocks() -> torch.Tensor:
            return self._blocks(visual.transformer, stream, None, run, detach_blocks, fan_out, None, reads)

        x = forward_or_readout(self, run, blocks)
        if x is not None:
            run.embeds, run.pool_attention, run.pooled = self._image_readout(x)
        return run

    @property
    def _attention_pooled(self) -> bool:
        """Whether the image tower reads out through an attentional pooler (CoCa-style)."""
        return getattr(self.model.visual, "attn_pool", None) is not None

    def _image_readout(self, x: torch.Tensor):
        """(B, n, C) last block output -> (embeds, pool_attention or None, pooled)."""
        visual = self.model.visual
        if not self._attention_pooled:
            pooled = visual.ln_post(x[:, 0])
            return self._image_project(pooled), None, pooled
        # the first query of the attentional pooler is read out (pool_type "tok"); queries do
        # not interact, so that query alone is computed (its probabilities stay in the graph)
        pooler = visual.attn_pool
        keys = pooler.ln_k(x)
        probe = pooler.ln_q(pooler.query[:1]).unsqueeze(0).expand(x.shape[0], -1, -1)
        if not pooler.attn.batch_first:
            probe, keys = probe.transpose(0, 1), keys.transpose(0, 1)
        out, probs = mha_with_probabilities(pooler.attn, probe, keys, keys)
        if not pooler.attn.batch_first:
            out = out.transpose(0, 1)
        pooled = visual.ln_post(out)[:, 0]
        return self._image_project(pooled), probs, pooled

    def _image_project(self, normed: torch.Tensor) -> torch.Tensor:
        proj = self.model.visual.proj
        return normed @ proj if proj is not None else normed

    def run_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        detach_blocks: bool = False,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        text = self.text
        P, T = input_ids.shape
        if T > self.context_length:
            raise InputError(f"{T} text tokens exceed the model's context of {self.context_length}")
        readout = self._readout_positions(input_ids)
        valid = attention_mask.bool()
        layout = TokenLayout(readout=readout, content=self._content(input_ids, valid), valid=valid)
        if fan_out is not None:
            layout = fan_out.layout(layout)
        run = TowerRun("text", embeds=None, layout=layout)  # type: ignore[arg-type]
        dtype = (
            text.transformer.get_cast_dtype() if hasattr(text.transformer, "get_cast_dtype") else self.dtype
        )
        x = text.token_embedding(input_ids).to(dtype) + text.positional_embedding[:T].to(dtype)
        x = run_input_embeds(x, None)
        run.input_embeds = x
        mask = self._causal
        mask = mask[:T, :T] if mask is not None else None
        if getattr(text, "use_pad_mask", False):
            keep = input_ids != self._pad_id
            pad = torch.zeros(P, T, T, dtype=x.dtype, device=x.device)
            pad = pad.masked_fill(~keep[:, None, :], float("-inf"))
            pad = pad.repeat_interleave(text.transformer.resblocks[0].attn.num_heads, 0)
            mask = pad if mask is None else mask[None] + pad
        # a per-row padding mask (P*heads, T, T) is tiled with the rows from the fan-out block on
        fanned_mask = fan_out.rows(mask) if fan_out is not None and mask is not None and mask.dim() == 3 else mask
        stream = x

        def blocks() -> torch.Tensor:
            stack = text.transformer
            return self._blocks(stack, stream, mask, run, detach_blocks, fan_out, fanned_mask, reads)

        x = forward_or_readout(self, run, blocks)
        if x is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            run.pooled = text.ln_final(x[rows, layout.readout])
            run.embeds = self._text_project(run.pooled)
        return run

    def _text_project(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.text.text_projection
        if proj is None:
            return pooled
        if isinstance(proj, torch.nn.Linear):
            return proj(pooled)
        return pooled @ proj

    def head(self, tower: str, pooled: torch.Tensor) -> torch.Tensor:
        if tower == "image":
            if self._attention_pooled:
                raise NotImplementedError(
                    "an attention-pooled open_clip image tower reads out through its attentional pooler, "
                    "not a final norm and projection"
                )
            return self._image_project(self.model.visual.ln_post(pooled))
        return self._text_project(self.text.ln_final(pooled))

    def readout_with_attention(
        self, tower: str, hidden: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tower == "image" and self._attention_pooled:
            embeds, pool_attention, _ = self._image_readout(hidden)
            return embeds, pool_attention
        return super().readout_with_attention(tower, hidden, layout)

    # ---- linear pieces (see ModelAdapter) ------------------------------------------------
    def _block(self, tower: str, layer_index: int):
        transformer = self.model.visual.transformer if tower == "image" else self.text.transformer
        blk = transformer.resblocks[layer_index]
        if not isinstance(blk.attn, torch.nn.MultiheadAttention):
            raise NotImplementedError(
                "open_clip custom attention blocks (qk norm, scaled cosine, inner norms) "
                "have no exact linear split"
            )
        return blk

    @staticmethod
    def _scale(layer_scale) -> torch.Tensor | None:
        return getattr(layer_scale, "gamma", None)

    def attention_value_heads(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        blk = self._block(tower, layer_index)
        mha = blk.attn
        c, h = mha.embed_dim, mha.num_heads
        values = self.attention_values(tower, layer_index, block_input)  # (B, H, n, d)
        heads = torch.einsum("bhnd,chd->bhnc", values, mha.out_proj.weight.reshape(c, h, c // h))
        gamma = self._scale(blk.ls_1)
        return heads * gamma if gamma is not None else heads

    @staticmethod
    def _in_projection(blk, x: torch.Tensor, part: int) -> torch.Tensor:
        """(B, n, C) normed stream -> (B, H, n, d): the query (``part`` 0), key (1) or value (2)
        third of ``nn.MultiheadAttention``'s in-projection, per head."""
        mha = blk.attn
        c, h = mha.embed_dim, mha.num_heads
        rows = slice(part * c, (part + 1) * c)
        bias = mha.in_proj_bias
        y = F.linear(x, mha.in_proj_weight[rows], None if bias is None else bias[rows])
        b, n, _ = y.shape
        return y.reshape(b, n, h, c // h).transpose(1, 2)

    def attention_qk(
        self, tower: str, layer_index: int, block_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self._block(tower, layer_index)
        x = blk.ln_1(block_input)
        return self._in_projection(blk, x, 0), self._in_projection(blk, x, 1)

    def attention_values(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        blk = self._block(tower, layer_index)
        return self._in_projection(blk, blk.ln_1(block_input), 2)

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        blk = self._block(tower, layer_index)
        bias = blk.attn.out_proj.bias
        gamma = self._scale(blk.ls_1)
        if bias is None or gamma is None:
            return bias
        return bias * gamma

    def attention_output(self, tower: str, layer_index: int, heads: torch.Tensor) -> torch.Tensor:
        blk = self._block(tower, layer_index)
        return blk.ls_1(blk.attn.out_proj(heads.flatten(-2)))

    # the MLP is a Sequential ending in its down-projection c_proj (c_fc, gelu[, ln], c_proj)
    def mlp_hidden(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        blk = self._block(tower, layer_index)
        return blk.mlp[:-1](blk.ln_2(hidden))

    def mlp_down(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        blk = self._block(tower, layer_index)
        return blk.ls_2(blk.mlp[-1](hidden))

    def readout_parts(self, tower: str) -> ReadoutParts:
        if tower == "image":
            visual = self.model.visual
            if self._attention_pooled:
                raise NotImplementedError("an attention-pooled open_clip image tower has no linear readout")
            norm, proj = visual.ln_post, visual.proj
            weight = proj.T if proj is not None else None
            return ReadoutParts("layernorm", norm.weight, norm.bias, float(norm.eps), weight, None)
        norm, proj = self.text.ln_final, self.text.text_projection
        if isinstance(proj, torch.nn.Linear):
            return ReadoutParts("layernorm", norm.weight, norm.bias, float(norm.eps), proj.weight, proj.bias)
        weight = proj.T if proj is not None else None
        return ReadoutParts("layernorm", norm.weight, norm.bias, float(norm.eps), weight, None)


# ---- tokenizers ---------------------------------------------------------------------------------


def default_tokenizer(model):
    """open_clip's CLIP BPE tokenizer (it ships its vocabulary, so it works offline)."""
    open_clip = import_open_clip()
    vocab = getattr(model, "vocab_size", None) or getattr(getattr(model, "text", None), "vocab_size", None)
    if vocab not in (None, 49408):
        raise ModelLoadError(
            f"this open_clip model has a {vocab}-token vocabulary; "
            "pass its tokenizer= (open_clip.get_tokenizer(name))"
        )
    return open_clip.tokenizer.SimpleTokenizer()


def _takes_context_length(tok) -> bool:
    try:
        return "context_length" in inspect.signature(tok.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _decode(tok, token_id: int) -> str:
    """How one token id reads. open_clip's ``HFTokenizer`` / ``SigLipTokenizer`` have no
    ``decode`` of their own: the transformers tokenizer they wrap decodes; a tokenizer with no
    decoding at all shows the id, as does an id outside the vocabulary."""
    decode = getattr(tok, "decode", None) or getattr(getattr(tok, "tokenizer", None), "decode", None)
    if decode is None:
        return str(token_id)
    try:
        text = decode([token_id])
    except (KeyError, IndexError):  # SimpleTokenizer: KeyError; SentencePiece: IndexError
        return str(token_id)
    return text.strip() or str(token_id)


def _truncated(tok, texts: list[str], ids: torch.Tensor, limit: int) -> list[bool]:
    """Whether the tokenizer cut each text to fit ``limit`` tokens, asked of the tokenizer itself
    rather than guessed from a token count. ``ids`` (P, limit) are the texts at the context
    length. Tokenised with one position more, a text that fits comes out the same plus one
    padding id; a cut text either reads differently within the first ``limit`` positions
    (tokenizers that end a cut text with their end marker, as open_clip's all do) or holds a
    token in the extra position (tokenizers that only cut). The padding id is the tokenizer's
    own: the extra position of an empty text."""
    more = torch.as_tensor(tok([*texts, ""], context_length=limit + 1), dtype=torch.long)
    more, pad = more[:-1], more[-1, limit]
    return ((more[:, :limit] != ids).any(dim=1) | (more[:, limit] != pad)).tolist()


def adapt_open_clip(model, tokenizer=None, *, preprocess=None, name: str | None = None) -> OpenClipAdapter:
    """An :class:`OpenClipAdapter` around an open_clip model object."""
    return OpenClipAdapter(model, tokenizer, preprocess=preprocess, name=name)
