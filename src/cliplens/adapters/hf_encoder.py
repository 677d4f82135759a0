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
from .base import Checkpoint, ModelAdapter, ReadoutParts, TowerRun, block_entry, run_input_embeds
from .capture import Capture


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
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        source, local, name = checkpoint.source, checkpoint.local_files_only, checkpoint.name
        try:
            adapter_class = cls._for_config(AutoConfig.from_pretrained(source, local_files_only=local))
            model_class = getattr(transformers, adapter_class.model_class)
            model = model_class.from_pretrained(source, dtype=checkpoint.dtype, local_files_only=local)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).splitlines()[0]
            raise ModelLoadError(f"{name}: could not load the {cls.label} checkpoint ({first})") from None
        tokenizer = checkpoint.tokenizer
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
            except (OSError, ValueError, ImportError) as exc:
                # e.g. SigLIP's own tokenizer is SentencePiece: name the missing piece, not fail later
                first = str(exc).splitlines()[0]
                raise ModelLoadError(f"{name}: could not load the {cls.label} tokenizer ({first})") from None
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
    def num_layers(self) -> dict[str, int]:
        return {"image": len(self.blocks("image")), "text": len(self.blocks("text"))}

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
        """How each token id reads, for the token scores of a text."""
        tok = self.tokenizer
        return [tok.decode([t]).strip() or tok.convert_ids_to_tokens(t) for t in ids]

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
    ) -> None:
        """Hooks on ``tower_module`` (for one run, in ``capture``) that fill ``run``: the embedding
        output (or ``input_embeds`` in its place) as ``run.input_embeds``, each layer's input and
        output, each layer's attention probabilities."""

        def on_embed(module, args, output):
            leaf = run_input_embeds(output, input_embeds)
            run.input_embeds = leaf
            return leaf

        capture.forward_hook(tower_module.embeddings, on_embed)
        for i, layer in enumerate(tower_module.encoder.layers):

            def pre(module, args, kwargs, i=i):
                hidden = block_entry(args[0] if args else kwargs["hidden_states"], i, detach_blocks)
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

            capture.forward_pre_hook(layer, pre, with_kwargs=True)
            capture.forward_hook(layer, post)
            capture.forward_hook(layer.self_attn, on_attn)

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
        layer = self._layer(tower, layer_index)
        attn = layer.self_attn
        values = attn.v_proj(layer.layer_norm1(block_input))  # (B, n, C)
        b, n, c = values.shape
        h, d = attn.num_heads, attn.head_dim
        w_o = attn.out_proj.weight.reshape(c, h, d)  # out = sum_h W_O[:, h-slice] @ v_h
        return torch.einsum("bnhd,chd->bhnc", values.reshape(b, n, h, d), w_o)

    def attention_qk(
        self, tower: str, layer_index: int, block_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._layer(tower, layer_index)
        attn = layer.self_attn
        x = layer.layer_norm1(block_input)
        b, n, _ = x.shape
        h, d = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).reshape(b, n, h, d).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, h, d).transpose(1, 2)
        return q, k

    def attention_out_bias(self, tower: str, layer_index: int) -> torch.Tensor | None:
        return self._layer(tower, layer_index).self_attn.out_proj.bias

    def mlp_output(self, tower: str, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self._layer(tower, layer_index)
        return layer.mlp(layer.layer_norm2(hidden))
