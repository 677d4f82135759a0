"""Hugging Face transformers ``CLIPModel``.

Module paths used: ``vision_model.{embeddings, pre_layrnorm, encoder.layers[i].self_attn,
post_layernorm}``, ``visual_projection``, ``text_model.{embeddings, encoder.layers[i],
final_layer_norm}``, ``text_projection``, ``logit_scale``. Attention probabilities come from
the eager attention path (the only one that returns them), switched on for the call only.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError
from ..preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, preprocess_from_config  # noqa: F401 (old import path)
from .base import (
    ModelAdapter,
    ReadoutParts,
    TextBatch,
    TokenLayout,
    TowerRun,
    as_grad_leaf,
    frozen_eval,
    module_hooks,
)


def read_processor_config(directory: str | Path | None) -> dict | None:
    if directory is None:
        return None
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _all_configs(config) -> list:
    """The config and every nested sub-config (each holds its own attention setting)."""
    seen, stack, out = set(), [config], []
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return out


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch a transformers model to eager attention for the block; restore every
    (sub-)config's previous setting on exit."""
    configs = _all_configs(model.config)
    saved = [(cfg, cfg.__dict__.get("_attn_implementation_internal")) for cfg in configs]
    try:
        if any(cfg._attn_implementation != "eager" for cfg in configs):
            model.set_attn_implementation("eager")
        yield
    finally:
        for cfg, value in saved:
            cfg._attn_implementation_internal = value


class HFClipAdapter(ModelAdapter):
    family = "hf-clip"
    pair_probability = "softmax"

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        vcfg = model.config.vision_config
        self.preprocess = preprocess or preprocess_from_config(None, vcfg.image_size)
        self.name = name or getattr(model.config, "_name_or_path", "") or "CLIPModel"

    @staticmethod
    def matches(model) -> bool:
        try:
            from transformers import CLIPModel
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, CLIPModel)

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return (p, p)

    @property
    def num_layers(self) -> dict[str, int]:
        return {
            "image": len(self.model.vision_model.encoder.layers),
            "text": len(self.model.text_model.encoder.layers),
        }

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        return list(self._tower(tower).encoder.layers)

    # ---- inputs ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TextBatch:
        tok = self.tokenizer
        limit = self.context_length
        full = tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        kept = tok(list(texts), add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
        eos = self._eos_id()
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        width = max(len(ids) for ids in kept)
        input_ids = torch.full((len(texts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        tokens = []
        for i, ids in enumerate(kept):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            tokens.append([tok.decode([t]).strip() or tok.convert_ids_to_tokens(t) for t in ids])
        truncated = [len(f) > len(k) for f, k in zip(full, kept)]
        positions = torch.arange(width)[None]
        content = (positions > 0) & (positions < self._readout_positions(input_ids)[:, None])
        return TextBatch(list(texts), input_ids.to(self.device), mask.to(self.device), tokens, truncated, content)

    def _eos_id(self) -> int:
        eos = self.model.config.text_config.eos_token_id
        if eos == 2 or eos is None:  # legacy configs: the end token is the largest id
            return int(self.tokenizer.eos_token_id)
        return int(eos)

    def _readout_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token the text tower pools, exactly as CLIPTextModel chooses it."""
        if self.model.config.text_config.eos_token_id == 2:
            return input_ids.to(torch.int).argmax(dim=-1).long()
        return (input_ids == self.model.config.text_config.eos_token_id).int().argmax(dim=-1).long()

    # ---- running -----------------------------------------------------------------------
    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        with frozen_eval(self.model), eager_attention(self.model):
            yield

    def _capture(self, tower_module, run: TowerRun, detach_blocks: bool, input_embeds: torch.Tensor | None = None):
        layers = tower_module.encoder.layers
        regs = []

        def on_embed(module, args, output):
            if input_embeds is not None:
                if input_embeds.shape != output.shape:
                    raise InputError(
                        f"input_embeds of shape {tuple(input_embeds.shape)} do not fit this input "
                        f"(the embeddings are {tuple(output.shape)})"
                    )
                output = input_embeds.to(output.dtype)
            leaf = as_grad_leaf(output)
            run.input_embeds = leaf
            return leaf

        regs.append(lambda: tower_module.embeddings.register_forward_hook(on_embed))
        for i, layer in enumerate(layers):

            def pre(module, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                if detach_blocks and i > 0:
                    # a new leaf with the same values: gradients still reach this block's
                    # attention, but stop here instead of flowing into earlier blocks
                    hidden = hidden.detach().requires_grad_(hidden.requires_grad)
                run.block_inputs.append(hidden)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            def post(module, args, output):
                run.block_outputs.append(output[0] if isinstance(output, tuple) else output)

            def on_attn(module, args, output):
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError("attention probabilities were not returned; eager attention is required")
                run.attentions.append(weights)

            regs.append(lambda layer=layer, pre=pre: layer.register_forward_pre_hook(pre, with_kwargs=True))
            regs.append(lambda layer=layer, post=post: layer.register_forward_hook(post))
            regs.append(lambda layer=layer, on_attn=on_attn: layer.self_attn.register_forward_hook(on_attn))
        return module_hooks(regs)

    def run_image(
        self, pixel_values: torch.Tensor, *, detach_blocks: bool = False, input_embeds: torch.Tensor | None = None
    ) -> TowerRun:
        vm = self.model.vision_model
        b, _, h, w = pixel_values.shape
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise InputError(f"image input {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        gh, gw = h // ph, w // pw
        n = 1 + gh * gw
        dev = pixel_values.device
        content = torch.zeros(b, n, dtype=torch.bool, device=dev)
        content[:, 1:] = True
        layout = TokenLayout(
            readout=torch.zeros(b, dtype=torch.long, device=dev),
            content=content,
            valid=torch.ones(b, n, dtype=torch.bool, device=dev),
            grid=(gh, gw),
            patches=torch.arange(1, n, device=dev),
        )
        run = TowerRun("image", embeds=None, layout=layout, pixel_values=pixel_values)  # type: ignore[arg-type]
        with self._capture(vm, run, detach_blocks, input_embeds):
            out = vm(pixel_values=pixel_values, interpolate_pos_encoding=True)
        run.pooled = out.pooler_output
        run.embeds = self.model.visual_projection(run.pooled)
        return run

    def run_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, detach_blocks: bool = False
    ) -> TowerRun:
        tm = self.model.text_model
        readout = self._readout_positions(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        content = (positions > 0) & (positions < readout[:, None])
        layout = TokenLayout(readout=readout, content=content, valid=attention_mask.bool())
        run = TowerRun("text", embeds=None, layout=layout)  # type: ignore[arg-type]
        with self._capture(tm, run, detach_blocks):
            out = tm(input_ids=input_ids, attention_mask=attention_mask)
        run.pooled = out.pooler_output
        run.embeds = self.model.text_projection(run.pooled)
        return run

    def readout(self, tower: str, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        token = hidden[rows, layout.readout]
        if tower == "image":
            return self.model.visual_projection(self.model.vision_model.post_layernorm(token))
        return self.model.text_projection(self.model.text_model.final_layer_norm(token))

    # ---- linear pieces (see ModelAdapter) ------------------------------------------------
    def _tower(self, tower: str):
        return self.model.vision_model if tower == "image" else self.model.text_model

    def _layer(self, tower: str, layer_index: int):
        return self._tower(tower).encoder.layers[layer_index]

    def attention_value_heads(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        layer = self._layer(tower, layer_index)
        attn = layer.self_attn
        values = attn.v_proj(layer.layer_norm1(block_input))  # (B, n, C)
        b, n, c = values.shape
        h, d = attn.num_heads, attn.head_dim
        w_o = attn.out_proj.weight.reshape(c, h, d)  # out = sum_h W_O[:, h-slice] @ v_h
        return torch.einsum("bnhd,chd->bhnc", values.reshape(b, n, h, d), w_o)

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        return self._layer(tower, layer_index).self_attn.out_proj.bias

    def mlp_output(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self._layer(tower, layer_index)
        return layer.mlp(layer.layer_norm2(hidden))

    def readout_parts(self, tower: str) -> ReadoutParts:
        if tower == "image":
            norm, proj = self.model.vision_model.post_layernorm, self.model.visual_projection
        else:
            norm, proj = self.model.text_model.final_layer_norm, self.model.text_projection
        return ReadoutParts("layernorm", norm.weight, norm.bias, float(norm.eps), proj.weight, proj.bias)
