"""Hugging Face transformers ``BlipForImageTextRetrieval`` with its image-text matching head: a
fusion model (:mod:`.fusion`).

The ViT image encoder runs first, once per image (``shares_image``: the pairs read per-pair
copies of its output); then every layer of the BERT-style text encoder runs
self-attention over the prompt and cross-attention from the prompt's tokens to the image
tokens; the ITM head reads the first text token ([CLS]) and gives two logits (no match,
match). cliplens explains the pair logit ``itm[:, 1] - itm[:, 0]``, the log-odds of a match,
whose sigmoid is BLIP's match probability ``softmax(itm)[:, 1]``. (LAVIS's Grad-CAM
back-propagates ``itm[:, 1]`` alone; the two differ by the no-match logit.)

Module paths used: ``vision_model.{embeddings, encoder.layers[i].self_attn}``,
``text_encoder.{embeddings, encoder.layer[i].attention.self, encoder.layer[i].crossattention.self}``
(each attention module returns its probabilities beside its output, on every path), ``itm_head``;
``config.vision_config.{patch_size, image_size}``, ``config.text_config.max_position_embeddings``.
transformers returns none of the text encoder's self- or cross-attention: they are captured by
forward hooks on those modules, for the call only.
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, squash_preprocess_from_config
from .base import Checkpoint
from .capture import Capture
from .fusion import AttentionEvent, FusionAdapter, FusionRun, Stream, readout_token, share_image_encoder

#: config.json model_type values this file's adapter takes
HF_BLIP_TYPES = {"blip"}


class HFBlipITMAdapter(FusionAdapter):
    family = "hf-blip-itm"
    model_classes = ("BlipForImageTextRetrieval",)
    label = "BLIP"
    supported = "its image-text matching head (BlipForImageTextRetrieval, e.g. Salesforce/blip-itm-base-coco)"

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        check_blip_model(model)
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.preprocess = preprocess or squash_preprocess_from_config(None, vision.image_size, OPENAI_MEAN, OPENAI_STD)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> HFBlipITMAdapter:
        """A BLIP image-text matching checkpoint (directory or hub name), its tokenizer and its
        image recipe; other BLIP heads (captioning, VQA) are refused in one line."""
        model, tokenizer = cls.load_parts(checkpoint)
        vision = model.config.vision_config
        preprocess = squash_preprocess_from_config(checkpoint.processor_config, vision.image_size, OPENAI_MEAN, OPENAI_STD)
        return cls(model, tokenizer, preprocess=preprocess, name=checkpoint.name)

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return (p, p)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        if tower == "image":
            return list(self.model.vision_model.encoder.layers)
        return list(self.model.text_encoder.encoder.layer)

    # ---- running -----------------------------------------------------------------------
    shares_image = True

    def run_pairs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_copies: int = 1
    ) -> FusionRun:
        model = self.model
        events: list[AttentionEvent] = []
        leaves: list[torch.Tensor] = []

        def leaf(module, args, output):
            # the embeddings as a leaf: every attention downstream is then in the graph
            out = output.detach().requires_grad_(torch.is_grad_enabled())
            leaves.append(out)
            return out

        def record(kind: str, query: str, key: str, stack: str, layer: int):
            def hook(module, args, output):
                # the ViT runs once per image: its events have one row per image
                per_image = "image" if stack == "image" and self.shares_image else None
                events.append(AttentionEvent(kind, query, key, output[1], stack, layer, step=len(events), shared=per_image))

            return hook

        with Capture() as capture:
            shared = []
            if self.shares_image:
                shared = [share_image_encoder(capture, model.vision_model, self.blocks("image"), image_copies)]
            capture.forward_hook(model.vision_model.embeddings, leaf)
            capture.forward_hook(model.text_encoder.embeddings, leaf)
            for i, layer in enumerate(self.blocks("image")):
                capture.forward_hook(layer.self_attn, record("self", "image", "image", "image", i))
            for i, layer in enumerate(self.blocks("text")):
                capture.forward_hook(layer.attention.self, record("self", "text", "text", "text", i))
                capture.forward_hook(layer.crossattention.self, record("cross", "text", "image", "text", i))
            h, w = pixel_values.shape[-2:]
            size = self.model.config.vision_config.image_size
            itm = model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                use_itm_head=True,
                interpolate_pos_encoding=(h, w) != (size, size),
            ).itm_score
        N = input_ids.shape[0]
        grid = (h // self.patch_size[0], w // self.patch_size[1])
        streams = {
            "image": Stream.of_image("image", N, grid, 1, pixel_values.device),
            "text": Stream.of_text("text", attention_mask),
        }
        readout = ("text", readout_token(N, input_ids.shape[1], 0, input_ids.device))
        for part in shared:
            leaves.extend(part.leaves)  # the pairs' backward ends at the ViT's per-pair output
        return FusionRun(itm[:, 1] - itm[:, 0], streams, events, readout, grid, leaves, shared)


def check_blip_model(model) -> None:
    """Refuse a BLIP model whose text encoder has no cross-attention (not an ITM model)."""
    layers = getattr(getattr(getattr(model, "text_encoder", None), "encoder", None), "layer", None)
    if not layers or not all(hasattr(layer, "crossattention") for layer in layers):
        raise ModelLoadError("this BLIP model's text encoder has no cross-attention to the image (is_decoder=False)")
