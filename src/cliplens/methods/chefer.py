"""Chefer et al. 2021, gradient-weighted attention relevance (self-attention rule).

Computes, per tower, the readout token's row of the relevance matrix
``R = prod_l (I + Abar^l)`` with ``Abar^l = mean_h (dy/dA^l * A^l)^+`` for blocks
``l >= start_layer``. The image map is that row at the patch tokens; the text scores are the
row at every token (the display keeps the tokens between start and end markers).

Paper: H. Chefer, S. Gur, L. Wolf, "Generic Attention-model Explainability for Interpreting
Bi-Modal and Encoder-Decoder Transformers", ICCV 2021.

Differences from the reference (Transformer-MM-Explainability, CLIP notebook ``interpret``):
- the row is folded into the backward pass block by block (``r <- r + r @ Abar``), O(n^2)
  per block, instead of n x n matrix products; same numbers;
- all prompts and images of a call go through one forward per tower and one batched backward;
- text scores keep every token and their raw scale (the reference keeps columns 1..eot-1
  and divides by their sum; :meth:`Explanation.normalised_tokens` does that explicitly).
- default ``start_layer`` is the last block, as in the reference for ViT-B/16.

Cost: one forward of each tower over its DISTINCT inputs (B images, P prompts; a graph from
``start_layer`` on), then the pairs' gradients block by block as batched vector-Jacobian
products over that one graph (``shared_graph``, :func:`~cliplens.methods.pairs.block_gradients`),
each block's reduced to Abar and folded before the next, plus O(H n^2) per block and pair.
The explained blocks run the fused attention kernel (``kept_attention``): each keeps its q, k,
v, and the gradient is taken at the kernel's output; A and dy/dA = dO V^T are recomputed a
chunk of query rows at a time for the fold (:class:`~cliplens.adapters.kept.KeptAttention`),
so no H x n x n tensor of a whole block exists (float64 runs stay eager, see
:meth:`~cliplens.adapters.kept.AttentionReads.runs_kept`). With the default start layer on a
tower that reads out a token, the last block's gradient comes through the readout token's row
alone (the only row of that block the embedding reads; see
:func:`~cliplens.methods.pairs.readout_attention_gradients`): the pairs' batched product is
over one row per input instead of the block's n, and the forward itself stops in that block's
attention, the embedding finished from the same row (``reads_readout_row``; the block's output
projection and MLP never run over the other rows). chefer then costs about the model's own
forward at any P. From an earlier start layer the last block is still read at that row alone
(the relevance row is one-hot there): one product through the row gives its Abar row and the
pairs' gradients at its input (:func:`~cliplens.methods.pairs.readout_input_gradients`), from
which the blocks below go on.

Fusion models (BLIP image-text matching, ViLT, ...): the bi-modal and encoder-decoder rules of
the same paper (:class:`~cliplens.methods.relevance.StreamRelevance`): relevance matrices between
every pair of token streams, updated by every attention event in execution order (self-attention
rule, cross-attention rule with the residual normalisation ``Rbar``). The image map is the
readout token's row over the image tokens, the text scores its row over the text tokens; all
layers take part, as in the reference generators. ``degenerate_rows`` says what a row of
``R - I`` that sums to zero gives in ``Rbar`` (0/0): ``identity`` (default, that row of Rbar is
e_i; how many there were is in ``extras["degenerate_rows"]``) or ``reference`` (the reference
code's 0/0 = NaN, its cross term zeroed as the DETR generator does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelAdapter
from ..adapters.fusion import FusionAdapter
from ..adapters.kept import query_rows
from ..targets import Target
from .base import Attribution, Method, option, register, resolve_layer
from .fusion_pairs import FusionRuns
from .pairs import PairRuns, block_gradients, readout_attention_gradients, readout_input_gradients
from .relevance import DEGENERATE_POLICIES, RowFold, StreamRelevance, accumulation_dtype, gradient_weighted


@register
class Chefer(Method):
    name = "chefer"
    summary = "gradient-weighted attention relevance, Chefer et al. 2021 (image map and token scores)"
    fusion_summary = "the bi-modal and encoder-decoder relevance rules of Chefer et al. 2021 (self- and cross-attention, every layer)"
    reference = "Chefer, Gur, Wolf. Generic Attention-model Explainability... ICCV 2021"

    @dataclass(frozen=True)
    class Options:
        start_layer: int | None = option(
            None, "first block to include (default: the last block; 0 = all; negative counts from the end)", "int"
        )
        degenerate_rows: str = option(
            "identity",
            "fusion models: a row of R - I summing to 0 in the cross rule is e_i (identity) or 0/0 as in the reference code (reference)",
            "choice",
            DEGENERATE_POLICIES,
        )

    fusion = True
    shared_graph = True
    kept_attention = True

    def graph_from(self, tower: str, opts: Options, num_layers: int) -> int:
        # the relevance of blocks before start_layer is the identity: no gradient needed there
        return resolve_layer(opts.start_layer, num_layers, num_layers - 1, "start_layer")

    def reads_readout_row(self, tower: str, opts: Options, num_layers: int) -> bool:
        # the last block's readout row of Abar, and the gradient at its input through that row
        # (shared_row), whatever the start layer
        return True

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        starts = {}
        for tower in towers:
            n_layers = len(runs.run(tower).attentions)
            starts[tower] = resolve_layer(opts.start_layer, n_layers, n_layers - 1, "start_layer")
        rows = {
            tower: shared_row(self.name, adapter, runs, tower, starts[tower]) for tower in towers if tower in runs.leaves
        }
        folds = {t: RowFold.hooked(self.name, runs.run(t), starts[t]) for t in towers if t not in runs.leaves}
        try:
            if folds:
                runs.backward()
            rows.update({tower: fold.done().detach() for tower, fold in folds.items()})
        finally:
            for fold in folds.values():
                fold.remove()
        return Attribution.of_rows(runs, rows)

    def fusion_unsupported(self, adapter: FusionAdapter, opts: Options) -> str | None:
        if opts.start_layer is not None:
            return (
                "chefer on a fusion model uses every attention event of every layer (the bi-modal rules); "
                "start_layer applies to dual encoders only"
            )
        return None

    def attribute_fusion(
        self, adapter: FusionAdapter, runs: FusionRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        run = runs.run
        abars = runs.event_gradients(lambda i, probs, grad: gradient_weighted(probs, grad))
        dtype = accumulation_dtype(run.logits.dtype)
        stream, weights = run.readout
        if not run.cross_events():
            # self-attention only (ViLT): streams never mix, and only the readout's row is
            # needed: r <- r + r @ Abar from the last event back, O(n^2) instead of O(n^3)
            row = weights.to(dtype)
            for event, abar in reversed(list(zip(run.events, abars))):
                if event.query == stream and abar is not None:
                    row = row + torch.bmm(row.unsqueeze(1), abar.to(dtype)).squeeze(1)
            rows = {stream: row}
            degenerate = torch.zeros(runs.B * runs.P, dtype=dtype, device=row.device)
        else:
            valid = {name: s.valid for name, s in run.streams.items()}
            rel = StreamRelevance(valid, dtype, opts.degenerate_rows)
            for step in fusion_steps(run, abars):
                rel.apply(step)
            rows = {name: rel.row(stream, weights, name) for name in run.streams}
            degenerate = rel.degenerate
        image_maps, token_scores = runs.results(rows, towers)
        return Attribution(
            image_maps=image_maps,
            token_scores=token_scores,
            extras={"degenerate_rows": degenerate.reshape(runs.B, runs.P).to(dtype)},
        )


def shared_row(method: str, adapter: ModelAdapter, runs: PairRuns, tower: str, start: int) -> torch.Tensor:
    """(B*P, n) the readout rows of a shared tower's pairs, folded block by block from
    :func:`~cliplens.methods.pairs.block_gradients` (each block's gradient reduced to Abar
    before the next is computed). A tower that reads out a token needs only its last block's
    readout row of Abar (the row is one-hot there), and that block's gradients come through
    that row alone: at its attention (:func:`~cliplens.methods.pairs.readout_attention_gradients`)
    when it is the only block explained (the default), else also at its input
    (:func:`~cliplens.methods.pairs.readout_input_gradients`), where the blocks below take
    over."""
    run = runs.run(tower)
    fold = RowFold(method, run, start, pairs=lambda rows: runs.pair_values(tower, rows).reshape(runs.B * runs.P, -1))
    last = len(run.attentions) - 1
    entering = None  # the pairs' gradients at the last block's input, where they came through its row
    if start == last:
        grad = readout_attention_gradients(adapter, runs, tower)
    else:
        got = readout_input_gradients(adapter, runs, tower, attention=True)
        entering, grad = got if got is not None else (None, None)
    if grad is not None:  # (B, P, H, n)
        probs = runs.distinct(tower, query_rows(run.attentions[last], run.layout.readout))
        abar = gradient_weighted(probs[..., None, :].to(grad.dtype), grad[..., None, :])  # (B, P, 1, n)
        fold.readout_block(last, abar.reshape(runs.B * runs.P, -1))
        if start == last:
            return fold.done().detach()
    head = [] if run.layout.has_readout_token else [run.pool_attention]
    for layer, probs, grad in block_gradients(runs, tower, start, head, entering_last=entering):
        if layer is None:
            fold.pool(probs, grad)
        else:
            fold.block(layer, probs, grad)
    return fold.done().detach()


def fusion_steps(run, abars) -> list[list[tuple[str, str, str, torch.Tensor]]]:
    """The run's events as rule inputs ``(kind, query, key, Abar)``, grouped by step in execution
    order; an event the explained value does not depend on has Abar = 0."""
    steps: list[list] = []
    last = None
    for event, abar in zip(run.events, abars):
        if abar is None:
            rows = run.streams[event.query].valid.shape[0]  # one per pair, also for a shared image's events
            abar = event.probs.detach().new_zeros(rows, event.probs.shape[2], event.probs.shape[3])
        if event.step != last:
            steps.append([])
            last = event.step
        abar = event.full_rows(abar, run.streams[event.query].size)
        steps[-1].append((event.kind, event.query, event.key, abar))
    return steps
