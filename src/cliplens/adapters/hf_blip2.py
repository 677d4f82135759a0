"""Hugging Face transformers ``Blip2ForImageTextRetrieval`` with its image-text matching head
(``use_image_text_matching_head=True``): a fusion model (:mod:`.fusion`).

What runs, in order:

- the ViT (``vision_model``): a class token then one token per patch, self-attention blocks,
  then a final layer norm over every token; all of these tokens (class token included) are the
  keys and values of the Q-Former's cross-attention;
- the Q-Former (``qformer``): its learned query tokens (``query_tokens``, 32 in the released
  checkpoints; they carry no position embedding) CONCATENATED with the prompt's BERT embeddings
  (``embeddings``: word and position embeddings of the text only), one sequence
  ``[queries, text]``. Every layer runs self-attention over the whole sequence (the text
  padding masked as keys); in every ``cross_attention_frequency``-th layer (``layer_idx %
  frequency == 0``) the QUERY tokens alone then cross-attend to the image tokens; the feed-forward
  part runs the query tokens through ``intermediate_query``/``output_query`` and the text tokens
  through ``intermediate``/``output`` (two FFNs, no attention in either);
- the ITM head (``itm_head``, linear, two logits: no match, match) on each QUERY token's output,
  averaged over the query tokens.

cliplens explains the pair logit ``itm[:, 1] - itm[:, 0]`` of the averaged logits, the log-odds
of a match, whose sigmoid is BLIP-2's match probability ``softmax(itm)[:, 1]``.

The run reports two streams: ``"image"`` (class token, then the patches in row-major order) and
``"qformer"`` (the query tokens, which show no image cell and no text token, then the text
tokens at their prompt positions; valid: every query token, the prompt's attention mask). Its
events, in execution order: one ``"self"`` event per ViT block; per Q-Former layer, a ``"self"``
event over the whole ``"qformer"`` stream and, in the layers that have one, a ``"cross"`` event
from ``"qformer"`` to ``"image"`` whose attending rows are the query tokens only
(``rows = slice(0, num_query_tokens)``, probabilities (N, H, num_query_tokens, n_image)). The
readout is ``("qformer", w)`` with ``w = 1 / num_query_tokens`` on each query token and 0 on the
text tokens: the head is linear, so the averaged logits are the head applied to the mean of the
query rows, and that mean is the row the relevance rules read out.

No text token cross-attends to the image in BLIP-2 (the text reaches the image only through the
query tokens' self-attention), so LAVIS's cross-attention Grad-CAM, which averages the TEXT
tokens' cross-attention rows, does not apply (``text_cross_attention = False``); rollout does
not either (``cross_attention = True``).

Image token placeholders: a checkpoint whose config sets ``image_token_index`` expects the
processor's ``num_query_tokens`` placeholder ids in front of the prompt (and ones in front of its
attention mask); the model cuts the ids off and uses the mask as given. ``run_pairs`` then
prepends them itself, so a :class:`~cliplens.adapters.base.TextBatch` is always the plain
``[CLS] prompt [SEP]`` tokens. Without ``image_token_index`` the model extends the mask itself.

Input size: the model's forward passes no ``interpolate_pos_encoding`` to its ViT (it accepts
only the checkpoint's ``image_size`` square); ``run_pairs`` adds ``interpolate_pos_encoding=True``
to that one call (a forward pre-hook) for any other size, as BLIP's own flag does (bicubic
interpolation of the position embeddings; the native size is untouched).

Module paths used: ``vision_model.{embeddings, encoder.layers[i].self_attn}`` (returns its
probabilities beside its output), ``embeddings`` (the Q-Former's input: queries and text),
``qformer.encoder.layer[i].{attention.attention, crossattention.attention, has_cross_attention,
intermediate}`` (``Blip2QFormerMultiHeadAttention`` returns its probabilities beside its output
on the eager path: the tensor multiplied with the values, so in the graph), ``query_tokens``,
``itm_head``; ``config.{num_query_tokens, image_token_index}``,
``config.vision_config.{patch_size, image_size}``, ``config.qformer_config.max_position_embeddings``.

Preprocessing: BLIP-2's processor is ``BlipImageProcessor``: a squash to ``size`` (224 x 224 for
Salesforce/blip2-itm-vit-g), OpenAI CLIP mean and std, bicubic; a ``preprocessor_config.json``
overrides them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import ModelLoadError
from ..preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, squash_preprocess_from_config
from .base import Checkpoint
from .capture import Capture
from .fusion import AttentionEvent, FusionAdapter, FusionRun, Stream, share_image_encoder

#: config.json model_type values this file's adapter takes
HF_BLIP2_TYPES = {"blip-2"}


class HFBlip2ITMAdapter(FusionAdapter):
    family = "hf-blip2-itm"
    model_classes = ("Blip2ForImageTextRetrieval",)
    load_unnamed = False
    label = "BLIP-2"
    supported = "its image-text matching head (Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g)"
    pair_probability = "sigmoid"
    cross_attention = True
    #: only the Q-Former's query tokens cross-attend to the image, never the text tokens
    text_cross_attention = False

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        check_blip2_model(model)
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.preprocess = preprocess or squash_preprocess_from_config(
            None, vision.image_size, OPENAI_MEAN, OPENAI_STD
        )
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> HFBlip2ITMAdapter:
        """A BLIP-2 image-text matching checkpoint (directory or hub name), its tokenizer and its
        image recipe; the other BLIP-2 heads (captioning with a language model, ...) are refused
        in one line."""
        model, tokenizer = cls.load_parts(checkpoint)
        vision = model.config.vision_config
        preprocess = squash_preprocess_from_config(
            checkpoint.processor_config, vision.image_size, OPENAI_MEAN, OPENAI_STD
        )
        return cls(model, tokenizer, preprocess=preprocess, name=checkpoint.name)

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return (p, p)

    @property
    def num_query_tokens(self) -> int:
        return int(self.model.query_tokens.shape[1])

    @property
    def context_length(self) -> int:
        # the text tokens' own positions (the query tokens have none)
        return int(self.model.config.qformer_config.max_position_embeddings)

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        """The ViT's blocks ("image") or the Q-Former's layers ("text": they run the prompt)."""
        if tower == "image":
            return list(self.model.vision_model.encoder.layers)
        return list(self.model.qformer.encoder.layer)

    # ---- running -----------------------------------------------------------------------
    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        with Capture() as capture:
            capture.freeze(self.model)
            # the language model's config (text_config): this head builds no language model, so
            # transformers would switch that config "in the dark" and warn on every call; it is
            # switched here first (and restored), which changes nothing the model runs
            unused = getattr(self.model.config, "text_config", None)
            if unused is not None and unused._attn_implementation != "eager":
                saved = unused.__dict__.get("_attn_implementation_internal")
                capture.on_exit(lambda: setattr(unused, "_attn_implementation_internal", saved))
                unused._attn_implementation_internal = "eager"
            capture.eager_attention(self.model)
            yield

    shares_image = True

    def run_pairs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_copies: int = 1
    ) -> FusionRun:
        model = self.model
        nq = self.num_query_tokens
        events: list[AttentionEvent] = []
        leaves: list[torch.Tensor] = []

        def leaf(module, args, output):
            # the ViT embeddings and the Q-Former's input (queries and text) as leaves: every
            # attention downstream is then in the graph
            out = output.detach().requires_grad_(torch.is_grad_enabled())
            leaves.append(out)
            return out

        def record(kind: str, query: str, key: str, stack: str, layer: int, rows: slice | None = None):
            def hook(module, args, output):
                probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if probs is None:
                    raise RuntimeError(
                        f"{type(module).__name__} returned no probabilities (not on the eager path)"
                    )
                if rows is not None and probs.shape[2] != rows.stop - rows.start:
                    raise RuntimeError(
                        f"BLIP-2 cross-attention has {probs.shape[2]} attending rows, expected the {nq} query tokens"
                    )
                # the ViT runs once per image: its events have one row per image
                per_image = "image" if stack == "image" and self.shares_image else None
                events.append(
                    AttentionEvent(kind, query, key, probs, stack, layer, step=len(events), rows=rows, shared=per_image)
                )

            return hook

        h, w = pixel_values.shape[-2:]
        size = model.config.vision_config.image_size

        def interpolate(module, args, kwargs):
            # the ITM forward passes no interpolate_pos_encoding to its ViT
            return args, {**kwargs, "interpolate_pos_encoding": True}

        N, T = input_ids.shape
        ids, mask = input_ids, attention_mask
        placeholder = model.config.image_token_index
        if placeholder is not None:
            # the processor's query placeholders in front of the ids, which the model cuts off again
            ids = torch.cat([input_ids.new_full((N, nq), int(placeholder)), input_ids], dim=1)
            mask = torch.cat([attention_mask.new_ones((N, nq)), attention_mask], dim=1)
        with Capture() as capture:
            if (h, w) != (size, size):
                capture.forward_pre_hook(model.vision_model, interpolate, with_kwargs=True)
            shared = []
            if self.shares_image:
                shared = [share_image_encoder(capture, model.vision_model, self.blocks("image"), image_copies)]
            capture.forward_hook(model.vision_model.embeddings, leaf)
            capture.forward_hook(model.embeddings, leaf)
            for i, layer in enumerate(self.blocks("image")):
                capture.forward_hook(layer.self_attn, record("self", "image", "image", "image", i))
            for i, layer in enumerate(self.blocks("text")):
                capture.forward_hook(
                    layer.attention.attention, record("self", "qformer", "qformer", "qformer", i)
                )
                if layer.has_cross_attention:
                    cross = record("cross", "qformer", "image", "qformer", i, rows=slice(0, nq))
                    capture.forward_hook(layer.crossattention.attention, cross)
            itm = model(
                pixel_values=pixel_values,
                input_ids=ids,
                attention_mask=mask,
                use_image_text_matching_head=True,
                return_dict=True,
            ).logits_per_image
        device = input_ids.device
        grid = (h // self.patch_size[0], w // self.patch_size[1])
        positions = torch.cat(
            [
                torch.full((N, nq), -1, dtype=torch.long, device=device),
                torch.arange(T, device=device).expand(N, T),
            ],
            dim=1,
        )
        valid = torch.cat(
            [torch.ones((N, nq), dtype=torch.bool, device=device), attention_mask.bool()], dim=1
        )
        streams = {
            "image": Stream.of_image("image", N, grid, 1, pixel_values.device),
            "qformer": Stream("qformer", torch.full_like(positions, -1), positions, valid),
        }
        weights = torch.zeros(N, nq + T, device=device)
        weights[:, :nq] = 1.0 / nq  # the head's logits are averaged over the query tokens
        for part in shared:
            leaves.extend(part.leaves)  # the pairs' backward ends at the ViT's per-pair output
        return FusionRun(itm[:, 1] - itm[:, 0], streams, events, ("qformer", weights), grid, leaves, shared)


def check_blip2_model(model) -> None:
    """Refuse a BLIP-2 model that cannot run the image-text matching head over a prompt."""
    qformer = getattr(model, "qformer", None)
    layers = getattr(getattr(qformer, "encoder", None), "layer", None)
    if not layers or getattr(model, "itm_head", None) is None or getattr(model, "query_tokens", None) is None:
        raise ModelLoadError(
            "this BLIP-2 model has no image-text matching head; cliplens explains Blip2ForImageTextRetrieval "
            "(e.g. Salesforce/blip2-itm-vit-g)"
        )
    if not all(hasattr(layer, "intermediate") for layer in layers):
        raise ModelLoadError(
            "this BLIP-2 Q-Former has no feed-forward path for text tokens (use_qformer_text_input=False): "
            "it cannot run the image-text matching head over a prompt"
        )
