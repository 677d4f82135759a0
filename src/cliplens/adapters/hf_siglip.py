"""Hugging Face transformers ``SiglipModel`` / ``Siglip2Model`` (SigLIP: sigmoid loss,
attention-pooled image tower): what SigLIP adds to the shared encoder layout
(:class:`~cliplens.adapters.hf_encoder.HFEncoderAdapter`).

Module paths used beyond the shared ones: ``vision_model.{post_layernorm, head.{probe,
attention, layernorm, mlp}}``, ``text_model.{final_layer_norm, head}``, ``logit_scale``,
``logit_bias``.

What differs from CLIP, and how the adapter handles it:

- The image tower has no class token. Its embedding is a multi-head attention pooling head
  (MAP): one learned probe attends over all patch tokens (an ``nn.MultiheadAttention``),
  then a residual MLP; there is no projection after it. ``TokenLayout.readout`` is -1 and
  the head's per-head probabilities (B, H, 1, n) go to ``TowerRun.pool_attention``. The
  ``nn.MultiheadAttention`` call returns no per-head probabilities in the graph, so for the
  call only that one instance computes attention head by head from its own weights
  (:meth:`~cliplens.adapters.capture.Capture.mha_probabilities`).
- The text tower has no causal mask and reads out the LAST position (which is padding for
  short prompts: SigLIP was trained on prompts padded to ``max_length``, so the adapter pads
  the same way). The readout token is position T-1 for every prompt.
- A pair's probability is ``sigmoid(logit_scale * cos + logit_bias)``, each pair on its own.
- Any input size: position embeddings are interpolated for the call
  (``interpolate_pos_encoding=True``); the checkpoint's own resize is a squash to the model
  size (no centre crop), which :class:`SquashPreprocess` reproduces with its geometry.
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..preprocess import (  # noqa: F401 (the recipes' old import path)
    SIGLIP_MEAN,
    SIGLIP_STD,
    NaFlexPreprocess,
    Preprocess,
    SquashPreprocess,
    naflex_preprocess_from_config,
    siglip_preprocess_from_config,
    size_for_max_patches,
)
from .base import Checkpoint, FanOut, TextBatch, TokenLayout, TowerRun, forward_or_readout
from .capture import Capture
from .hf_encoder import HFEncoderAdapter
from .kept import EVERY_BLOCK, AttentionReads

#: config.json model_type values this file's adapters take
HF_SIGLIP_TYPES = {"siglip", "siglip2"}


class HFSiglipAdapter(HFEncoderAdapter):
    family = "hf-siglip"
    pair_probability = "sigmoid"
    model_class = "SiglipModel"
    label = "SigLIP"

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        vcfg = model.config.vision_config
        if not getattr(vcfg, "vision_use_head", True) or getattr(model.vision_model, "head", None) is None:
            raise ModelLoadError("this SigLIP model has no attention-pooling head (vision_use_head=False)")
        super().__init__(model, tokenizer, preprocess=preprocess, name=name)
        # Whether the model sees the padding mask: as in ``model(**tokenizer(...))``. SigLIP was
        # trained without one (pads are attended to); tokenizers that return a mask pass it on.
        self.text_uses_mask = "attention_mask" in (getattr(tokenizer, "model_input_names", None) or [])

    @staticmethod
    def _preprocess_from(processor_config: dict | None, vision_config) -> Preprocess:
        return siglip_preprocess_from_config(processor_config, vision_config.image_size)

    @classmethod
    def _for_config(cls, config) -> type[HFEncoderAdapter]:
        return HFSiglip2Adapter if config.model_type == "siglip2" else HFSiglipAdapter

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().reshape(())

    def logit_bias(self) -> torch.Tensor | None:
        return self.model.logit_bias.detach().reshape(())

    def capabilities(self, tower: str) -> frozenset[str]:
        # the image tower pools with an attention head (MAP) followed by an MLP: no readout
        # token, but the head's attention splits per (head, token) with its MLP as one term;
        # the text tower reads out its last position
        return frozenset({"pool_split"}) if tower == "image" else super().capabilities(tower)

    # ---- the pooling head's linear pieces (see ModelAdapter.pool_value_heads) -------------
    def _pool_head(self, tower: str):
        if tower != "image":
            raise NotImplementedError("SigLIP's text tower has no pooling head")
        return self.model.vision_model.head

    def pool_value_heads(self, tower: str, hidden: torch.Tensor) -> torch.Tensor:
        head = self._pool_head(tower)
        mha = head.attention
        c, h = mha.embed_dim, mha.num_heads
        bias = mha.in_proj_bias
        x = self.model.vision_model.post_layernorm(hidden)  # what the head attends over
        values = torch.nn.functional.linear(
            x, mha.in_proj_weight[2 * c :], None if bias is None else bias[2 * c :]
        )
        b, n, _ = values.shape
        w_o = mha.out_proj.weight.reshape(c, h, c // h)
        return torch.einsum("bnhd,chd->bhnc", values.reshape(b, n, h, c // h), w_o)

    def pool_out_bias(self, tower: str) -> torch.Tensor | None:
        return self._pool_head(tower).attention.out_proj.bias

    def pool_mlp_output(self, tower: str, attended: torch.Tensor) -> torch.Tensor:
        head = self._pool_head(tower)
        return head.mlp(head.layernorm(attended))

    # ---- inputs ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TextBatch:
        tok = self.tokenizer
        limit = self.context_length
        full = tok(list(texts), truncation=False)["input_ids"]
        enc = tok(
            list(texts),
            padding="max_length",
            max_length=limit,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        special = {
            getattr(tok, attr)
            for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id")
            if getattr(tok, attr, None) is not None
        }
        tokens = [self._token_strings(input_ids[i][mask[i].bool()].tolist()) for i in range(len(texts))]
        kept = mask.sum(-1).tolist()
        truncated = [len(f) > k for f, k in zip(full, kept)]
        content = mask.bool() & ~torch.isin(input_ids, torch.tensor(sorted(special), dtype=torch.long))
        return TextBatch(
            list(texts),
            input_ids.to(self.device),
            mask.to(self.device),
            tokens,
            truncated,
            content.to(self.device),
        )

    # ---- running -----------------------------------------------------------------------
    def run_image(
        self,
        pixel_values: torch.Tensor,
        *,
        detach_blocks: bool = False,
        input_embeds: torch.Tensor | None = None,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        vm = self.model.vision_model
        layout = self._image_layout(pixel_values, class_token=False, pooled=True)
        if fan_out is not None:
            layout = fan_out.layout(layout)
        run = TowerRun("image", embeds=None, layout=layout, pixel_values=pixel_values)  # type: ignore[arg-type]
        pool: list[torch.Tensor] = []
        with Capture() as capture:
            self._capture(capture, vm, run, detach_blocks, input_embeds, fan_out, reads)
            capture.mha_probabilities([vm.head.attention], lambda i, p: pool.append(p))
            out = self._vision_forward(vm, pixel_values, *layout.grid)
        run.pool_attention = pool[-1]
        # the head's output is the embedding: SigLIP has no projection after the pooling head
        run.pooled = out.pooler_output
        run.embeds = out.pooler_output
        return run

    def _vision_forward(self, vm, pixel_values: torch.Tensor, gh: int, gw: int):
        """The vision tower on (B, 3, h, w) pixels, positions interpolated to the gh x gw grid."""
        return vm(pixel_values=pixel_values, interpolate_pos_encoding=True)

    def _readout_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """SigLIP's text tower pools the last position, whatever token sits there."""
        return torch.full(
            (input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device
        )

    def run_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        detach_blocks: bool = False,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        tm = self.model.text_model
        specials = [
            getattr(self.tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")
        ]
        content = attention_mask.bool()
        for sid in specials:
            if sid is not None:
                content = content & (input_ids != sid)
        layout = TokenLayout(
            readout=self._readout_positions(input_ids), content=content, valid=attention_mask.bool()
        )
        if fan_out is not None:
            layout = fan_out.layout(layout)
        run = TowerRun("text", embeds=None, layout=layout)  # type: ignore[arg-type]

        def forward():
            with Capture() as capture:
                self._capture(capture, tm, run, detach_blocks, fan_out=fan_out, reads=reads)
                return tm(input_ids=input_ids, attention_mask=attention_mask if self.text_uses_mask else None)

        out = forward_or_readout(self, run, forward)
        if out is not None:
            run.pooled = out.last_hidden_state[:, -1]  # last_hidden_state is after the final norm
            run.embeds = out.pooler_output if fan_out is None else tm.head(run.pooled)
        return run

    # ---- readout -----------------------------------------------------------------------
    def readout_with_attention(
        self, tower: str, hidden: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tower != "image":
            return super().readout_with_attention(tower, hidden, layout)
        vm = self.model.vision_model
        pool: list[torch.Tensor] = []
        with Capture() as capture:
            capture.mha_probabilities([vm.head.attention], lambda i, p: pool.append(p))
            embeds = vm.head(vm.post_layernorm(hidden))
        return embeds, pool[-1]

    def _head_modules(self, tower: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        if tower == "image":
            raise NotImplementedError(
                "SigLIP's image tower reads out through an attention-pooling head and an MLP"
            )
        tm = self.model.text_model
        return tm.final_layer_norm, tm.head


class HFSiglip2Adapter(HFSiglipAdapter):
    """transformers ``Siglip2Model`` (NaFlex): the SigLIP towers and pooling head, with the image
    given as a sequence of flattened patches plus its grid (``spatial_shapes``); the model itself
    resizes its position embeddings to that grid (bilinear, antialiased). Pixels (B, 3, h, w)
    are cut into patches here in the processor's order (row-major patches, each patch row-major
    with the channels innermost), every patch real (no padding patches)."""

    family = "hf-siglip2"
    model_class = "Siglip2Model"

    @staticmethod
    def _preprocess_from(processor_config: dict | None, vision_config) -> Preprocess:
        vcfg = vision_config
        return naflex_preprocess_from_config(processor_config, vcfg.patch_size, vcfg.num_patches)

    def _vision_forward(self, vm, pixel_values: torch.Tensor, gh: int, gw: int):
        b, c = pixel_values.shape[:2]
        p = self.patch_size[0]
        patches = (
            pixel_values.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        )
        shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixel_values.device)
        # every patch is real: no padding mask (a mask of ones masks nothing, and one of B rows
        # would not fit the per-pair rows of a fanned-out run)
        return vm(pixel_values=patches, pixel_attention_mask=None, spatial_shapes=shapes)


def siglip_adapter(
    model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None
) -> HFSiglipAdapter:
    """The adapter of this file that fits ``model`` (SiglipModel or Siglip2Model)."""
    cls = HFSiglip2Adapter if HFSiglip2Adapter.matches(model) else HFSiglipAdapter
    return cls(model, tokenizer, preprocess=preprocess, name=name)


def load_hf_siglip(
    source, dtype: torch.dtype, name: str, *, local_files_only: bool = True, processor_config=None
) -> HFSiglipAdapter:
    """A :class:`HFSiglipAdapter` (or :class:`HFSiglip2Adapter`) from a local directory or a
    cached/reachable hub name: :meth:`HFSiglipAdapter.load` under its old name."""
    checkpoint = Checkpoint(str(source), name, dtype, None, local_files_only, processor_config)
    return HFSiglipAdapter.load(checkpoint)
