"""Hugging Face transformers LXMERT (``LxmertForPreTraining``, ``LxmertForQuestionAnswering``): a
two-stream co-attention fusion model (:mod:`.fusion`), the case Chefer et al. 2021 wrote their
bi-modal rules for.

**Inputs.** LXMERT reads an image as R object regions from a Faster R-CNN detector that is not
part of transformers: ``visual_feats`` (R, 2048) and ``visual_pos`` (R, 4), the boxes divided by
the image's width and height. cliplens takes them as :class:`~cliplens.RegionImage` objects
(features, boxes in pixels, and the original image or its size); a picture is refused in one
line, and a RegionImage given to a pixel model too. :meth:`HFLxmertAdapter.prepare_images` puts
each RegionImage's features and normalised boxes side by side in ``ImageBatch.pixel_values``
(B, R, D + 4) (regions are not resized: ``resize`` does not apply); images with different
numbers of regions run in separate batches, as pixel images of different sizes do.

**Maps.** The image side is R regions, not a patch grid: the image map of a pair is one row of
R cells, grid (1, R), cell r = region r in the order given (so batching, saving and every
per-pair reader work unchanged). ``cliplens.explain`` adds ``extras["region_maps"]``
(B, P, H', W'): each pair's region relevance painted onto the original image at display size
(longer side at most 64 px), each pixel the SUM of the relevance of the boxes covering it
(:func:`cliplens.regions.paint_regions`). ``Explanation.map_on_original`` / ``overlay`` stretch
the (1, R) row over the image and mean nothing for regions: use ``region_maps``.

**Streams and events.** Streams ``text`` (the question or caption, [CLS] first) and ``image``
(the R regions). Events in execution order, as the model runs them:

- the language encoder's self-attention, ``lxmert.encoder.layer[i]`` (``l_layers``, 9);
- the object-relationship encoder's self-attention, ``encoder.r_layers[i]`` (5);
- per cross-modality layer ``encoder.x_layers[j]`` (5): the cross-attention text -> image and
  then image -> text, which LXMERT computes with ONE module (``visual_attention``) called
  twice, both calls on the layer's inputs: the two events share a ``step`` (both read the
  relevance state before the layer, as the reference generator does); then the language
  self-attention (``lang_self_att``) and the visual self-attention (``visn_self_att``).

An event's ``layer`` counts the blocks along its query stream: text queries 0..l_layers-1 in
the language encoder and then l_layers + j in cross-modality layer j; image queries
0..r_layers-1, then r_layers + j (so ``raw_attention``'s and ``gradcam``'s ``layer`` options
index the [CLS] token's own path). ``stack`` is ``"text"``, ``"image"`` or ``"cross"``.

transformers returns only some of LXMERT's attentions (none of the cross-modality layers'
self-attentions, only one cross direction), and each ``LxmertAttention`` returns its
probabilities only when called with ``output_attentions=True``. For the call only, a forward
pre-hook on every ``LxmertAttention`` asks it for them and a forward hook takes the returned
tensor (the one multiplied with the values, so it is in the graph) and hands its caller what
the caller asked for; the model's outputs do not change. Leaves: the text embeddings
(``lxmert.embeddings``) and the visual feature embeddings (``encoder.visn_fc``), each detached
and requiring grad. Readout: the text [CLS] token (the pooler reads it).

**Once per distinct input.** The language and object-relationship encoders never see the other
modality: they run once per prompt and once per region image (``shares_text``,
``shares_image``); a pre-hook on the first cross-modality layer hands it per-pair copies of
their outputs (:class:`~cliplens.adapters.fusion.SharedPart`) and every cross-modality layer
the masks repeated per pair. Their events have one row per prompt or region image.

**The explained scalar.**

- ``LxmertForPreTraining`` (e.g. ``unc-nlp/lxmert-base-uncased``): the cross-modality matching
  head, an image-text matching score like BLIP's ITM. Pair logit = its log-odds
  ``cross_relationship_score[:, 1] - [:, 0]``; its sigmoid is the match probability
  ``softmax(cross_relationship_score)[:, 1]``.
- ``LxmertForQuestionAnswering`` (e.g. ``unc-nlp/lxmert-vqa-uncased``): a pair is (regions,
  question) and the pair logit is the score of the model's top answer for that pair,
  ``question_answering_score.max(-1)`` (the answer picked per pair without a gradient, its score
  explained, as the reference generator does). The probability is its sigmoid: LXMERT's VQA
  fine-tuning trains every answer's score with a binary cross-entropy, so that is the model's
  own probability of that answer (for a head trained with a softmax over the answers it is only
  a monotone squash of the score). :meth:`HFLxmertAdapter.answer_scores` gives every answer's
  score, to look the answer up in the checkpoint's answer list. A pre-training model explains
  its QA head with ``head="answer"``.

**Relevance.** The reference sets ``R^{tt}[0, 0] = 0`` before display; cliplens keeps the raw
values (the [CLS] token is not a content token, and the displays read content tokens only).
The reference skips the last cross-modality layer's image-side events (they cannot reach [CLS]);
cliplens runs them with zero weight (their gradient is zero), which changes no readout value;
their cross rule still counts degenerate rows in ``extras["degenerate_rows"]``.

Towers: ``blocks("text")`` is the language layers then the cross-modality layers,
``blocks("image")`` the relationship layers then the cross-modality layers (each cross-modality
layer serves both streams). Module paths used: ``lxmert.{embeddings, encoder.visn_fc,
encoder.layer[i].attention.self, encoder.r_layers[i].attention.self,
encoder.x_layers[j].{visual_attention.att, lang_self_att.self, visn_self_att.self}, pooler}``,
``cls.seq_relationship``, ``answer_head``; ``config.{visual_feat_dim, max_position_embeddings,
task_matched}``.
"""

from __future__ import annotations

import torch

from ..errors import InputError, ModelLoadError
from ..regions import RegionImage
from .base import Checkpoint, ImageBatch
from .capture import Capture
from .fusion import AttentionEvent, FusionAdapter, FusionRun, Stream, readout_token

#: config.json model_type values this file's adapter takes
HF_LXMERT_TYPES = {"lxmert"}

#: the model classes, and the head each explains by default
LXMERT_HEADS = {"LxmertForPreTraining": "match", "LxmertForQuestionAnswering": "answer"}

#: columns of ``visual_pos`` after the features in an LXMERT ImageBatch
BOX_COLUMNS = 4


class HFLxmertAdapter(FusionAdapter):
    family = "hf-lxmert"
    model_classes = tuple(LXMERT_HEADS)  # a config naming no head: the pre-training heads
    label = "LXMERT"
    supported = (
        "its pre-training heads (LxmertForPreTraining, e.g. unc-nlp/lxmert-base-uncased) or its "
        "question-answering head (LxmertForQuestionAnswering, e.g. unc-nlp/lxmert-vqa-uncased)"
    )
    #: the pair probability is the sigmoid of the pair logit (match log-odds, or an answer's
    #: binary-cross-entropy score)
    pair_probability = "sigmoid"
    cross_attention = True
    #: images are :class:`~cliplens.RegionImage` objects (region features), not pixels
    region_inputs = True
    preprocess = None  # regions are not resized

    def __init__(self, model, tokenizer, name: str | None = None, head: str | None = None):
        self.head = check_lxmert_model(model, head)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> HFLxmertAdapter:
        """An LXMERT checkpoint (directory or hub name) with the pre-training heads (matching) or
        the question-answering head, and its tokenizer; a bare ``LxmertModel`` is refused."""
        model, tokenizer = cls.load_parts(checkpoint)
        return cls(model, tokenizer, name=checkpoint.name)

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        """(1, 1): one cell of the (1, R) region grid per region."""
        return (1, 1)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.visual_feat_dim)

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        encoder = self.model.lxmert.encoder
        own = encoder.r_layers if tower == "image" else encoder.layer
        return list(own) + list(encoder.x_layers)

    # ---- inputs ------------------------------------------------------------------------
    def prepare_images(self, images: list, *, resize: str = "model") -> list[ImageBatch]:
        """RegionImage objects -> batches of (B, R, D + 4): each region's features, then its
        normalised box (LXMERT's ``visual_pos``); one batch per number of regions. ``resize``
        does not apply to regions."""
        groups: dict[int, list[tuple[torch.Tensor, RegionImage, int]]] = {}
        for i, img in enumerate(images):
            if not isinstance(img, RegionImage):
                raise InputError(
                    f"{self.name} ({self.family}) reads region features from an object detector, not pixels: "
                    f"image {i} is a {type(img).__name__}; pass cliplens.RegionImage(features, boxes, image=...)"
                )
            if img.features.shape[1] != self.feature_dim:
                raise InputError(
                    f"image {i} has {img.features.shape[1]} features per region; {self.name} takes "
                    f"{self.feature_dim} (config.visual_feat_dim)"
                )
            boxes = torch.from_numpy(img.normalized_boxes())
            row = torch.cat([img.features.to(torch.float64), boxes], dim=1)
            groups.setdefault(img.num_regions, []).append((row, img, i))
        return [
            ImageBatch(
                torch.stack([g[0] for g in group]).to(self.device, self.dtype),
                [g[1].geometry() for g in group],
                [g[1] for g in group],  # type: ignore[misc]
                [g[2] for g in group],
            )
            for group in groups.values()
        ]

    # ---- running -----------------------------------------------------------------------
    def attention_plan(self) -> list[tuple[torch.nn.Module, list[tuple[str, str, str, str, int]]]]:
        """Every ``LxmertAttention`` module with the events its calls are, in call order:
        ``(kind, query, key, stack, layer)``; ``visual_attention.att`` is called twice per
        cross-modality layer (text -> image, then image -> text)."""
        encoder = self.model.lxmert.encoder
        L, R = len(encoder.layer), len(encoder.r_layers)
        plan = [
            (layer.attention.self, [("self", "text", "text", "text", i)])
            for i, layer in enumerate(encoder.layer)
        ]
        plan += [
            (layer.attention.self, [("self", "image", "image", "image", i)])
            for i, layer in enumerate(encoder.r_layers)
        ]
        for j, x in enumerate(encoder.x_layers):
            plan.append(
                (
                    x.visual_attention.att,
                    [("cross", "text", "image", "cross", L + j), ("cross", "image", "text", "cross", R + j)],
                )
            )
            plan.append((x.lang_self_att.self, [("self", "text", "text", "cross", L + j)]))
            plan.append((x.visn_self_att.self, [("self", "image", "image", "cross", R + j)]))
        return plan

    def _backbone(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """The pooled [CLS] output of ``model.lxmert`` on (N, R, D + 4) regions."""
        return self.model.lxmert(
            input_ids=input_ids,
            visual_feats=pixel_values[..., :-BOX_COLUMNS],
            visual_pos=pixel_values[..., -BOX_COLUMNS:],
            attention_mask=attention_mask,
            return_dict=True,
        ).pooled_output

    def _head_scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, 2) matching scores or (N, n_answers) answer scores from the pooled output."""
        if self.head == "match":
            return self.model.cls.seq_relationship(pooled)
        return self.model.answer_head(pooled)

    def pair_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) the explained pair logit from the head's scores (see the module docstring)."""
        if self.head == "match":
            return scores[:, 1] - scores[:, 0]
        top = scores.detach().argmax(dim=-1, keepdim=True)
        return scores.gather(1, top)[:, 0]

    def answer_scores(self, images: list, texts: list[str]) -> torch.Tensor:
        """(B, P, n_answers) the question-answering head's scores of every region image and
        question (no gradients); ``argmax(-1)`` is the answer each pair's logit explains."""
        if not hasattr(self.model, "answer_head"):
            raise InputError(f"{self.name} has no question-answering head (config.task_qa is off)")
        batch = self.tokenize(list(texts))
        P = len(texts)
        rows: dict[int, torch.Tensor] = {}
        with self.explaining(), torch.no_grad():
            for group in self.prepare_images(list(images)):
                B = len(group)
                ids, mask = batch.input_ids.repeat(B, 1), batch.attention_mask.repeat(B, 1)
                pooled = self._backbone(group.pixel_values.repeat_interleave(P, dim=0), ids, mask)
                scores = self.model.answer_head(pooled).reshape(B, P, -1).cpu()
                rows.update(zip(group.indices, scores))
        return torch.stack([rows[b] for b in range(len(images))])

    #: the language and object-relationship encoders never see the other modality: each runs
    #: once per distinct input, and the cross-modality layers read per-pair copies of their outputs
    shares_image = True
    shares_text = True

    def run_pairs(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_copies: int = 1,
        text_copies: int = 1,
    ) -> FusionRun:
        encoder = self.model.lxmert.encoder
        T, R = input_ids.shape[1], pixel_values.shape[1]
        N, parts = self.shared_parts(pixel_values.shape[0], input_ids.shape[0], image_copies, text_copies)
        sizes = {"text": T, "image": R}
        events: list[AttentionEvent] = []
        leaves: list[torch.Tensor] = []
        plan = self.attention_plan()
        pending = {id(module): list(roles) for module, roles in plan}
        asked: dict[int, list[bool]] = {}

        def leaf(module, args, output):
            # an embedding output as a leaf: every attention downstream is then in the graph
            out = output.detach().requires_grad_(torch.is_grad_enabled())
            leaves.append(out)
            return out

        def ask(module, args, kwargs):
            # the module returns its probabilities only when asked; what its caller asked is kept
            asked.setdefault(id(module), []).append(bool(kwargs.get("output_attentions", False)))
            return args, {**kwargs, "output_attentions": True}

        def record(module, args, output):
            roles = pending[id(module)]
            if not roles:
                raise RuntimeError(
                    "an LXMERT attention module ran more often than the model's layers call it"
                )
            kind, query, key, stack, layer = roles.pop(0)
            probs = output[1]
            rows = probs.shape[0] if stack in parts else N  # a shared encoder's events: its distinct rows
            want = (rows, sizes[query], sizes[key])
            if (probs.shape[0], probs.shape[2], probs.shape[3]) != want:
                raise RuntimeError(
                    f"LXMERT {kind}-attention {query} -> {key} gave probabilities of shape {tuple(probs.shape)}, "
                    f"expected (rows, heads, {want[1]}, {want[2]})"
                )
            # the second call of visual_attention (image -> text) reads the same layer inputs as
            # the first: both directions update the relevance from the same state
            same_step = kind == "cross" and query == "image" and events and events[-1].kind == "cross"
            step = events[-1].step if same_step else (events[-1].step + 1 if events else 0)
            part = stack if stack in parts else None
            events.append(AttentionEvent(kind, query, key, probs, stack, layer, step=step, shared=part))
            return output if asked[id(module)].pop() else output[:1]

        def pair_rows(module, args, kwargs):
            # the cross-modality layers run pair rows: per-pair copies of the encoders' outputs
            # (the first layer's inputs) and of the masks built for the distinct rows
            if len(args) < 4:
                raise RuntimeError("an LXMERT cross-modality layer was called without its four positional inputs")
            lang, lang_mask, visual, visual_mask, *rest = args
            if module is encoder.x_layers[0]:
                lang = parts["text"].enter(lang) if "text" in parts else lang
                visual = parts["image"].enter(visual) if "image" in parts else visual
            if "text" in parts and isinstance(lang_mask, torch.Tensor):
                lang_mask = parts["text"].per_pair(lang_mask)
            if "image" in parts and isinstance(visual_mask, torch.Tensor):
                visual_mask = parts["image"].per_pair(visual_mask)
            return (lang, lang_mask, visual, visual_mask, *rest), kwargs

        with Capture() as capture:
            capture.forward_hook(self.model.lxmert.embeddings, leaf)
            capture.forward_hook(encoder.visn_fc, leaf)
            for module, _ in plan:
                capture.forward_pre_hook(module, ask, with_kwargs=True)
                capture.forward_hook(module, record)
            for tower, blocks in (("text", encoder.layer), ("image", encoder.r_layers)):
                for block in blocks if tower in parts else []:
                    capture.forward_hook(block, parts[tower].record_block)
            if parts:
                for layer in encoder.x_layers:
                    capture.forward_pre_hook(layer, pair_rows, with_kwargs=True)
            scores = self._head_scores(self._backbone(pixel_values, input_ids, attention_mask))
        left = sum(len(r) for r in pending.values())
        if left:
            raise RuntimeError(f"{left} LXMERT attention calls expected by the layer plan did not run")
        for part in parts.values():
            leaves.extend(part.leaves)  # the pairs' backward ends at the per-pair copies
        streams = {
            "text": Stream.of_text("text", parts["text"].per_pair(attention_mask) if "text" in parts else attention_mask),
            "image": Stream.of_image("image", N, (1, R), 0, input_ids.device),
        }
        readout = ("text", readout_token(N, T, 0, input_ids.device))
        return FusionRun(self.pair_logits(scores), streams, events, readout, (1, R), leaves, list(parts.values()))


def check_lxmert_model(model, head: str | None) -> str:
    """The head to explain (``"match"`` or ``"answer"``) for this LXMERT model; ModelLoadError
    for a model without it."""
    kind = type(model).__name__
    default = LXMERT_HEADS.get(kind)
    if getattr(model, "lxmert", None) is None or default is None:
        raise ModelLoadError(
            f"a {kind} is not an LXMERT with a head cliplens explains (LxmertForPreTraining: matching; "
            "LxmertForQuestionAnswering: the top answer)"
        )
    head = head or default
    if head not in ("match", "answer"):
        raise ModelLoadError(f"LXMERT head must be 'match' or 'answer', got {head!r}")
    if head == "match" and (kind != "LxmertForPreTraining" or not model.config.task_matched):
        raise ModelLoadError(
            f"this {kind} has no trained cross-modality matching head (LxmertForPreTraining with task_matched); "
            "explain its answers with head='answer'"
        )
    if head == "answer" and getattr(model, "answer_head", None) is None:
        raise ModelLoadError(f"this {kind} has no question-answering head (config.task_qa is off)")
    return head
