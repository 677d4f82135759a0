"""Raw attention: the readout token's attention row in one block, averaged over heads.

    Map[j] = mean over heads h of A^l[h, r, j]        (l: the last block by default)

with r the tower's readout token (class token of the image tower, end-of-text token of the
text tower). The image map is Map at the patch columns; the text scores are Map at every
token. For attention-pooled towers (no readout token) the row is the pooling head's attention
(mean over its heads and queries) when the adapter captures it.

No gradient: the map does not depend on the prompt (image side) or on the image (text side),
so the B x P maps of a call repeat the B image rows over the prompts, and the P text rows over
the images. That is what this method is, not a shortcut: attention alone says where the
readout token looks, not what matters for this pair.

Paper: the baseline used throughout the attribution literature, e.g. S. Abnar, W. Zuidema,
"Quantifying Attention Flow in Transformers", ACL 2020 (raw attention vs rollout/flow).

Differences from common reference code: the raw head-mean (no normalisation, no dropping of
the class column beyond reporting patches), any block selectable with ``layer``.

Cost: one forward of each tower over the B images and P prompts (eager attention), no
backward, no B*P replication; O(H n) per explained row.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import ModelAdapter
from ..targets import Target
from .base import Attribution, Method, option, register, resolve_layer
from .pairs import PairRuns
from .relevance import head_mean_row, readout_rows


@register
class RawAttention(Method):
    name = "raw_attention"
    summary = "the readout token's attention row of one block, mean over heads (no gradient; same map for every prompt)"
    reference = (
        "Abnar, Zuidema. Quantifying Attention Flow in Transformers. ACL 2020 (raw attention baseline)"
    )
    needs_gradient = False

    @dataclass(frozen=True)
    class Options:
        layer: int | None = option(
            None, "block whose attention is shown (default: the last; negative counts from the end)", "int"
        )

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        rows = {}
        for tower in towers:
            run = runs.run(tower)
            l = resolve_layer(opts.layer, len(run.attentions), len(run.attentions) - 1)
            rows[tower] = head_mean_row(run.attentions[l], readout_rows(self.name, run))
        return Attribution.of_rows(runs, rows)
