"""One forward pass of a fusion model over all (image, prompt) pairs, for the methods to use.

Layout as for dual encoders: pair (b, p) is row ``b*P + p``. A fusion model mixes image and text
inside the network, so every pair is its own row of the model's batch (pixels repeated per
prompt, prompts tiled per image); one backward pass of ``y.sum()`` hands every pair its own
gradients, since rows of a batch never mix. Where the image encoder runs before image and text
meet (BLIP, BLIP-2: ``FusionAdapter.shares_image``) it runs once per image instead; where
both encoders run alone before they meet (BridgeTower, ``shares_text`` too) each runs once per
distinct input. Their events' per-pair gradients come from batched vector-Jacobian products
through their one graph.

The helpers turn per-stream token values back into per-pair results: image maps on the grid
(each token put on the cell it shows, which undoes ViLT's shuffled patch order) and token
scores on the prompt's positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..adapters.base import ImageBatch, TextBatch, against_pairs, pair_copies, swap_pairs
from ..adapters.fusion import FusionAdapter, FusionRun
from ..targets import LogitContext, Target, probabilities
from .pairs import batched_vjp, stack_vjps
from .relevance import reduced_gradients


@dataclass
class FusionRuns:
    """The run of B images x P prompts through a fusion model and the explained scalars."""

    B: int
    P: int
    run: FusionRun
    y: torch.Tensor  # (B, P) live
    logits: torch.Tensor  # (B, P) detached
    probs: torch.Tensor  # (B, P) detached
    text_width: int
    content: torch.Tensor  # (B*P, T) bool: each row's prompt tokens between start and end markers

    def content_of(self, stream) -> torch.Tensor:
        """(N, n) bool: the tokens of ``stream`` that are content tokens of their prompt."""
        at = stream.positions.clamp(min=0)
        return (stream.positions >= 0) & stream.valid & torch.gather(self.content, 1, at)

    def event_gradients(self, reduce: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> list:
        """``reduce(i, probs, dy/dA_i)`` for every event i (``probs`` its probabilities, detached
        and broadcastable against the gradient), each gradient reduced the moment it arrives;
        every result has N = B*P rows (None where y does not depend on the event).

        One backward pass of sum(y). The events of a part run once per distinct input
        (:class:`~cliplens.adapters.fusion.SharedPart`) come after it: the pairs' gradients at
        the part's per-pair outputs go back through its one graph as batched vector-Jacobian
        products, one block at a time (or all at once where the whole model runs per image, as
        DETR), each gradient (B, P, ...) per pair."""
        run, N = self.run, self.B * self.P
        events = run.events
        live = [i for i, e in enumerate(events) if e.probs.requires_grad and e.shared is None]
        parts = [part for part in run.shared if part.leaves and part.leaves[0].requires_grad]
        tensors = [events[i].probs for i in live] + [leaf for part in parts for leaf in part.leaves]

        def per_pair(j: int, grad: torch.Tensor) -> torch.Tensor:
            if j >= len(live):  # a shared part's per-pair cotangents, kept whole
                return grad
            return reduce(live[j], events[live[j]].probs.detach(), grad)

        got = reduced_gradients(self.y.sum(), tensors, per_pair, run.leaves)
        out: list = [None] * len(events)
        for j, i in enumerate(live):
            out[i] = got[j]
        at = len(live)
        for part in parts:
            grads = got[at : at + len(part.leaves)]
            at += len(part.leaves)
            cots = [part.cotangents(torch.zeros_like(leaf) if g is None else g) for g, leaf in zip(grads, part.leaves)]
            mine = [i for i, e in enumerate(events) if e.shared == part.tower]
            if not mine:
                continue
            probs = [events[i].probs for i in mine]
            if part.block_outputs:  # a stack of blocks: one block at a time
                if len(mine) != len(part.block_outputs):
                    raise RuntimeError(f"{len(mine)} shared {part.tower} events for {len(part.block_outputs)} blocks")
                taps: dict[int, list] = {}
                for output, tap, cot in zip(part.outputs, part.taps, cots):
                    taps.setdefault(tap, []).append((output, cot))
                vjps = stack_vjps(part.block_outputs, probs, 0, taps)
            else:  # the whole model (DETR): every event at once
                vjps = enumerate(batched_vjp(part.outputs, probs, cots, allow_unused=True))
            for k, grad in vjps:
                if grad is None:
                    continue
                i = mine[k]
                value = reduce(i, against_pairs(part.tower, events[i].probs.detach()), swap_pairs(part.tower, grad))
                out[i] = value.reshape(N, *value.shape[2:])
        return out

    def pair_rows(self, event, values: torch.Tensor) -> torch.Tensor:
        """(rows, ...) values of ``event`` -> (N, ...), one row per pair: the events of a part run
        once per distinct input (``event.shared``) are repeated for each pair that reads them."""
        if event.shared is None:
            return values
        copies = self.P if event.shared == "image" else self.B
        return pair_copies(values, copies, tile=event.shared == "text")

    def image_maps(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, P, Gh, Gw) from per-stream token values {stream: (N, n)}: each token's value on
        the grid cell it shows (NaN on a cell no token shows)."""
        gh, gw = self.run.grid
        N = self.B * self.P
        ref = next(iter(rows.values()))
        out = torch.full((N, gh * gw), float("nan"), dtype=ref.dtype, device=ref.device)
        for name, values in rows.items():
            cells = self.run.streams[name].cells
            keep = cells >= 0
            r = torch.arange(N, device=cells.device)[:, None].expand_as(cells)
            out[r[keep], cells[keep]] = values[keep]
        return out.reshape(self.B, self.P, gh, gw)

    def token_scores(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, P, T) from per-stream token values: each text token's value at its position
        (NaN on padding)."""
        N = self.B * self.P
        ref = next(iter(rows.values()))
        out = torch.full((N, self.text_width), float("nan"), dtype=ref.dtype, device=ref.device)
        for name, values in rows.items():
            stream = self.run.streams[name]
            keep = (stream.positions >= 0) & stream.valid
            r = torch.arange(N, device=keep.device)[:, None].expand_as(keep)
            out[r[keep], stream.positions[keep]] = values[keep]
        return out.reshape(self.B, self.P, self.text_width)

    def results(self, rows: dict[str, torch.Tensor], towers: tuple[str, ...]):
        """(image maps or None, token scores or None) for the explained ``towers``."""
        return (
            self.image_maps(rows) if "image" in towers else None,
            self.token_scores(rows) if "text" in towers else None,
        )


def forward_fusion(
    adapter: FusionAdapter, images: ImageBatch, texts: TextBatch, target: Target, *, grad: bool = True
) -> FusionRuns:
    """Run every pair through the model (call inside ``adapter.explaining()``) and evaluate the
    target on the pair logits."""
    B, P = len(images), len(texts)
    with torch.set_grad_enabled(grad):
        run = adapter.run_grid(images, texts)
        live = run.logits.reshape(B, P)
        y = target(LogitContext(live, adapter.pair_probability))
    logits = live.detach()
    return FusionRuns(
        B,
        P,
        run,
        y,
        logits,
        probabilities(logits, adapter.pair_probability),
        texts.input_ids.shape[1],
        texts.content.repeat(B, 1),
    )
