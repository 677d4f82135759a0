"""Attention rollout (Abnar & Zuidema): attention composed through the blocks, with the
residual connection as an identity.

    Ahat^l = rownormalise(mean_h A^l + I)
    R = Ahat^{L-1} ... Ahat^{l0}           map = R[r, :]

with r the tower's readout token (class token / end-of-text token). Only that row is needed:
starting from the one-hot row at r, ``row <- row @ Ahat^l`` from the last block down to
``start_layer``, O(H n^2) per block instead of O(n^3) matrix products. Since
``Ahat = (Abar + I) / s`` with s the row sums, ``row @ Ahat = (row / s) @ Abar + row / s``,
so Ahat is never formed. The image map is the row at the patch columns, the text scores the
row at every token. Attention-pooled towers start from the pooling head's attention row.

No gradient: the map does not depend on the prompt (image side) or on the image (text side);
the B x P maps repeat the B image rows over the prompts and the P text rows over the images.
That is the truth for this method, not an approximation.

Paper: S. Abnar, W. Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.

Differences from the reference code (samiraabnar/attention_flow, and the rollout used as a
baseline by Chefer et al.): the row product instead of full matrices (same numbers); raw
values (the reference code often divides the row by its maximum for display);
``start_layer`` lets rollout skip the first blocks (default 0: all blocks, as the paper).

Cost: one forward of each tower over the B images and P prompts, no backward, no B*P
replication; O(H n^2) per block. The blocks run the fused kernel and those from
``start_layer`` on keep their queries and keys (``kept_attention``): each step recomputes the
probabilities a chunk of query rows at a time, never a block's H x n x n whole.

Fusion models: only those with one self-attention stack over a joint sequence of text and
image tokens (ViLT), where rollout is the same product over that stack (``start_layer`` counts
its blocks); models with cross-attention are refused (rollout has no cross-attention rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import ModelAdapter
from ..adapters.fusion import FusionAdapter
from ..targets import Target
from .base import Attribution, Method, option, register, resolve_layer
from .fusion_pairs import FusionRuns
from .pairs import PairRuns
from .relevance import accumulation_dtype, readout_rows, rollout_row, rollout_step


@register
class Rollout(Method):
    name = "rollout"
    summary = "attention rollout, Abnar & Zuidema 2020 (no gradient; same map for every prompt)"
    fusion_summary = "attention rollout over a single-stream model's joint stack (no gradient)"
    reference = "Abnar, Zuidema. Quantifying Attention Flow in Transformers. ACL 2020"
    needs_gradient = False
    kept_attention = True
    fusion = True

    @dataclass(frozen=True)
    class Options:
        start_layer: int | None = option(
            None, "first block to include (default 0 = all blocks; negative counts from the end)", "int"
        )

    def attention_blocks(self, tower: str, opts: Options, num_layers: int) -> frozenset[int]:
        return frozenset(range(resolve_layer(opts.start_layer, num_layers, 0, "start_layer"), num_layers))

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        rows = {}
        for tower in towers:
            run = runs.run(tower)
            start = resolve_layer(opts.start_layer, len(run.attentions), 0, "start_layer")
            rows[tower] = rollout_row(run, readout_rows(self.name, run), start)
        return Attribution.of_rows(runs, rows)

    def fusion_unsupported(self, adapter: FusionAdapter, opts: Options) -> str | None:
        if adapter.cross_attention:
            return (
                f"rollout composes self-attention only; {adapter.name} ({adapter.family}) has cross-attention "
                "(use chefer, whose bi-modal rules cover it)"
            )
        return None

    def attribute_fusion(
        self, adapter: FusionAdapter, runs: FusionRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        run = runs.run
        stream, weights = run.readout
        events = [e for e in run.events if e.kind == "self" and e.query == stream]
        start = resolve_layer(opts.start_layer, len(events), 0, "start_layer")
        row = weights.to(accumulation_dtype(run.logits.dtype))
        for event in reversed(events[start:]):
            row = rollout_step(runs.pair_rows(event, event.probs.detach()).to(row.dtype), row)
        return Attribution(*runs.results({stream: row}, towers))
