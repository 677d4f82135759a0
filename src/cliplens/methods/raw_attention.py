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

Cost: one forward of each tower over the B images and P prompts, no backward, no B*P
replication; O(H n) per explained row. Every block runs the fused kernel; the shown one keeps
its queries and keys (``kept_attention``), from which the readout row alone is recomputed.

Fusion models: the readout token's attention row to each stream in the readout stream's block
``layer`` (default: the last): on BLIP, the [CLS] token's cross-attention row over the image
tokens (image map) and its self-attention row over the prompt (token scores); on a
single-stream model, its self-attention row over the joint sequence. Every pair runs through the
model (the image map depends on the prompt there), still with no backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import ModelAdapter
from ..adapters.fusion import FusionAdapter
from ..targets import Target
from .base import Attribution, Method, option, register, resolve_layer
from .fusion_pairs import FusionRuns
from .pairs import PairRuns
from .relevance import head_mean_row, readout_rows


@register
class RawAttention(Method):
    name = "raw_attention"
    summary = "the readout token's attention row of one block, mean over heads (no gradient; same map for every prompt)"
    fusion_summary = "the readout token's last cross- and self-attention rows, mean over heads (no gradient)"
    reference = (
        "Abnar, Zuidema. Quantifying Attention Flow in Transformers. ACL 2020 (raw attention baseline)"
    )
    needs_gradient = False
    kept_attention = True
    fusion = True

    @dataclass(frozen=True)
    class Options:
        layer: int | None = option(
            None, "block whose attention is shown (default: the last; negative counts from the end)", "int"
        )

    def attention_blocks(self, tower: str, opts: Options, num_layers: int) -> frozenset[int]:
        return frozenset({resolve_layer(opts.layer, num_layers, num_layers - 1)})

    def attribute(
        self, adapter: ModelAdapter, runs: PairRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        rows = {}
        for tower in towers:
            run = runs.run(tower)
            l = resolve_layer(opts.layer, len(run.attentions), len(run.attentions) - 1)
            rows[tower] = head_mean_row(run.attentions[l], readout_rows(self.name, run))
        return Attribution.of_rows(runs, rows)

    def attribute_fusion(
        self, adapter: FusionAdapter, runs: FusionRuns, target: Target, towers: tuple[str, ...], opts: Options
    ) -> Attribution:
        run = runs.run
        stream, weights = run.readout
        rows = {}
        for key in run.streams:
            seen = [e for e in run.events if e.query == stream and e.key == key]
            if not seen:
                continue
            layers = sorted({e.layer for e in seen})
            layer = layers[resolve_layer(opts.layer, len(layers), len(layers) - 1)]
            event = [e for e in seen if e.layer == layer][-1]
            mean = event.full_rows(runs.pair_rows(event, event.probs.detach().mean(dim=1)), run.streams[stream].size)
            rows[key] = torch.einsum("rq,rqk->rk", weights.to(mean.dtype), mean)
        return Attribution(*runs.results(rows, towers))
