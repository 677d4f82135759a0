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

Cost: one forward of each tower over the B images and P prompts (eager attention), no
backward, no B*P replication; O(H n^2) per block.
"""

from __future__ import annotations

import torch

from ..adapters.base import ImageBatch, ModelAdapter, TextBatch, TowerRun
from ..engine import forward_pairs
from ..targets import Target
from .base import Method, MethodResult, grid_maps, register, resolve_layer, token_rows
from .raw_attention import readout_rows


def rollout_row(run: TowerRun, row: torch.Tensor, start: int) -> torch.Tensor:
    """row @ Ahat^{L-1} @ ... @ Ahat^{start}: (rows, n) -> (rows, n)."""
    for attn in reversed(run.attentions[start:]):
        H = attn.shape[1]
        sums = attn.sum(dim=(1, 3)) / H + 1.0  # (rows, n): row sums of mean_h A + I
        scaled = row / sums
        row = torch.einsum("ri,rhij->rj", scaled, attn) / H + scaled
    return row


@register
class Rollout(Method):
    name = "rollout"
    summary = "attention rollout, Abnar & Zuidema 2020 (no gradient; same map for every prompt)"
    reference = "Abnar, Zuidema. Quantifying Attention Flow in Transformers. ACL 2020"
    options = {"start_layer": "first block to include (default 0 = all blocks; negative counts from the end)"}

    def compute(
        self,
        adapter: ModelAdapter,
        images: ImageBatch,
        texts: TextBatch,
        target: Target,
        *,
        towers: tuple[str, ...] = ("image", "text"),
        start_layer: int | None = None,
        **_,
    ) -> MethodResult:
        with adapter.explaining():
            fw = forward_pairs(adapter, images, texts, target, image_grad=False, text_grad=False)
        rows = {}
        for tower, run in (("image", fw.image), ("text", fw.text)):
            if tower in towers:
                start = resolve_layer(start_layer, len(run.attentions), 0)
                rows[tower] = rollout_row(run, readout_rows(self.name, run), start)
        B, P = fw.B, fw.P
        return MethodResult(
            image_maps=grid_maps(fw.image, rows["image"], B, P) if "image" in rows else None,
            token_scores=token_rows(fw.text, rows["text"], B, P) if "text" in rows else None,
            logits=fw.logits,
            probs=fw.probs,
            target_values=fw.y.detach(),
        )
