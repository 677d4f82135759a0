"""Fusion models: an image and a text scored together in one forward pass (BLIP image-text
matching, ViLT, LXMERT, ...), as one adapter base.

A dual encoder (CLIP) runs each tower alone and scores a pair by the cosine of the two
embeddings; a fusion model mixes image and text inside the network, so every (image, text)
pair is one row of the model's own batch. A fusion adapter runs those pair rows and reports
what happened as a :class:`FusionRun`:

- the pair logits (one live scalar per row);
- the token streams, each with what its tokens show: an image grid cell, a text token, or
  neither (a class token, a padding patch);
- every attention event in execution order, with its kind (``"self"`` within a stream,
  ``"cross"`` from a query stream to a key stream) and its probabilities, still in the graph.

The relevance rules (:mod:`cliplens.methods.relevance`) read nothing else, so a new fusion
family is one adapter file that fills a :class:`FusionRun`; module paths stay in that file.

Shapes: N pair rows (row ``b*P + p`` is image b with prompt p), H heads, n tokens of a stream.
"""

from __future__ import annotations

import contextlib
import sys
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InputError, ModelLoadError
from .base import Checkpoint, ImageBatch, ModelAdapter, TextBatch, pair_copies, swap_pairs
from .capture import Capture


@dataclass(frozen=True)
class Stream:
    """One token sequence inside a fusion model's forward pass.

    cells:     (N, n) long: the image grid cell (row-major) each token shows, -1 for none.
    positions: (N, n) long: the text token (its position in the tokenised prompt) each token
               is, -1 for none.
    valid:     (N, n) bool: real tokens, not padding.
    """

    name: str
    cells: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    @property
    def size(self) -> int:
        return self.cells.shape[1]

    @classmethod
    def of_text(cls, name: str, attention_mask: torch.Tensor) -> "Stream":
        """A stream that is the tokenised prompt itself (token t is text position t)."""
        rows, n = attention_mask.shape
        positions = torch.arange(n, device=attention_mask.device).expand(rows, n)
        return cls(name, torch.full_like(positions, -1), positions, attention_mask.bool())

    @classmethod
    def of_image(cls, name: str, rows: int, grid: tuple[int, int], first: int, device) -> "Stream":
        """A stream of ``first`` leading tokens (class token) then the patches in row-major order."""
        cells = torch.arange(grid[0] * grid[1], device=device)
        cells = torch.cat([torch.full((first,), -1, dtype=torch.long, device=device), cells])
        cells = cells.expand(rows, -1)
        return cls(name, cells, torch.full_like(cells, -1), torch.ones_like(cells, dtype=torch.bool))


@dataclass
class AttentionEvent:
    """One attention call: ``probs`` (N, H, n_query, n_key) from the ``query`` stream's tokens to
    the ``key`` stream's (the same stream for ``kind == "self"``). ``stack`` and ``layer`` name
    the block it belongs to (for layer options); events that share a ``step`` read the same
    relevance state (LXMERT's two cross directions, computed from the same inputs). ``rows``:
    the query stream's tokens that attend when only some of them do (BLIP-2's Q-Former: its
    query tokens cross-attend to the image, its text tokens do not); None: all of them."""

    kind: str
    query: str
    key: str
    probs: torch.Tensor
    stack: str
    layer: int
    step: int
    rows: slice | None = None
    #: an event of a part of the model that runs once per distinct input (:class:`SharedPart`):
    #: "image" (``probs`` has one row per image, not per pair) or "text" (one row per prompt)
    shared: str | None = None

    def full_rows(self, values: torch.Tensor, n_query: int) -> torch.Tensor:
        """(N, n_rows, k) values of the attending rows -> (N, n_query, k), zero elsewhere
        (``n_query``: the query stream's length)."""
        if self.rows is None:
            return values
        out = values.new_zeros(values.shape[0], n_query, values.shape[2])
        out[:, self.rows] = values
        return out


@dataclass
class FusionRun:
    """What one forward pass of a fusion model over N pair rows left behind.

    logits:   (N,) the pair logit, live (its sigmoid is the match probability).
    streams:  name -> :class:`Stream`.
    events:   attention events in execution order.
    readout:  (stream name, (N, n) weights): how the model reads its score out of that stream's
              tokens, one-hot at a readout token ([CLS]) or spread over several (BLIP-2 averages
              its query tokens); see :func:`readout_token`.
    grid:     (Gh, Gw) of the image.
    leaves:   tensors that require grad and from which every event's probabilities depend on
              what they must (a backward pass ends there).
    shared:   the parts run once per distinct input (:class:`SharedPart`), at most one per tower.
    """

    logits: torch.Tensor
    streams: dict[str, Stream]
    events: list[AttentionEvent]
    readout: tuple[str, torch.Tensor]
    grid: tuple[int, int]
    leaves: list[torch.Tensor]
    shared: list["SharedPart"] = field(default_factory=list)

    def cross_events(self) -> list[AttentionEvent]:
        return [e for e in self.events if e.kind == "cross"]


@dataclass
class SharedPart:
    """The part of a fusion model that reads one input alone, run once per distinct input instead
    of once per pair: an image encoder that runs before image and text meet (BLIP, BLIP-2), the
    whole model where the prompt only picks what is read out (DETR), or the uni-modal encoders
    that feed BridgeTower's cross-modal layers at several depths (``tower`` "image" and "text").

    Pair row b*P + p reads distinct row b of an image part (``copies`` = P) and distinct row p of
    a text part (``copies`` = B). Each place where the part's output reaches the pairs goes
    through :meth:`enter`: the output (distinct rows, in the graph) is kept in ``outputs`` and the
    pairs read its per-pair copies, a tensor that requires grad (``leaves``), where their backward
    pass ends. Every pair's gradient then goes back through the part's one graph as batched
    vector-Jacobian products: block by block where ``block_outputs`` lists each block's output
    (``taps[k]``: the block ``outputs[k]`` is read off), else all its events at once."""

    tower: str
    copies: int
    outputs: list[torch.Tensor] = field(default_factory=list)
    leaves: list[torch.Tensor] = field(default_factory=list)
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    taps: list[int] = field(default_factory=list)

    def per_pair(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, ...) distinct rows -> (N, ...) pair rows."""
        return pair_copies(x, self.copies, tile=self.tower == "text")

    def enter(self, output: torch.Tensor) -> torch.Tensor:
        """The pairs' per-pair copies of ``output`` (read off the last block recorded so far)."""
        self.outputs.append(output)
        self.taps.append(len(self.block_outputs) - 1)
        leaf = self.per_pair(output.detach()).requires_grad_(torch.is_grad_enabled())
        self.leaves.append(leaf)
        return leaf

    def record_block(self, module, args, output) -> None:
        """A forward hook on each block of the part: its output, for the block-by-block products."""
        self.block_outputs.append(output[0] if isinstance(output, tuple) else output)

    def cotangents(self, grad: torch.Tensor) -> torch.Tensor:
        """(N, ...) gradient at a leaf -> (copies, rows, ...), the batched products' layout."""
        rows = grad.shape[0] // self.copies
        pairs = (rows, self.copies) if self.tower == "image" else (self.copies, rows)
        return swap_pairs(self.tower, grad.reshape(*pairs, *grad.shape[1:]))


def share_image_encoder(capture: Capture, encoder: torch.nn.Module, layers: list[torch.nn.Module], copies: int) -> SharedPart:
    """Hooks (for one run, in ``capture``) that record ``layers``' outputs and hand the output of
    ``encoder`` (a transformers image model whose ``last_hidden_state`` the pairs read) to the
    pairs as per-pair copies: the :class:`SharedPart` they fill. The caller passes the encoder
    one row per image and the rest of the model one row per pair."""
    shared = SharedPart("image", copies)

    def on_encoder(module, args, output):
        output.last_hidden_state = shared.enter(output.last_hidden_state)
        return output

    for layer in layers:
        capture.forward_hook(layer, shared.record_block)
    capture.forward_hook(encoder, on_encoder)
    return shared


def readout_token(rows: int, n: int, index: int, device) -> torch.Tensor:
    """(rows, n) readout weights, one-hot at token ``index``."""
    out = torch.zeros(rows, n, device=device)
    out[:, index] = 1.0
    return out


class FusionAdapter(ModelAdapter):
    """Base of the adapters of models that score an image and a text together (the transformers
    ones: a subclass names its classes, how messages name it, and runs its pairs)."""

    #: the transformers classes the adapter takes; a checkpoint whose config names none of them
    #: is loaded as the first when :attr:`load_unnamed`, else refused
    model_classes: tuple[str, ...] = ()
    load_unnamed: bool = True
    #: how messages name the family ("BLIP") and what they suggest ("BlipForImageTextRetrieval,
    #: e.g. Salesforce/blip-itm-base-coco")
    label: str = ""
    supported: str = ""

    fusion = True
    #: the match probability is each pair's own (sigmoid of the logit), never a softmax over prompts
    pair_probability = "sigmoid"
    #: the model has cross-attention between streams (False: one self-attention stack over a
    #: joint sequence, as ViLT)
    cross_attention: bool = True
    #: the text tokens are the queries of the cross-attention to the image (BLIP); False where
    #: other tokens are (BLIP-2: its Q-Former's query tokens, never the text)
    text_cross_attention: bool = True
    #: the image encoder runs before image and text meet, so it runs once per image
    #: (:class:`SharedPart`): :meth:`run_pairs` takes one pixel row per image and ``image_copies``
    shares_image: bool = False
    #: likewise for the text encoder: one id row per prompt and ``text_copies``
    shares_text: bool = False

    @abstractmethod
    def run_pairs(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_copies: int = 1,
        text_copies: int = 1,
    ) -> FusionRun:
        """Run N pair rows, capturing every attention event. Call inside :meth:`explaining`, with
        gradients enabled when they are wanted. ``pixel_values`` has N rows, or with
        :attr:`shares_image` N / ``image_copies`` (one per image: pair row b*P + p reads image
        b); ids and mask have N rows, or with :attr:`shares_text` N / ``text_copies`` (one per
        prompt: pair row b*P + p reads prompt p)."""

    def shared_parts(
        self, pixel_rows: int, text_rows: int, image_copies: int, text_copies: int
    ) -> tuple[int, dict[str, SharedPart]]:
        """(N pair rows, {tower: the :class:`SharedPart` it fills}) for a :meth:`run_pairs` call
        of an adapter whose encoders run once per distinct input (:attr:`shares_image`,
        :attr:`shares_text`)."""
        N = text_rows * text_copies
        if pixel_rows * image_copies != N:
            raise ValueError(f"{pixel_rows} x {image_copies} image rows for {text_rows} x {text_copies} pair rows")
        parts = {}
        if self.shares_image:
            parts["image"] = SharedPart("image", image_copies)
        if self.shares_text:
            parts["text"] = SharedPart("text", text_copies)
        return N, parts

    def run_grid(self, images: ImageBatch, texts: TextBatch) -> FusionRun:
        """Run every (image, prompt) pair: row b*P + p is image b with prompt p."""
        B, P = len(images), len(texts)
        pixels, ids, mask = images.pixel_values, texts.input_ids, texts.attention_mask
        copies = {}
        if self.shares_image:
            copies["image_copies"] = P
        else:
            pixels = pixels.repeat_interleave(P, dim=0)
        if self.shares_text:
            copies["text_copies"] = B
        else:
            ids, mask = ids.repeat(B, 1), mask.repeat(B, 1)
        return self.run_pairs(pixels, ids, mask, **copies)

    @classmethod
    def matches(cls, model) -> bool:
        """Whether ``model`` is an instance of one of :attr:`model_classes` (imports nothing: a
        transformers model object exists only once transformers is imported)."""
        transformers = sys.modules.get("transformers")
        types = tuple(getattr(transformers, n) for n in cls.model_classes if hasattr(transformers, n))
        return bool(types) and isinstance(model, types)

    @classmethod
    def load_parts(cls, checkpoint: Checkpoint):
        """(model, tokenizer) of a transformers checkpoint (directory or hub name) with one of
        :attr:`model_classes`; other heads of the family, and unreadable files, are refused with
        a one-line ModelLoadError."""
        import transformers
        from transformers import AutoConfig

        from .hf_encoder import _quiet_progress, _weight_file_errors, load_failure, load_tokenizer

        source, local, name = checkpoint.source, checkpoint.local_files_only, checkpoint.name
        with _quiet_progress():
            try:
                config = AutoConfig.from_pretrained(source, local_files_only=local)
                heads = getattr(config, "architectures", None) or []
                known = [h for h in heads if h in cls.model_classes]
                if not known and (heads or not cls.load_unnamed):
                    what = ", ".join(heads) if heads else "no named head"
                    raise ModelLoadError(
                        f"{name}: a {cls.label} checkpoint for {what}; cliplens explains {cls.label} with {cls.supported}"
                    )
                model_class = getattr(transformers, known[0] if known else cls.model_classes[0])
                model = model_class.from_pretrained(source, dtype=checkpoint.dtype, local_files_only=local)
            except (OSError, ValueError, RuntimeError, *_weight_file_errors()) as exc:
                raise load_failure(exc, name, cls.label) from None
            tokenizer = load_tokenizer(checkpoint, source, local, name, cls.label)
        return model, tokenizer

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """Frozen eval mode and eager attention (the path whose attention modules hand over
        their probabilities), for the call only."""
        with Capture() as capture:
            capture.freeze(self.model)
            capture.eager_attention(self.model)
            yield

    def tokenize(self, texts: list[str]) -> TextBatch:
        """BERT word pieces (every transformers fusion model so far): see :func:`bert_tokenize`."""
        return bert_tokenize(self.tokenizer, texts, self.context_length, self.device)

    def score_table(self, images: ImageBatch, texts: TextBatch) -> torch.Tensor:
        """(B, P) logits of every image against every prompt, no gradients."""
        with torch.no_grad():
            run = self.run_grid(images, texts)
        return run.logits.detach().reshape(len(images), len(texts))

    # ---- what a fusion model does not have ------------------------------------------------
    def _no_towers(self) -> InputError:
        return InputError(
            f"{self.name} is a fusion model ({self.family}): it scores an image and a text together, "
            "so it has no separate image and text towers to run"
        )

    def logit_scale(self) -> torch.Tensor:
        raise self._no_towers()

    def run_image(self, pixel_values, *, detach_blocks=False, input_embeds=None, fan_out=None, reads=None):
        raise self._no_towers()

    def run_text(self, input_ids, attention_mask, *, detach_blocks=False, fan_out=None, reads=None):
        raise self._no_towers()


def bert_tokenize(tokenizer, texts: list[str], limit: int, device) -> TextBatch:
    """[CLS] prompt [SEP] with a BERT tokenizer, at most ``limit`` tokens, padded to the longest;
    content: the tokens between [CLS] and [SEP]."""
    full = tokenizer(list(texts), truncation=False)["input_ids"]
    kept = tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
    width = max(len(ids) for ids in kept)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(texts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    content = torch.zeros((len(texts), width), dtype=torch.bool)
    tokens = []
    for i, ids in enumerate(kept):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        content[i, 1 : len(ids) - 1] = True
        tokens.append(tokenizer.convert_ids_to_tokens(ids))
    truncated = [len(f) > len(k) for f, k in zip(full, kept)]
    return TextBatch(list(texts), input_ids.to(device), mask.to(device), tokens, truncated, content.to(device))
