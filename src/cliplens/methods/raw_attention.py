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

import torch

from ..adapters.base import ImageBatch, ModelAdapter, TextBatch, TowerRun
from ..engine import forward_pairs
from ..errors import InputError
from ..targets import Target
from .base import Method, MethodResult, grid_maps, one_hot_rows, register, resolve_layer, token_rows


def readout_rows(method: str, run: TowerRun) -> torch.Tensor:
    """(rows, n): the one-hot row of each readout token, or the pooling head's attention row
    (mean over heads and queries) for towers without one."""
    if run.layout.has_readout_token:
        return one_hot_rows(run)
    if run.pool_attention is not None:
        return run.pool_attention.mean(dim=(1, 2))
    raise InputError(
        f"method {method!r} needs a {run.tower} tower that reads out a token or exposes its pooling attention"
    )


def head_mean_row(attn: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """row @ mean_h A: (rows, H, n, n), (rows, n) -> (rows, n), without forming mean_h A."""
    return torch.einsum("ri,rhij->rj", row, attn) / attn.shape[1]


@register
class RawAttention(Method):
    name = "raw_attention"
    summary = "the readout token's attention row of one block, mean over heads (no gradient; same map for every prompt)"
    reference = (
        "Abnar, Zuidema. Quantifying Attention Flow in Transformers. ACL 2020 (raw attention baseline)"
    )
    options = {"layer": "block whose attention is shown (default: the last; negative counts from the end)"}

    def compute(
        self,
        adapter: ModelAdapter,
        images: ImageBatch,
        texts: TextBatch,
        target: Target,
        *,
        towers: tuple[str, ...] = ("image", "text"),
        layer: int | None = None,
        **_,
    ) -> MethodResult:
        with adapter.explaining():
            fw = forward_pairs(adapter, images, texts, target, image_grad=False, text_grad=False)
        rows = {}
        for tower, run in (("image", fw.image), ("text", fw.text)):
            if tower in towers:
                n_layers = len(run.attentions)
                l = resolve_layer(layer, n_layers, n_layers - 1)
                rows[tower] = head_mean_row(run.attentions[l], readout_rows(self.name, run))
        B, P = fw.B, fw.P
        return MethodResult(
            image_maps=grid_maps(fw.image, rows["image"], B, P) if "image" in rows else None,
            token_scores=token_rows(fw.text, rows["text"], B, P) if "text" in rows else None,
            logits=fw.logits,
            probs=fw.probs,
            target_values=fw.y.detach(),
        )
