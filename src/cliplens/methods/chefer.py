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
- all prompts and images of a call go through one forward per tower and one backward;
- text scores keep every token and their raw scale (the reference keeps columns 1..eot-1
  and divides by their sum; :meth:`Explanation.normalised_tokens` does that explicitly).
- default ``start_layer`` is the last block, as in the reference for ViT-B/16.

Cost: one forward of each tower over the B*P pairs, one backward, plus O(H n^2) per block.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import ModelAdapter
from ..targets import Target
from .base import Attribution, Method, option, register, resolve_layer
from .pairs import PairRuns
from .relevance import RowFold


@register
class Chefer(Method):
    name = "chefer"
    summary = "gradient-weighted attention relevance, Chefer et al. 2021 (image map and token scores)"
    reference = "Chefer, Gur, Wolf. Generic Attention-model Explainability... ICCV 2021"

    @dataclass(frozen=True)
    class Options:
        start_layer: int | None = option(
            None, "first block to include (default: the last block; 0 = all; negative counts from the end)", "int"
        )

    def graph_from(self, tower: str, opts: Options, num_layers: int) -> int:
        # the relevance of blocks before start_layer is the identity: no gradient needed there
        return resolve_layer(opts.start_layer, num_layers, num_layers - 1, "start_layer")

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        folds: dict[str, RowFold] = {}
        try:
            for tower in towers:
                run = runs.run(tower)
                n_layers = len(run.attentions)
                start = resolve_layer(opts.start_layer, n_layers, n_layers - 1, "start_layer")
                folds[tower] = RowFold(self.name, run, start)
            runs.backward()
            rows = {tower: fold.done().detach() for tower, fold in folds.items()}
        finally:
            for fold in folds.values():
                fold.remove()
        return Attribution.of_rows(runs, rows)
