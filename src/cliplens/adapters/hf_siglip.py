"""Hugging Face transformers ``SiglipModel`` (SigLIP: sigmoid loss, attention-pooled image tower).

Module paths used: ``vision_model.{embeddings, encoder.layers[i].self_attn, post_layernorm,
head.{probe, attention, layernorm, mlp}}``, ``text_model.{embeddings, encoder.layers[i],
final_layer_norm, head}``, ``logit_scale``, ``logit_bias``.

What differs from CLIP, and how the adapter handles it:

- The image tower has no class token. Its embedding is a multi-head attention pooling head
  (MAP): one learned probe attends over all patch tokens (an ``nn.MultiheadAttention``),
  then a residual MLP; there is no projection after it. ``TokenLayout.readout`` is -1 and
  the head's per-head probabilities (B, H, 1, n) go to ``TowerRun.pool_attention``. The
  ``nn.MultiheadAttention`` call returns no per-head probabilities in the graph, so for the
  call only that one instance computes attention head by head from its own weights
  (:func:`~cliplens.adapters.base.mha_probabilities`).
- The text tower has no causal mask and reads out the LAST position (which is padding for
  short prompts: SigLIP was trained on prompts padded to ``max_length``, so the adapter pads
  the same way). The readout token is position T-1 for every prompt.
- A pair's probability is ``sigmoid(logit_scale * cos + logit_bias)``, each pair on its own.
- Any input size: position embeddings are interpolated for the call
  (``interpolate_pos_encoding=True``); the checkpoint's own resize is a squash to the model
  size (no centre crop), which :class:`SquashPreprocess` reproduces with its geometry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import InputError, ModelLoadError
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
from .base import (
    ModelAdapter,
    ReadoutParts,
    TextBatch,
    TokenLayout,
    TowerRun,
    as_grad_leaf,
    frozen_eval,
    mha_probabilities,
    module_hooks,
)
from .hf_clip import eager_attention

#: config.json model_type values this file's adapters take
HF_SIGLIP_TYPES = {"siglip", "siglip2"}


class HFSiglipAdapter(ModelAdapter):
    family = "hf-siglip"
    pair_probability = "sigmoid"

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        vcfg = model.config.vision_config
        if not getattr(vcfg, "vision_use_head", True) or getattr(model.vision_model, "head", None) is None:
            raise ModelLoadError("this SigLIP model has no attention-pooling head (vision_use_head=False)")
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess or self._default_preprocess(vcfg)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        # Whether the model sees the padding mask: as in ``model(**tokenizer(...))``. SigLIP was
        # trained without one (pads are attended to); tokenizers that return a mask pass it on.
        self.text_uses_mask = "attention_mask" in (getattr(tokenizer, "model_input_names", None) or [])

    @staticmethod
    def _default_preprocess(vcfg) -> Preprocess:
        return siglip_preprocess_from_config(None, vcfg.image_size)

    @staticmethod
    def matches(model) -> bool:
        try:
            from transformers import SiglipModel
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, SiglipModel)

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
        return self.model.logit_scale.detach().exp().reshape(())

    def logit_bias(self) -> torch.Tensor | None:
        return self.model.logit_bias.detach().reshape(())

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        tm = self.model.vision_model if tower == "image" else self.model.text_model
        return list(tm.encoder.layers)

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
        tokens = []
        for i in range(len(texts)):
            ids = input_ids[i][mask[i].bool()].tolist()
            tokens.append([tok.decode([t]).strip() or tok.convert_ids_to_tokens(t) for t in ids])
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
    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        with frozen_eval(self.model), eager_attention(self.model):
            yield

    def _capture(
        self, tower_module, run: TowerRun, detach_blocks: bool, input_embeds: torch.Tensor | None = None
    ):
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
        for i, layer in enumerate(tower_module.encoder.layers):

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
                    raise RuntimeError(
                        "attention probabilities were not returned; eager attention is required"
                    )
                run.attentions.append(weights)

            regs.append(lambda layer=layer, pre=pre: layer.register_forward_pre_hook(pre, with_kwargs=True))
            regs.append(lambda layer=layer, post=post: layer.register_forward_hook(post))
            regs.append(lambda layer=layer, on_attn=on_attn: layer.self_attn.register_forward_hook(on_attn))
        return module_hooks(regs)

    def run_image(
        self,
        pixel_values: torch.Tensor,
        *,
        detach_blocks: bool = False,
        input_embeds: torch.Tensor | None = None,
    ) -> TowerRun:
        vm = self.model.vision_model
        b, _, h, w = pixel_values.shape
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise InputError(f"image input {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        gh, gw = h // ph, w // pw
        n = gh * gw
        dev = pixel_values.device
        layout = TokenLayout(
            readout=torch.full((b,), -1, dtype=torch.long, device=dev),
            content=torch.ones(b, n, dtype=torch.bool, device=dev),
            valid=torch.ones(b, n, dtype=torch.bool, device=dev),
            grid=(gh, gw),
            patches=torch.arange(n, device=dev),
        )
        run = TowerRun("image", embeds=None, layout=layout, pixel_values=pixel_values)  # type: ignore[arg-type]
        pool: list[torch.Tensor] = []
        with (
            self._capture(vm, run, detach_blocks, input_embeds),
            mha_probabilities([vm.head.attention], lambda i, p: pool.append(p)),
        ):
            out = self._vision_forward(vm, pixel_values, gh, gw)
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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, detach_blocks: bool = False
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
        run = TowerRun("text", embeds=None, layout=layout)  # type: ignore[arg-type]
        with self._capture(tm, run, detach_blocks):
            out = tm(input_ids=input_ids, attention_mask=attention_mask if self.text_uses_mask else None)
        run.pooled = out.last_hidden_state[:, -1]  # last_hidden_state is after the final norm
        run.embeds = out.pooler_output
        return run

    def readout(self, tower: str, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.readout_with_attention(tower, hidden, layout)[0]

    def readout_with_attention(
        self, tower: str, hidden: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tower == "image":
            vm = self.model.vision_model
            pool: list[torch.Tensor] = []
            with mha_probabilities([vm.head.attention], lambda i, p: pool.append(p)):
                embeds = vm.head(vm.post_layernorm(hidden))
            return embeds, pool[-1]
        tm = self.model.text_model
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return tm.head(tm.final_layer_norm(hidden[rows, layout.readout])), None

    # ---- linear pieces (see ModelAdapter): the blocks are CLIP's; the image readout is not linear
    def _layer(self, tower: str, layer_index: int):
        tm = self.model.vision_model if tower == "image" else self.model.text_model
        return tm.encoder.layers[layer_index]

    def attention_value_heads(self, tower: str, layer_index: int, block_input: torch.Tensor) -> torch.Tensor:
        layer = self._layer(tower, layer_index)
        attn = layer.self_attn
        values = attn.v_proj(layer.layer_norm1(block_input))  # (B, n, C)
        b, n, c = values.shape
        h, d = attn.num_heads, attn.head_dim
        w_o = attn.out_proj.weight.reshape(c, h, d)
        return torch.einsum("bnhd,chd->bhnc", values.reshape(b, n, h, d), w_o)

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        return self._layer(tower, layer_index).self_attn.out_proj.bias

    def mlp_output(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self._layer(tower, layer_index)
        return layer.mlp(layer.layer_norm2(hidden))

    def readout_parts(self, tower: str) -> ReadoutParts:
        if tower == "image":
            raise NotImplementedError(
                "SigLIP's image tower reads out through an attention-pooling head and an MLP"
            )
        tm = self.model.text_model
        norm, head = tm.final_layer_norm, tm.head
        return ReadoutParts("layernorm", norm.weight, norm.bias, float(norm.eps), head.weight, head.bias)


class HFSiglip2Adapter(HFSiglipAdapter):
    """transformers ``Siglip2Model`` (NaFlex): the SigLIP towers and pooling head, with the image
    given as a sequence of flattened patches plus its grid (``spatial_shapes``); the model itself
    resizes its position embeddings to that grid (bilinear, antialiased). Pixels (B, 3, h, w)
    are cut into patches here in the processor's order (row-major patches, each patch row-major
    with the channels innermost), every patch real (no padding patches)."""

    family = "hf-siglip2"

    @staticmethod
    def _default_preprocess(vcfg) -> Preprocess:
        return naflex_preprocess_from_config(None, vcfg.patch_size, vcfg.num_patches)

    @staticmethod
    def matches(model) -> bool:
        try:
            from transformers import Siglip2Model
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, Siglip2Model)

    def _vision_forward(self, vm, pixel_values: torch.Tensor, gh: int, gw: int):
        b, c = pixel_values.shape[:2]
        p = self.patch_size[0]
        patches = (
            pixel_values.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        )
        mask = torch.ones(b, gh * gw, dtype=torch.long, device=pixel_values.device)
        shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixel_values.device)
        return vm(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)


def siglip_adapter(model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
    """The adapter of this file that fits ``model`` (SiglipModel or Siglip2Model)."""
    cls = HFSiglip2Adapter if HFSiglip2Adapter.matches(model) else HFSiglipAdapter
    return cls(model, tokenizer, preprocess=preprocess, name=name)


def load_hf_siglip(
    source, dtype: torch.dtype, name: str, *, local_files_only: bool = True, processor_config=None
):
    """A :class:`HFSiglipAdapter` from a local directory or a cached/reachable hub name."""
    from transformers import AutoConfig, AutoTokenizer, Siglip2Model, SiglipModel

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        model_class = Siglip2Model if config.model_type == "siglip2" else SiglipModel
        model = model_class.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{name}: could not load the SigLIP checkpoint ({str(exc).splitlines()[0]})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, ImportError) as exc:
        # SigLIP's own tokenizer is SentencePiece; name the missing piece rather than fail later
        raise ModelLoadError(
            f"{name}: could not load the SigLIP tokenizer ({str(exc).splitlines()[0]})"
        ) from None
    vcfg = model.config.vision_config
    if isinstance(model, Siglip2Model):
        pre = naflex_preprocess_from_config(processor_config, vcfg.patch_size, vcfg.num_patches)
    else:
        pre = siglip_preprocess_from_config(processor_config, vcfg.image_size)
    return siglip_adapter(model, tokenizer, preprocess=pre, name=name)
