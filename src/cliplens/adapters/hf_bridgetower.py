"""Hugging Face transformers ``BridgeTowerForImageAndTextRetrieval``: a two-stream co-attention
fusion model (:mod:`.fusion`) whose cross-modal layers are fed by "link towers".

**The model.** A RoBERTa text encoder (L layers) and a CLIP-ViT image encoder (L blocks, class
token first, then the patches row-major) run their first ``L - C + 1`` layers alone (C: the
number of cross-modal layers). The cross-modal encoder then has C layers per stream; cross-modal
layer j of a stream runs self-attention on its input and then cross-attention from that result
(queries) to the OTHER stream's layer-j INPUT (keys, values): text self, text -> image, image
self, image -> text. Before each cross-modal layer j >= 1, unimodal layer ``L - C + j`` of each
encoder runs, and a link tower ``LayerNorm(transform(unimodal) + cross-modal)`` adds its output
into the cross-modal stream's input. The ITM head reads the pooled text [CLS] and the pooled
image [CLS] of the last cross-modal layer, concatenated, and gives two logits (no match,
match). cliplens explains the pair logit ``itm[:, 1] - itm[:, 0]``, whose sigmoid is the match
probability ``softmax(itm)[:, 1]``.

**Link towers: the extension of the rules used here.** Chefer et al.'s rules have no case for
a link tower. cliplens treats it as a residual-like sum of two representations of the SAME
tokens, so its relevance rule is the identity: the unimodal and the cross-modal text states are
one relevance stream ``"text"`` (likewise ``"image"``), every self-attention event of the
unimodal and of the cross-modal layers updates it in execution order, and the cross events
connect the two streams. This ignores the link tower's LayerNorm and the linear transform and
token-type embedding before it (token-wise maps, which the identity rule of a residual ignores
too), the relative scale of the two summed terms, and the fact that the unimodal and the
cross-modal states are different vectors: a unimodal self-attention after the first cross-modal
layer is applied to the relevance the cross-modal layers have built, although the unimodal
tokens themselves never saw the other modality.

**Steps within a cross-modal layer.** Each cross direction reads its queries after its own
stream's self-attention but its keys from the other stream's layer INPUT, which no order of
single events reproduces (text -> image needs the image state before the image self-attention,
image -> text needs the text state before the text self-attention and the text -> image
event). cliplens lists a cross-modal layer's events as ``text self, image self`` (one step:
they read and write different rows, so this is their execution result) and then
``text -> image, image -> text`` (one step, both from the state after the two self-attentions,
as LXMERT's two directions share a step). The queries' side is then exact; the keys' side has
already seen its own stream's self-attention of the same layer. This order is the one the
events are listed in (``FusionRun.events``), not the call order of the modules.

**Readout.** The head reads two tokens in two streams; a :class:`FusionRun` readout is a weight
vector over ONE stream. cliplens reads the text [CLS] (``<s>``), as for BLIP and LXMERT: its row
of ``R[text, image]`` is the image map and of ``R[text, text]`` the token scores, and
``gradcam``'s cross-attention layer (the readout stream's queries to the image) stays the text
-> image one. The gradients weighting every event are those of the full logit (both [CLS]
paths); only the image [CLS]'s own relevance row is not added to the maps. (Reading both would
take a readout over several streams, ``row_x = sum_r w_r R[r, x]``.)

Streams: ``image`` (the ViT's class token, then the patches) and ``text`` (the prompt, ``<s>``
first). Events: unimodal text self-attention ``text_model.encoder.layer[i].attention.self``
(stack ``"text"``, layer i), unimodal image self-attention
``vision_model.visual.transformer.resblocks[i].attn`` (an ``nn.MultiheadAttention`` called
without weights: routed, for the call only, through
:func:`~cliplens.adapters.capture.mha_with_probabilities`, whose probabilities are in the graph;
stack ``"image"``, layer i), and per cross-modal layer j ``cross_modal_{text,image}_layers[j].
{attention.self, crossattention.self}`` (stack ``"cross"``, layer L + j). The text attention
modules return their probabilities beside their output (eager attention). Leaves: the text
embeddings (``text_model.embeddings``) and the image embeddings (``vision_model.visual.embeddings``),
each detached and requiring grad.

**Once per distinct input.** The uni-modal encoders never see the other modality, so the text
encoder runs once per prompt and the ViT once per image (``shares_text``, ``shares_image``):
every output of ``cross_modal_{text,image}_transform`` (what the first cross-modal layer and
each link tower read off a uni-modal block) reaches the pairs as per-pair copies
(:class:`~cliplens.adapters.fusion.SharedPart`, ``taps``: the block each was read off), and the
text mask the cross-modal layers read is repeated per pair. The uni-modal events then have one
row per image or prompt. ``config.{text_config, vision_config}.{patch_size, image_size,
max_position_embeddings, pad_token_id}``; head ``itm_score``.
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..preprocess import Preprocess, preprocess_from_config
from .base import Checkpoint
from .capture import Capture
from .fusion import AttentionEvent, FusionAdapter, FusionRun, SharedPart, Stream, readout_token

#: config.json model_type values this file's adapter takes
HF_BRIDGETOWER_TYPES = {"bridgetower"}


class HFBridgeTowerITMAdapter(FusionAdapter):
    family = "hf-bridgetower-itm"
    model_classes = ("BridgeTowerForImageAndTextRetrieval",)
    label = "BridgeTower"
    supported = (
        "its image-text matching head (BridgeTowerForImageAndTextRetrieval, e.g. BridgeTower/bridgetower-base-itm-mlm)"
    )

    def __init__(self, model, tokenizer, preprocess: Preprocess | None = None, name: str | None = None):
        check_bridgetower_model(model)
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.preprocess = preprocess or bridgetower_preprocess(None, vision.image_size)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> HFBridgeTowerITMAdapter:
        """A BridgeTower image-text matching checkpoint (directory or hub name), its tokenizer
        and its image recipe; other BridgeTower heads (contrastive, masked LM) are refused."""
        model, tokenizer = cls.load_parts(checkpoint)
        preprocess = bridgetower_preprocess(checkpoint.processor_config, model.config.vision_config.image_size)
        return cls(model, tokenizer, preprocess=preprocess, name=checkpoint.name)

    # ---- facts -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return (p, p)

    @property
    def context_length(self) -> int:
        # RoBERTa's positions start after the padding index
        text = self.model.config.text_config
        return int(text.max_position_embeddings) - int(text.pad_token_id or 0) - 1

    def blocks(self, tower: str) -> list[torch.nn.Module]:
        """The unimodal layers, then the cross-modal layers of that stream."""
        bt = self.model.bridgetower
        if tower == "image":
            return list(bt.vision_model.visual.transformer.resblocks) + list(bt.cross_modal_image_layers)
        return list(bt.text_model.encoder.layer) + list(bt.cross_modal_text_layers)

    # ---- running -----------------------------------------------------------------------
    #: the uni-modal encoders never see the other modality: each runs once per distinct input
    #: and the cross-modal layers read per-pair copies of what each link reads off them
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
        bt = self.model.bridgetower
        T = input_ids.shape[1]
        N, parts = self.shared_parts(pixel_values.shape[0], input_ids.shape[0], image_copies, text_copies)
        text_layers = bt.text_model.encoder.layer
        resblocks = bt.vision_model.visual.transformer.resblocks
        L, C = len(text_layers), len(bt.cross_modal_text_layers)
        h, w = pixel_values.shape[-2:]
        grid = (h // self.patch_size[0], w // self.patch_size[1])
        sizes = {"text": T, "image": 1 + grid[0] * grid[1]}
        calls: list[tuple[str, str, str, str, int, torch.Tensor]] = []
        leaves: list[torch.Tensor] = []

        def leaf(module, args, output):
            # an embedding output as a leaf: every attention downstream is then in the graph
            out = output.detach().requires_grad_(torch.is_grad_enabled())
            leaves.append(out)
            return out

        def keep(kind: str, query: str, key: str, stack: str, layer: int, probs: torch.Tensor) -> None:
            rows = probs.shape[0] if stack in parts else N  # a shared encoder's events: its distinct rows
            want = (rows, sizes[query], sizes[key])
            if (probs.shape[0], probs.shape[2], probs.shape[3]) != want:
                raise RuntimeError(
                    f"BridgeTower {kind}-attention {query} -> {key} gave probabilities of shape "
                    f"{tuple(probs.shape)}, expected (rows, heads, {want[1]}, {want[2]})"
                )
            calls.append((kind, query, key, stack, layer, probs))

        def record(kind: str, query: str, key: str, stack: str, layer: int):
            def hook(module, args, output):
                keep(kind, query, key, stack, layer, output[1])

            return hook

        def fan_out(part: SharedPart):
            def hook(module, args, output):
                return part.enter(output)

            return hook

        def pair_masks(module, args, kwargs):
            # the text mask was built for the prompts' rows; the cross-modal layers run pair rows
            for key in ("attention_mask", "encoder_attention_mask"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = parts["text"].per_pair(kwargs[key])
            return args, kwargs

        with Capture() as capture:
            capture.forward_hook(bt.text_model.embeddings, leaf)
            capture.forward_hook(bt.vision_model.visual.embeddings, leaf)
            for tower, blocks, transform in (
                ("text", text_layers, bt.cross_modal_text_transform),
                ("image", resblocks, bt.cross_modal_image_transform),
            ):
                if tower not in parts:
                    continue
                for block in blocks:
                    capture.forward_hook(block, parts[tower].record_block)
                for module in transform if isinstance(transform, torch.nn.ModuleList) else [transform]:
                    capture.forward_hook(module, fan_out(parts[tower]))
            if "text" in parts:
                for layer in [*bt.cross_modal_text_layers, *bt.cross_modal_image_layers]:
                    capture.forward_pre_hook(layer, pair_masks, with_kwargs=True)
            for i, layer in enumerate(text_layers):
                capture.forward_hook(layer.attention.self, record("self", "text", "text", "text", i))
            capture.mha_probabilities(
                [block.attn for block in resblocks],
                lambda i, probs: keep("self", "image", "image", "image", i, probs),
            )
            for j, (tl, il) in enumerate(zip(bt.cross_modal_text_layers, bt.cross_modal_image_layers)):
                capture.forward_hook(tl.attention.self, record("self", "text", "text", "cross", L + j))
                capture.forward_hook(tl.crossattention.self, record("cross", "text", "image", "cross", L + j))
                capture.forward_hook(il.attention.self, record("self", "image", "image", "cross", len(resblocks) + j))
                capture.forward_hook(il.crossattention.self, record("cross", "image", "text", "cross", len(resblocks) + j))
            size = self.model.config.vision_config.image_size
            itm = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                interpolate_pos_encoding=(h, w) != (size, size),
            ).logits
        expected = 2 * L + 4 * C  # every unimodal layer of each encoder, then the cross-modal layers
        if len(calls) != expected:
            raise RuntimeError(f"BridgeTower ran {len(calls)} attention calls, expected {expected} from its layers")
        for part in parts.values():
            leaves.extend(part.leaves)  # the pairs' backward ends at the per-pair copies
        pair_mask = parts["text"].per_pair(attention_mask) if "text" in parts else attention_mask
        streams = {
            "image": Stream.of_image("image", N, grid, 1, pixel_values.device),
            "text": Stream.of_text("text", pair_mask),
        }
        readout = ("text", readout_token(N, T, 0, input_ids.device))
        events = relevance_order(calls, set(parts))
        return FusionRun(itm[:, 1] - itm[:, 0], streams, events, readout, grid, leaves, list(parts.values()))


def relevance_order(calls: list[tuple[str, str, str, str, int, torch.Tensor]], shared: set[str]) -> list[AttentionEvent]:
    """The attention calls as events with their steps (see the module docstring): every unimodal
    self-attention its own step, in call order (marked ``shared`` where its encoder runs once
    per distinct input: ``shared`` names those towers); each cross-modal layer's four calls
    (text self, text -> image, image self, image -> text) as the step {text self, image self}
    and then the step {text -> image, image -> text}."""
    events: list[AttentionEvent] = []
    step, i = 0, 0
    while i < len(calls):
        kind, query, key, stack, layer, probs = calls[i]
        if stack != "cross":
            part = stack if stack in shared else None
            events.append(AttentionEvent(kind, query, key, probs, stack, layer, step=step, shared=part))
            step, i = step + 1, i + 1
            continue
        tt, ti, ii, it = calls[i : i + 4]
        if [(c[0], c[1]) for c in (tt, ti, ii, it)] != [("self", "text"), ("cross", "text"), ("self", "image"), ("cross", "image")]:
            raise RuntimeError("BridgeTower's cross-modal attention calls did not come in the expected order")
        for group in ((tt, ii), (ti, it)):
            for c in group:
                events.append(AttentionEvent(c[0], c[1], c[2], c[5], c[3], c[4], step=step))
            step += 1
        i += 4
    return events


def bridgetower_preprocess(processor_config: dict | None, image_size: int) -> Preprocess:
    """BridgeTower's image recipe, the CLIP one: shortest edge to ``size``, centre crop, OpenAI
    mean and std (BridgeTowerImageProcessor: 288 and 288; the vision config's image_size where
    the checkpoint has no processor config). Its resize also rounds the longer side down to a
    multiple of 32 before the crop, a sub-pixel scale difference cliplens does not reproduce."""
    return preprocess_from_config(processor_config, image_size)


def check_bridgetower_model(model) -> None:
    """Refuse a model without BridgeTower's image-text matching head."""
    if getattr(model, "bridgetower", None) is None or getattr(model, "itm_score", None) is None:
        raise ModelLoadError(
            f"a {type(model).__name__} is not a BridgeTower with its image-text matching head "
            "(BridgeTowerForImageAndTextRetrieval)"
        )
