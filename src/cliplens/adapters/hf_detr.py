"""Hugging Face transformers ``DetrForObjectDetection``: an encoder-decoder detector explained as a
fusion model (:mod:`.fusion`), after Chefer et al.'s DETR generator.

DETR has no text model. cliplens explains (image, prompt) pairs, so for DETR **a prompt is a class
name** of the checkpoint's ``config.id2label`` (``"cat"``); anything else is refused in one line.
:meth:`HFDetrAdapter.tokenize` turns each name into one "token" (the name itself), whose input id
is the class index; there are no token scores (the streams have no text positions, so a method's
text side comes out NaN).

The model: a convolutional backbone (ResNet) gives a feature map of stride s; ``input_projection``
(a 1x1 conv) maps it to ``d_model`` and ``DetrModel`` flattens it row-major (``flatten(2)``: token
``y * w + x`` is cell (y, x) of the h x w feature map) into the encoder's tokens, which run
self-attention layers; the decoder runs ``num_queries`` object queries (zeros plus the learned
``query_position_embeddings``), each layer a self-attention over the queries and a cross-attention
from the queries to the encoder's output; ``class_labels_classifier`` gives every query
``num_labels + 1`` logits (the last one: "no object").

What is explained for the pair (image, class c): at the query q* that predicts c most
confidently, ``q* = argmax_q softmax(logits[q])[c]`` (chosen without gradient: the reference
generator's ``target_index``, one query), the log-odds of c against the other classes and
no-object, ``logits[q*, c] - logsumexp_{k != c} logits[q*, k]``. Its sigmoid is exactly DETR's
probability of c at q* (the softmax over the classes and no-object), so the reported ``probs``
and the ``probability`` target are DETR's own (``pair_probability = "sigmoid"``), as for BLIP's
ITM log-odds. The reference explains the raw class logit ``logits[q*, c]``; the two differ by the
logsumexp of the other classes, which also carries gradient (a relevance for "not any other
class"). Different prompts of one image may choose different queries; the readout is one-hot at
each pair row's own q*.

Streams and events: ``"image"`` (the encoder's tokens; cells 0..h*w-1 on the feature grid) and
``"queries"`` (no cells, no text positions). Events in execution order: the encoder's
self-attention per layer (``"self"`` on ``image``), then per decoder layer its self-attention
(``"self"`` on ``queries``) and its cross-attention (``"cross"``, queries -> image): the rules are
the reference's R_ii, R_qq, R_qi updates. ``DetrSelfAttention`` and ``DetrCrossAttention`` return
``(output, probabilities)`` on every call; under eager attention (switched on by
:meth:`HFDetrAdapter.explaining`) the probabilities are the softmax that multiplies the values (the
dropout after it is the identity in eval mode), so they are in the graph. Graph leaves: the
``input_projection`` output and the decoder's inputs (its zero query states and the query position
embeddings), each a detached copy that requires grad.

The image map's grid is the backbone's feature map: ``patch_size`` is the backbone's stride (32 for
ResNet-50), measured once by running the backbone on a blank input. Every run passes a pixel mask
of ones (cliplens never pads).

Preprocessing (:class:`DetrPreprocess`): ``DetrImageProcessor`` resizes the shorter side to 800
with the longer side at most 1333 (both scaled together when the cap bites), normalises with the
ImageNet mean and std and pads a batch to its largest image. cliplens does the same resize, then
floors each side to a multiple of the stride (at most stride - 1 pixels lost per side, the aspect
ratio kept within that), so the feature map covers the input exactly; nothing is cropped or padded.
A ``preprocessor_config.json`` overrides ``size`` (``shortest_edge``, ``longest_edge``),
``image_mean``, ``image_std`` and ``resample``.

Backbones: the released checkpoints (facebook/detr-resnet-50, -101) build their ResNet with timm
(``use_timm_backbone``; a ``timm_backbone`` backbone config), so loading them needs the ``timm``
package; without it the adapter refuses in one line. A DETR whose backbone is transformers' own
(``use_timm_backbone=False`` with a ``ResNetConfig``) needs nothing else.

Module paths used: ``model.{backbone, input_projection, encoder.layers[i].self_attn,
decoder, decoder.layers[i].{self_attn, encoder_attn}}``, ``class_labels_classifier``;
``config.{id2label, num_queries, backbone_config}``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import InputError, ModelLoadError
from ..images import Geometry
from ..preprocess import Preprocess
from .base import Checkpoint, TextBatch
from .capture import Capture
from .fusion import AttentionEvent, FusionAdapter, FusionRun, SharedPart, Stream

#: config.json model_type values this file's adapter takes
HF_DETR_TYPES = {"detr"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: DetrImageProcessor's defaults: shortest edge, longest edge
DETR_SHORTEST_EDGE, DETR_LONGEST_EDGE = 800, 1333


@dataclass(frozen=True)
class DetrPreprocess(Preprocess):
    """DetrImageProcessor's resize of one image, floored to whole strides (see the module
    docstring); ``resize="full"`` is the common shortest-edge recipe."""

    max_size: int = DETR_LONGEST_EDGE
    size_divisor: int = 32

    def model_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the model input for a ``width`` x ``height`` image."""
        scale = self.size / min(width, height)
        if max(width, height) * scale > self.max_size:
            scale = self.max_size / max(width, height)
        d = self.size_divisor
        new_h, new_w = int(height * scale + 0.5) // d * d, int(width * scale + 0.5) // d * d
        return max(d, new_h), max(d, new_w)

    def _model_input(self, image: Image.Image) -> tuple[Image.Image, Geometry]:
        w, h = image.size
        new_h, new_w = self.model_size(w, h)
        resized = image.resize((new_w, new_h), resample=self.resample)
        return resized, Geometry(w, h, new_w / w, new_h / h, (0.0, 0.0), (new_w, new_h))


def detr_preprocess_from_config(processor_config: dict | None, stride: int) -> DetrPreprocess:
    """The DETR recipe from a ``preprocessor_config.json`` dict, or DetrImageProcessor's defaults
    (shortest edge 800, longest 1333, ImageNet mean and std, bilinear), floored to ``stride``."""
    cfg = processor_config or {}
    size = cfg.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    shortest = int(size.get("shortest_edge") or DETR_SHORTEST_EDGE)
    longest = int(size.get("longest_edge") or cfg.get("max_size") or DETR_LONGEST_EDGE)
    return DetrPreprocess(
        size=shortest,
        crop=(shortest, shortest),
        mean=tuple(cfg.get("image_mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("image_std", IMAGENET_STD)),
        resample=int(cfg.get("resample", Image.BILINEAR)),
        do_center_crop=False,
        max_size=longest,
        size_divisor=stride,
    )


def needs_timm(config) -> bool:
    """Whether a DetrConfig builds its backbone with timm."""
    backbone = getattr(config, "backbone_config", None)
    model_type = backbone.get("model_type") if isinstance(backbone, dict) else getattr(backbone, "model_type", None)
    return model_type == "timm_backbone" or bool(getattr(config, "use_timm_backbone", False))


def check_timm(config, name: str) -> None:
    if needs_timm(config) and importlib.util.find_spec("timm") is None:
        raise ModelLoadError(
            f"{name}: this DETR checkpoint builds its backbone with timm (use_timm_backbone), which is not "
            "installed; install timm (pip install timm) to load it"
        )


class HFDetrAdapter(FusionAdapter):
    family = "hf-detr"
    model_classes = ("DetrForObjectDetection",)
    load_unnamed = True
    label = "DETR"
    supported = "its object detection head (DetrForObjectDetection, e.g. facebook/detr-resnet-50, which needs timm)"
    # the pair logit is the class's log-odds at its query: its sigmoid is DETR's softmax probability
    pair_probability = "sigmoid"
    cross_attention = True
    # the object queries attend to the image, no text token does: gradcam (LAVIS) does not apply
    text_cross_attention = False

    def __init__(self, model, tokenizer=None, preprocess: Preprocess | None = None, name: str | None = None):
        check_detr_model(model)
        self.model = model
        self.tokenizer = None  # DETR has no text model: prompts are class names
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._stride: int | None = None
        self.preprocess = preprocess or detr_preprocess_from_config(None, self.patch_size[0])
        self.labels = label_index(model.config)

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> HFDetrAdapter:
        """A DETR object-detection checkpoint (directory or hub name) and its image recipe; other
        DETR heads (segmentation), and a timm backbone without timm, are refused in one line."""
        import transformers
        from transformers import AutoConfig

        from .hf_encoder import _quiet_progress, _weight_file_errors

        source, local, name = checkpoint.source, checkpoint.local_files_only, checkpoint.name
        with _quiet_progress():
            try:
                config = AutoConfig.from_pretrained(source, local_files_only=local)
            except (OSError, ValueError) as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise ModelLoadError(f"{name}: could not load the DETR checkpoint ({first})") from None
            heads = getattr(config, "architectures", None) or []
            if heads and not any(h in cls.model_classes for h in heads):
                raise ModelLoadError(
                    f"{name}: a DETR checkpoint for {', '.join(heads)}; cliplens explains DETR with {cls.supported}"
                )
            check_timm(config, name)
            try:
                model = transformers.DetrForObjectDetection.from_pretrained(
                    source, dtype=checkpoint.dtype, local_files_only=local
                )
            except (OSError, ValueError, RuntimeError, ImportError, *_weight_file_errors()) as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise ModelLoadError(f"{name}: could not load the DETR checkpoint ({first})") from None
        adapter = cls(model, name=checkpoint.name)
        if checkpoint.processor_config:
            adapter.preprocess = detr_preprocess_from_config(checkpoint.processor_config, adapter.patch_size[0])
        return adapter

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        """The backbone's stride (one feature-map cell per stride x stride pixels)."""
        if self._stride is None:
            self._stride = backbone_stride(self.model)
        return (self._stride, self._stride)

    @property
    def context_length(self) -> int:
        return 1

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        """The encoder's layers for "image"; the decoder's (the object queries' side) otherwise."""
        if tower == "image":
            return list(self.model.model.encoder.layers)
        return list(self.model.model.decoder.layers)

    # ---- inputs ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TextBatch:
        """Each prompt must be a class name of ``config.id2label``: one token (the name), whose
        input id is the class index."""
        ids = []
        for text in texts:
            key = str(text).strip()
            if key not in self.labels:
                known = sorted(self.labels)
                few = ", ".join(repr(n) for n in known[:8]) + (", ..." if len(known) > 8 else "")
                raise InputError(
                    f"{self.name} ({self.family}) is a detector: a prompt must be one of its class names, "
                    f"and {text!r} is not ({len(known)} names, e.g. {few})"
                )
            ids.append(self.labels[key])
        P = len(texts)
        device = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=device).reshape(P, 1)
        mask = torch.ones((P, 1), dtype=torch.long, device=device)
        content = torch.ones((P, 1), dtype=torch.bool, device=device)
        return TextBatch(list(texts), input_ids, mask, [[str(t)] for t in texts], [False] * P, content)

    # ---- running -----------------------------------------------------------------------
    def class_probabilities(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(N,) DETR's own probability of each pair row's class at its chosen query: the softmax
        over the classes and no-object (call inside :meth:`explaining`)."""
        with torch.no_grad():
            logits = self._detect(pixel_values)
            classes = input_ids[:, 0]
            probs = logits.softmax(-1)[torch.arange(len(classes)), :, classes]  # (N, Q)
            return probs.max(dim=1).values

    def _detect(self, pixel_values: torch.Tensor) -> torch.Tensor:
        N, _, h, w = pixel_values.shape
        mask = torch.ones((N, h, w), dtype=torch.long, device=pixel_values.device)
        return self.model(pixel_values=pixel_values, pixel_mask=mask).logits

    #: the prompt only picks which class (and so which query) is read out: the whole forward runs
    #: once per image, the pairs read per-pair copies of its logits
    shares_image = True

    def run_pairs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_copies: int = 1
    ) -> FusionRun:
        detr = self.model.model
        events: list[AttentionEvent] = []
        leaves: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []

        def as_leaf(t: torch.Tensor) -> torch.Tensor:
            out = t.detach().requires_grad_(torch.is_grad_enabled())
            leaves.append(out)
            return out

        def projected(module, args, output):
            # the projected feature map (N, d, h, w) as a leaf: every attention is downstream
            grids.append((int(output.shape[-2]), int(output.shape[-1])))
            return as_leaf(output)

        def decoder_inputs(module, args, kwargs):
            # the zero query states and the query position embeddings as leaves
            for key in ("inputs_embeds", "object_queries_position_embeddings"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = as_leaf(kwargs[key])
            return args, kwargs

        def record(kind: str, query: str, key: str, stack: str, layer: int):
            def hook(module, args, output):
                if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                    raise RuntimeError("a DETR attention module returned no probabilities (not eager attention)")
                # with shares_image every event has one row per image
                per_image = "image" if self.shares_image else None
                events.append(AttentionEvent(kind, query, key, output[1], stack, layer, step=len(events), shared=per_image))

            return hook

        with Capture() as capture:
            capture.forward_hook(detr.input_projection, projected)
            capture.forward_pre_hook(detr.decoder, decoder_inputs, with_kwargs=True)
            for i, layer in enumerate(self.blocks("image")):
                capture.forward_hook(layer.self_attn, record("self", "image", "image", "encoder", i))
            for i, layer in enumerate(self.blocks("text")):
                capture.forward_hook(layer.self_attn, record("self", "queries", "queries", "decoder", i))
                capture.forward_hook(layer.encoder_attn, record("cross", "queries", "image", "decoder", i))
            logits = self._detect(pixel_values)  # (rows, Q, num_labels + 1)
        if len(grids) != 1:
            raise RuntimeError(f"DETR projected {len(grids)} feature maps in one call (expected one)")
        shared = []
        if self.shares_image:  # one row per image: the pairs read per-pair copies of its logits
            shared = [SharedPart("image", image_copies)]
            logits = shared[0].enter(logits)
            leaves.append(logits)
        N, Q = logits.shape[:2]
        h, w = pixel_values.shape[-2:]
        stride = self.patch_size[0]
        grid = grids[0]
        if grid != (h // stride, w // stride):
            raise RuntimeError(f"DETR's feature map is {grid} for a {h}x{w} input; expected stride {stride}")
        rows = torch.arange(N, device=logits.device)
        classes = input_ids[:, 0].to(logits.device)
        with torch.no_grad():  # the query that predicts each row's class most confidently
            chosen = logits.detach().softmax(-1)[rows, :, classes].argmax(dim=1)  # (N,)
        device = pixel_values.device
        no_cell = torch.full((N, Q), -1, dtype=torch.long, device=device)
        streams = {
            "image": Stream.of_image("image", N, grid, 0, device),
            "queries": Stream("queries", no_cell, no_cell.clone(), torch.ones((N, Q), dtype=torch.bool, device=device)),
        }
        weights = torch.zeros(N, Q, device=device)
        weights[rows.to(device), chosen.to(device)] = 1.0
        pair_logits = class_log_odds(logits[rows, chosen], classes)
        return FusionRun(pair_logits, streams, events, ("queries", weights), grid, leaves, shared)


def label_index(config) -> dict[str, int]:
    """Class name -> index of ``config.id2label``; names given to several classes (COCO's "N/A")
    are left out: a prompt could not say which one it means."""
    names: dict[str, list[int]] = {}
    for i, name in (getattr(config, "id2label", None) or {}).items():
        names.setdefault(str(name).strip(), []).append(int(i))
    return {name: ids[0] for name, ids in names.items() if len(ids) == 1}


def backbone_stride(model) -> int:
    """The stride of DETR's feature map, measured on a blank 256 x 256 input (the backbone's
    layers keep no state in eval mode: its batch norms are frozen)."""
    detr = model.model
    side = 256
    param = next(model.parameters())
    with torch.no_grad():
        x = torch.zeros(1, 3, side, side, dtype=param.dtype, device=param.device)
        mask = torch.ones(1, side, side, dtype=torch.long, device=param.device)
        feature_map = detr.backbone(x, mask)[-1][0]
    fh, fw = feature_map.shape[-2:]
    if fh != fw or fh == 0 or side % fh:
        raise ModelLoadError(f"this DETR backbone maps a {side}x{side} input to {fh}x{fw} cells (no whole stride)")
    return side // fh


def check_detr_model(model) -> None:
    """Refuse a model that is not a DETR with the object detection head."""
    detr = getattr(model, "model", None)
    head = getattr(model, "class_labels_classifier", None)
    if detr is None or head is None or not hasattr(detr, "input_projection"):
        raise ModelLoadError(
            "this is not a DETR object detection model (DetrForObjectDetection, e.g. facebook/detr-resnet-50)"
        )


def class_log_odds(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, K) logits of one query per row, (N,) class per row -> (N,) ``l_c - logsumexp_{k != c} l_k``:
    the log-odds whose sigmoid is ``softmax(l)[c]``."""
    own = logits.gather(1, classes[:, None])[:, 0]
    others = logits.scatter(1, classes[:, None], float("-inf")).logsumexp(dim=1)
    return own - others
