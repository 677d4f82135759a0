"""Hugging Face transformers ``ViltForImageAndTextRetrieval``: a single-stream fusion model
(:mod:`.fusion`).

ViLT embeds the prompt (BERT embeddings) and the image (a class token and one token per patch),
concatenates them as ``[text tokens, image class token, patches]`` and runs ONE stack of
self-attention layers over the joint sequence; the pooler reads token 0 (the text [CLS]) and
``rank_output`` gives one logit per pair, whose sigmoid is the match probability. The adapter
reports one stream, ``"joint"``, and one ``"self"`` event per layer; there is no cross-attention
(``cross_attention = False``: Grad-CAM on a cross-attention layer does not apply, rollout does).

What ViLT does that the adapter undoes, for the call only:

- **Shuffled patches.** ``ViltEmbeddings.visual_embed`` draws the patch order with
  ``torch.multinomial`` on every call, in eval mode too, and returns the order it drew as
  ``patch_index`` ((row, col) of each patch token). The adapter wraps ``visual_embed`` of the one
  embeddings instance (an instance attribute, removed on exit) and records ``patch_index`` and the
  patch grid (height, width); each patch token's stream cell is ``row * width + col``, so maps come
  out in grid order whatever order was drawn. The logit itself depends on the draw only through
  float summation order. The draw uses torch's global CPU generator; the adapter forks it for the
  call, so explaining does not advance the caller's random stream (two calls in a row draw the
  same order, which the maps do not depend on anyway).
- **Dropped patches.** With ``config.max_image_length`` smaller than the patch count ViLT keeps a
  random subset. The wrapper calls the original with ``max_image_length=-1`` (every patch kept);
  the config is never touched.
- **Padding.** ViLT's processor pads a batch's images to one size with a ``pixel_mask``. cliplens
  never pads (images of different input sizes run in separate batches), so ``run_pairs`` passes a
  pixel mask of ones (ViLT's own default mask is ``image_size`` square, which only works by
  accident of nearest interpolation for other sizes).

Preprocessing (:class:`ViltPreprocess`): ``resize="model"`` is what ``ViltImageProcessor`` does to
one image, without the batch padding: the shorter side to ``size`` (``shortest_edge``, 384 for the
released checkpoints), the longer side capped at ``int(1333 / 800 * size)`` (639 for 384: the cap
shrinks both sides together), each side rounded and then floored to a multiple of
``size_divisor`` (32) -- the image is resized to exactly that size, nothing is cropped, and the
patch grid is usually not square (12 x 19 for a 4:3 photo). ViLT interpolates its position
embeddings to any grid, so this is the input the checkpoints were trained and evaluated on; a
square centre crop (the CLIP recipe) would cut off the borders and feed the model an aspect ratio
it only sees for square photos. Mean and std are 0.5 (the processor's defaults), bicubic; a
``preprocessor_config.json`` overrides ``size``, ``size_divisor``, ``image_mean``, ``image_std``
and ``resample``. A divisor that is not a multiple of the patch size is raised to the least common
multiple so that no partial patch is silently dropped. ``resize="full"`` is the common
shortest-edge recipe (any whole-patch size works).

Module paths used: ``vilt.embeddings`` (its output: the joint embeddings and mask; the
embeddings become the graph leaf), ``vilt.embeddings.visual_embed`` (a method), and
``vilt.encoder.layer[i].attention.attention`` (``ViltSelfAttention``, which returns its
probabilities beside its output when the model is called with ``output_attentions=True``: the
tensor returned is the one multiplied with the values, so it is in the graph); ``rank_output``;
``config.{patch_size, image_size, max_position_embeddings}``. Token type ids are left to the model
(zeros); the modality embedding adds 0 for text and 1 for image tokens.

Towers: ViLT has one stack, so ``blocks("image")`` and ``blocks("text")`` are both its layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import ModelLoadError
from ..images import Geometry
from ..preprocess import SIGLIP_MEAN, SIGLIP_STD, Preprocess
from .base import Checkpoint
from .capture import Capture
from .fusion import AttentionEvent, FusionAdapter, FusionRun, Stream, readout_token

#: config.json model_type values this file's adapter takes
HF_VILT_TYPES = {"vilt"}

#: ViltImageProcessor's cap on the longer side: int(MAX_LONGER / MAX_SHORTER * shortest_edge)
MAX_LONGER_EDGE, MAX_SHORTER_EDGE = 1333, 800


@dataclass(frozen=True)
class ViltPreprocess(Preprocess):
    """ViltImageProcessor's resize of one image (see the module docstring): ``resize="model"``
    keeps the aspect ratio up to the divisor rounding, never crops, never pads."""

    size_divisor: int = 32

    def model_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the model input for a ``width`` x ``height`` image."""
        shorter = self.size
        longer = int(MAX_LONGER_EDGE / MAX_SHORTER_EDGE * shorter)
        scale = shorter / min(height, width)
        if height < width:
            new_h, new_w = float(shorter), scale * width
        else:
            new_h, new_w = scale * height, float(shorter)
        if max(new_h, new_w) > longer:
            cap = longer / max(new_h, new_w)
            new_h, new_w = cap * new_h, cap * new_w
        d = self.size_divisor
        new_h, new_w = int(new_h + 0.5) // d * d, int(new_w + 0.5) // d * d
        return max(d, new_h), max(d, new_w)

    def _model_input(self, image: Image.Image) -> tuple[Image.Image, Geometry]:
        w, h = image.size
        new_h, new_w = self.model_size(w, h)
        resized = image.resize((new_w, new_h), resample=self.resample)
        return resized, Geometry(w, h, new_w / w, new_h / h, (0.0, 0.0), (new_w, new_h))


def vilt_preprocess_from_config(
    processor_config: dict | None, image_size: int, patch_size: int
) -> ViltPreprocess:
    """The ViLT recipe from a ``preprocessor_config.json`` dict, or ViltImageProcessor's defaults
    (shortest edge ``image_size``, divisor 32, mean and std 0.5, bicubic)."""
    cfg = processor_config or {}
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge") or min(
            v for v in (size.get("height"), size.get("width"), image_size) if v
        )
    divisor = int(cfg.get("size_divisor") or 32)
    divisor = divisor * patch_size // math.gcd(divisor, patch_size)  # whole patches only
    return ViltPreprocess(
        size=int(size),
        crop=(int(size), int(size)),
        mean=tuple(cfg.get("image_mean", SIGLIP_MEAN)),
        std=tuple(cfg.get("image_std", SIGLIP_STD)),
        resample=int(cfg.get("resample", Image.BICUBIC)),
        do_center_crop=False,
        size_divisor=divisor,
    )


def patch_method(capture: Capture, obj: object, name: str, method) -> None:
    """``obj.<name>`` is ``method`` (an instance attribute shadowing the class's) until the
    capture exits; an instance attribute ``obj`` already had comes back."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)

    def restore() -> None:
        if had:
            obj.__dict__[name] = previous
        else:
            obj.__dict__.pop(name, None)

    capture.on_exit(restore)
    obj.__dict__[name] = method


class HFViltITMAdapter(FusionAdapter):
    family = "hf-vilt-itm"
    model_classes = ("ViltForImageAndTextRetrieval",)
    load_unnamed = False
    label = "ViLT"
    supported = "its image-text retrieval head (ViltForImageAndTextRetrieval, e.g. dandelin/vilt-b32-finetuned-coco)"
    pair_probability = "sigmoid"
    cross_attention = False

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        check_vilt_model(model)
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.preprocess = preprocess or vilt_preprocess_from_config(None, cfg.image_size, cfg.patch_size)
        self.name = name or getattr(cfg, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> HFViltITMAdapter:
        """A ViLT image-text retrieval checkpoint (directory or hub name), its tokenizer and its
        image recipe; the other ViLT heads (VQA, NLVR2, masked LM) are refused in one line, and so
        is a config that names no head (its ``rank_output`` would be random)."""
        model, tokenizer = cls.load_parts(checkpoint)
        cfg = model.config
        preprocess = vilt_preprocess_from_config(checkpoint.processor_config, cfg.image_size, cfg.patch_size)
        return cls(model, tokenizer, preprocess=preprocess, name=checkpoint.name)

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.config.patch_size
        return (p, p)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        """The joint stack's layers, for either tower (ViLT has one stack)."""
        return list(self.model.vilt.encoder.layer)

    # ---- inputs ------------------------------------------------------------------------
    # ---- running -----------------------------------------------------------------------
    def run_pairs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> FusionRun:
        model = self.model
        embeddings = model.vilt.embeddings
        events: list[AttentionEvent] = []
        leaves: list[torch.Tensor] = []
        drawn: list[tuple[torch.Tensor, tuple[int, int]]] = []
        original = embeddings.visual_embed  # bound (or an instance attribute already there)

        def visual_embed(pixels, pixel_mask, max_image_length=-1):
            # every patch kept, whatever config.max_image_length says, and the drawn order
            # recorded; the draw uses torch's global CPU generator, forked so that explaining
            # leaves the caller's random stream where it was
            with torch.random.fork_rng(devices=[]):
                x, x_mask, (patch_index, (height, width)) = original(pixels, pixel_mask, max_image_length=-1)
            if patch_index.shape[1] != height * width or not bool(x_mask.all()):
                raise RuntimeError(
                    f"ViLT kept {patch_index.shape[1]} of {height * width} patches or masked some; "
                    "every patch must be kept"
                )
            drawn.append((patch_index, (int(height), int(width))))
            return x, x_mask, (patch_index, (height, width))

        def leaf(module, args, output):
            # the joint embeddings as a leaf: every attention downstream is then in the graph
            joint, mask = output
            out = joint.detach().requires_grad_(torch.is_grad_enabled())
            leaves.append(out)
            return out, mask

        def record(layer: int):
            def hook(module, args, output):
                if len(output) < 2:
                    raise RuntimeError(
                        "ViltSelfAttention returned no probabilities (output_attentions is off)"
                    )
                events.append(
                    AttentionEvent("self", "joint", "joint", output[1], "joint", layer, step=len(events))
                )

            return hook

        N, T = input_ids.shape
        h, w = pixel_values.shape[-2:]
        pixel_mask = torch.ones((N, h, w), dtype=torch.long, device=pixel_values.device)
        with Capture() as capture:
            patch_method(capture, embeddings, "visual_embed", visual_embed)
            capture.forward_hook(embeddings, leaf)
            for i, layer in enumerate(self.blocks("image")):
                capture.forward_hook(layer.attention.attention, record(i))
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                pixel_mask=pixel_mask,
                output_attentions=True,
                return_dict=True,
            ).logits
        if len(drawn) != 1:
            raise RuntimeError(f"ViLT embedded the image {len(drawn)} times in one call (expected once)")
        patch_index, grid = drawn[0]
        cells = patch_index[..., 0] * grid[1] + patch_index[..., 1]  # (N, n_patches), drawn order
        device = input_ids.device
        lead = torch.full((N, T + 1), -1, dtype=torch.long, device=device)  # text tokens, image class token
        cells = torch.cat([lead, cells.to(device=device, dtype=torch.long)], dim=1)
        positions = torch.full_like(cells, -1)
        positions[:, :T] = torch.arange(T, device=device)
        valid = torch.ones_like(cells, dtype=torch.bool)
        valid[:, :T] = attention_mask.bool()
        streams = {"joint": Stream("joint", cells, positions, valid)}
        readout = ("joint", readout_token(N, streams["joint"].size, 0, device))
        return FusionRun(logits[:, 0], streams, events, readout, grid, leaves)


def check_vilt_model(model) -> None:
    """Refuse a ViLT model without the image-text retrieval head (one logit per pair)."""
    head = getattr(model, "rank_output", None)
    if getattr(model, "vilt", None) is None or head is None or getattr(head, "out_features", None) != 1:
        raise ModelLoadError(
            "this ViLT model has no image-text retrieval head (rank_output); cliplens explains "
            "ViltForImageAndTextRetrieval (e.g. dandelin/vilt-b32-finetuned-coco)"
        )
