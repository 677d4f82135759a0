"""Hugging Face transformers ``BlipForImageTextRetrieval`` in its image-text contrastive mode
(``use_itm_head=False``): BLIP's ITC score, a dual encoder.

In that mode the two towers run apart and transformers' own score is a plain cosine, with no
temperature (the class has no logit scale; ``BlipModel``'s ``logit_scale`` is not part of it):

    image = normalize(vision_proj(post_layernorm(ViT(pixels))[:, 0]))
    text  = normalize(text_proj(text_encoder(ids, mask)[:, 0]))        # no encoder_hidden_states
    itm_score = image @ text.T

so :meth:`HFBlipITCAdapter.logit_scale` is 1 and a pair's logit is the cosine itself; its
probability is the softmax over the prompts (BLIP's ITC), which at scale 1 stays close to
uniform. The text encoder runs without the image, so its cross-attention is skipped and each
layer is BERT's post-norm self-attention block, bidirectional over the prompt's real tokens.

Module paths used: ``vision_model.{embeddings, encoder.layers[i].{layer_norm1, self_attn.{qkv,
projection}, layer_norm2, mlp}, post_layernorm}``, ``vision_proj``, ``text_encoder.{embeddings,
encoder.layer[i].attention.self}``, ``text_proj``; ``config.vision_config.patch_size``,
``config.text_config.max_position_embeddings``.

The checkpoints are BLIP image-text matching ones (model_type ``blip``, which the fusion
adapter :class:`~cliplens.adapters.hf_blip.HFBlipITMAdapter` takes): this mode is asked for by
a spec prefix, ``"blip-itc:Salesforce/blip-itm-base-coco"`` or ``"blip-itc:./my-blip"``, or by
wrapping a model object in :class:`HFBlipITCAdapter` directly.

The image tower (pre-norm ViT, class-token readout through ``post_layernorm`` and
``vision_proj``) exposes its exact linear pieces ("linear_split"); the text tower's blocks are
post-norm (a LayerNorm after each residual sum), which has no such split: methods that need it
on the text tower are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from ..preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, squash_preprocess_from_config
from . import hub
from .base import (
    Checkpoint,
    FanOut,
    ModelAdapter,
    ReadoutParts,
    TextBatch,
    TokenLayout,
    TowerRun,
)
from .capture import Capture
from .fusion import bert_tokenize
from .hf_blip import HFBlipITMAdapter
from .hf_encoder import capture_tower
from .kept import EVERY_BLOCK, AttentionReads

#: the spec prefixes that load a BLIP ITM checkpoint in this mode
BLIP_ITC_PREFIXES = ("blip-itc:",)


class HFBlipITCAdapter(ModelAdapter):
    family = "hf-blip-itc"
    #: BLIP's ITC: a softmax over the prompts (the model's own score has no temperature)
    pair_probability = "softmax"
    fusion = False

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.preprocess = preprocess or squash_preprocess_from_config(None, vision.image_size, OPENAI_MEAN, OPENAI_STD)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> HFBlipITCAdapter:
        """A BLIP image-text matching checkpoint (directory, or hub name from the cache or the hub
        when it can be used), run in its contrastive mode; other BLIP heads are refused in one line."""
        from . import ALIASES  # the embedded models ("blip-itc:shapes-blip")

        source = checkpoint.source
        if source in ALIASES:
            checkpoint = dataclasses.replace(checkpoint, source=str(ALIASES[source]))
            source = checkpoint.source
        if Path(source).expanduser().is_dir():
            path = Path(source).expanduser()
            checkpoint = dataclasses.replace(
                checkpoint,
                source=str(path),
                local_files_only=True,
                processor_config=checkpoint.processor_config or hub.read_processor_config(path),
            )
        else:
            _, local = hub.hub_config(source)
            checkpoint = dataclasses.replace(
                checkpoint,
                local_files_only=local,
                processor_config=checkpoint.processor_config or hub.cached_processor_config(source),
            )
        model, tokenizer = HFBlipITMAdapter.load_parts(checkpoint)
        vision = model.config.vision_config
        preprocess = squash_preprocess_from_config(checkpoint.processor_config, vision.image_size, OPENAI_MEAN, OPENAI_STD)
        return cls(model, tokenizer, preprocess=preprocess, name=checkpoint.name)

    @classmethod
    def matches(cls, model) -> bool:
        """Never: a ``BlipForImageTextRetrieval`` object is the ITM adapter's by default; this mode
        is chosen by name (the ``blip-itc:`` prefix, or this class)."""
        return False

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return (p, p)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def logit_scale(self) -> torch.Tensor:
        """1: transformers' ITC score (``itm_score`` with ``use_itm_head=False``) is the bare cosine."""
        return torch.ones((), dtype=self.dtype, device=self.device)

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        if tower == "image":
            return list(self.model.vision_model.encoder.layers)
        return list(self.model.text_encoder.encoder.layer)

    def capabilities(self, tower: str) -> frozenset[str]:
        if tower == "image":
            return frozenset({"readout_token", "linear_split"})
        # post-norm BERT blocks: no exact linear split of the residual stream
        return frozenset({"readout_token"})

    # ---- inputs ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TextBatch:
        return bert_tokenize(self.tokenizer, texts, self.context_length, self.device)

    # ---- running -----------------------------------------------------------------------
    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        with Capture() as capture:
            capture.freeze(self.model)
            capture.eager_attention(self.model)
            yield

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
        layout = self._image_layout(pixel_values, class_token=True, pooled=False)
        if fan_out is not None:
            layout = fan_out.layout(layout)
        run = TowerRun("image", embeds=None, layout=layout, pixel_values=pixel_values)  # type: ignore[arg-type]
        layers = list(vm.encoder.layers)
        with Capture() as capture:
            attentions = [l.self_attn for l in layers]
            capture_tower(capture, vm.embeddings, layers, attentions, run, detach_blocks, input_embeds, fan_out, reads)
            # interpolation of the position embeddings is the identity at the model's own size
            out = vm(pixel_values=pixel_values, interpolate_pos_encoding=True)
        # the ITC path reads the class token of last_hidden_state (post_layernorm applied once;
        # not pooler_output, which applies it twice)
        run.pooled = out.last_hidden_state[:, 0]
        run.embeds = self.model.vision_proj(run.pooled)
        return run

    def run_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        detach_blocks: bool = False,
        fan_out: FanOut | None = None,
        reads: AttentionReads = EVERY_BLOCK,
    ) -> TowerRun:
        te = self.model.text_encoder
        valid = attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        lengths = attention_mask.long().sum(dim=1, keepdim=True)
        layout = TokenLayout(
            readout=torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device),
            content=(positions > 0) & (positions < lengths - 1),  # between [CLS] and [SEP]
            valid=valid,
        )
        if fan_out is not None:
            layout = fan_out.layout(layout)
        run = TowerRun("text", embeds=None, layout=layout)  # type: ignore[arg-type]
        layers = list(te.encoder.layer)
        with Capture() as capture:
            attentions = [l.attention.self for l in layers]
            capture_tower(capture, te.embeddings, layers, attentions, run, detach_blocks, None, fan_out, reads)
            # no encoder_hidden_states: the cross-attention to the image is skipped (ITC)
            hidden = te(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        run.pooled = hidden[:, 0]  # [CLS]; the last block's own LayerNorm is the final norm
        run.embeds = self.model.text_proj(run.pooled)
        return run

    # ---- readout -----------------------------------------------------------------------
    def head(self, tower: str, pooled: torch.Tensor) -> torch.Tensor:
        if tower == "image":
            return self.model.vision_proj(self.model.vision_model.post_layernorm(pooled))
        return self.model.text_proj(pooled)

    def readout_parts(self, tower: str) -> ReadoutParts:
        if tower == "image":
            norm, proj = self.model.vision_model.post_layernorm, self.model.vision_proj
            return ReadoutParts("layernorm", norm.weight, norm.bias, float(norm.eps), proj.weight, proj.bias)
        proj = self.model.text_proj
        return ReadoutParts("none", None, None, 0.0, proj.weight, proj.bias)

    # ---- linear pieces of the image tower (see ModelAdapter) -----------------------------
    def _vit_layer(self, tower: str, layer_index: int):
        if tower != "image":
            raise NotImplementedError(
                f"{type(self).__name__}: the text tower's blocks are post-norm; they have no exact linear split"
            )
        return self.model.vision_model.encoder.layers[layer_index]

    def _qkv(self, layer, block_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v), each (B, n, H, d), as BlipAttention splits its fused projection."""
        attn = layer.self_attn
        mixed = attn.qkv(layer.layer_norm1(block_input))  # (B, n, 3C): [q | k | v]
        b, n, _ = mixed.shape
        q, k, v = mixed.reshape(b, n, 3, attn.num_heads, attn.head_dim).unbind(dim=2)
        return q, k, v

    def attention_value_heads(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        attn = self._vit_layer(tower, layer_index).self_attn
        values = self.attention_values(tower, layer_index, block_input)  # (B, H, n, d)
        w_o = attn.projection.weight.reshape(attn.embed_dim, attn.num_heads, attn.head_dim)
        return torch.einsum("bhnd,chd->bhnc", values, w_o)

    def attention_qk(
        self, tower: str, layer_index: int, block_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = self._qkv(self._vit_layer(tower, layer_index), block_input)
        return q.transpose(1, 2), k.transpose(1, 2)

    def attention_values(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        _, _, v = self._qkv(self._vit_layer(tower, layer_index), block_input)
        return v.transpose(1, 2)

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        return self._vit_layer(tower, layer_index).self_attn.projection.bias

    def attention_output(self, tower: str, layer_index: int, heads: torch.Tensor) -> torch.Tensor:
        return self._vit_layer(tower, layer_index).self_attn.projection(heads.flatten(-2))

    def mlp_hidden(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self._vit_layer(tower, layer_index)
        return layer.mlp.activation_fn(layer.mlp.fc1(layer.layer_norm2(hidden)))

    def mlp_down(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._vit_layer(tower, layer_index).mlp.fc2(hidden)
