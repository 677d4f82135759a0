"""One forward pass of each tower over all (image, prompt) pairs, for the methods to use.

Layout: pair (b, p) is row ``b*P + p``. When a method needs gradients on a tower, that tower
runs once over the B*P rows (image b repeated for each prompt, prompt p repeated for each
image), so a single backward pass of ``y.sum()`` hands every pair its own gradient: rows of a
batch never mix in a transformer (no batch statistics). A tower that needs no gradient runs
on its B (or P) distinct inputs only, without building a graph.

The helpers below turn per-row tower values back into per-pair results (B, P, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import FanOut, ImageBatch, ModelAdapter, TextBatch, TowerRun
from ..targets import PairContext, PairScores, Target


@dataclass
class PairRuns:
    """Both towers' runs for B images x P prompts and the explained scalars."""

    B: int
    P: int
    image: TowerRun  # B*P rows if image_per_pair else B rows
    text: TowerRun  # B*P rows if text_per_pair else P rows
    y: torch.Tensor  # (B, P) the explained scalars, live
    logits: torch.Tensor  # (B, P) detached
    probs: torch.Tensor  # (B, P) detached
    image_per_pair: bool
    text_per_pair: bool
    scores: PairScores
    images: ImageBatch  # the inputs, for a method that runs a tower again
    texts: TextBatch

    def run(self, tower: str) -> TowerRun:
        return self.image if tower == "image" else self.text

    def per_pair(self, tower: str) -> bool:
        return self.image_per_pair if tower == "image" else self.text_per_pair

    def grad_inputs(self) -> list[torch.Tensor]:
        """Where a backward pass ends, for each tower that runs per pair: the per-pair leaf its
        run fanned out at (:class:`FanOut`), else its embedding input."""
        out = []
        for tower in ("image", "text"):
            if self.per_pair(tower):
                run = self.run(tower)
                out.append(run.graph_input if run.graph_input is not None else run.input_embeds)
        return out

    def backward(self) -> list[torch.Tensor]:
        """One backward pass of sum(y); returns gradients w.r.t. :meth:`grad_inputs`.
        Tensor hooks registered on captured tensors fire during it."""
        inputs = self.grad_inputs()
        if not inputs:
            return []
        return list(torch.autograd.grad(self.y.sum(), inputs))

    def constant(self, tower: str) -> torch.Tensor:
        """(B, P, D) the final embeddings of ``tower`` for every pair, detached."""
        e = self.run(tower).embeds.detach()
        if self.per_pair(tower):
            return per_pair(e, self.B, self.P)
        return e[:, None].expand(self.B, self.P, -1) if tower == "image" else e[None].expand(self.B, self.P, -1)

    def context_with(self, tower: str, embeds: torch.Tensor) -> PairContext:
        """A target context in which ``tower``'s per-pair embeddings (B, P, D) are replaced by
        ``embeds`` (live) and the other tower's are its final embeddings, held constant."""
        if tower == "image":
            return PairContext.of(embeds, self.constant("text"), self.scores)
        return PairContext.of(self.constant("image"), embeds, self.scores)


# Kept under its former name for code written against cliplens.engine
PairsForward = PairRuns


def per_pair(x: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P, ...) -> (B, P, ...)."""
    return x.reshape(B, P, *x.shape[1:])


def forward_pairs(
    adapter: ModelAdapter,
    images: ImageBatch,
    texts: TextBatch,
    target: Target,
    *,
    image_grad: bool,
    text_grad: bool,
    detach_blocks: bool = False,
    graph_from: dict[str, int | None] | None = None,
) -> PairRuns:
    """Run both towers (call inside ``adapter.explaining()``) and evaluate the target.

    ``graph_from`` (tower -> block), for a tower with a gradient: the first block whose tensors
    need one. The blocks before it then run once per distinct input without a graph and the
    per-pair rows start there (:class:`~cliplens.adapters.base.FanOut`), so neither the forward
    nor the backward repeats work a method does not need. None (or a tower missing): per-pair
    rows from the input."""
    B, P = len(images), len(texts)
    graph_from = graph_from or {}
    pixels = images.pixel_values
    if image_grad and graph_from.get("image") is not None:
        with torch.no_grad():  # the fan-out turns gradients on at its block
            img = adapter.run_image(pixels, detach_blocks=detach_blocks, fan_out=FanOut(graph_from["image"], P))
        img_pairs = per_pair(img.embeds, B, P)
    elif image_grad:
        with torch.enable_grad():
            img = adapter.run_image(pixels.repeat_interleave(P, dim=0), detach_blocks=detach_blocks)
        img_pairs = per_pair(img.embeds, B, P)
    else:
        with torch.no_grad():
            img = adapter.run_image(pixels, detach_blocks=detach_blocks)
        img_pairs = img.embeds.detach()[:, None].expand(B, P, -1)
    ids, mask = texts.input_ids, texts.attention_mask
    if text_grad and graph_from.get("text") is not None:
        with torch.no_grad():
            fan = FanOut(graph_from["text"], B, tile=True)
            txt = adapter.run_text(ids, mask, detach_blocks=detach_blocks, fan_out=fan)
        txt_pairs = per_pair(txt.embeds, B, P)
    elif text_grad:
        with torch.enable_grad():
            txt = adapter.run_text(ids.repeat(B, 1), mask.repeat(B, 1), detach_blocks=detach_blocks)
        txt_pairs = per_pair(txt.embeds, B, P)
    else:
        with torch.no_grad():
            txt = adapter.run_text(ids, mask, detach_blocks=detach_blocks)
        txt_pairs = txt.embeds.detach()[None].expand(B, P, -1)
    scores = PairScores.of(adapter, img_pairs.dtype)
    with torch.set_grad_enabled(image_grad or text_grad):
        y = target(PairContext.of(img_pairs, txt_pairs, scores))
    with torch.no_grad():
        logits = scores.logits(img_pairs.detach(), txt_pairs.detach())
        probs = scores.probs(logits)
    return PairRuns(B, P, img, txt, y, logits, probs, image_grad, text_grad, scores, images, texts)


# ---- per-row tower values -> per-pair results ----------------------------------------------


def grid_maps(run: TowerRun, token_values: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P or B, n) per-token values of an image tower -> (B, P, Gh, Gw) patch maps."""
    gh, gw = run.layout.grid
    vals = token_values[:, run.layout.patches]
    if vals.shape[0] == B:
        vals = vals[:, None].expand(B, P, -1)
    return vals.reshape(B, P, gh, gw)


def token_rows(run: TowerRun, token_values: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P or P, T) per-token values of a text tower -> (B, P, T), NaN on padding."""
    vals = token_values.masked_fill(~run.layout.valid, float("nan"))
    if vals.shape[0] == P:
        vals = vals[None].expand(B, P, -1)
    return vals.reshape(B, P, -1)


def tower_result(runs: PairRuns, tower: str, token_values: torch.Tensor) -> torch.Tensor:
    """Per-row token values of ``tower`` -> its per-pair result: (B, P, Gh, Gw) image maps or
    (B, P, T) token scores."""
    shape = grid_maps if tower == "image" else token_rows
    return shape(runs.run(tower), token_values, runs.B, runs.P)
