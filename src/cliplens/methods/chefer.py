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

import torch

from ..adapters.base import ImageBatch, ModelAdapter, TextBatch, TowerRun
from ..engine import forward_pairs
from ..targets import Target
from .base import (
    Method,
    MethodResult,
    grid_maps,
    one_hot_rows,
    register,
    require_readout_token,
    resolve_layer,
    token_rows,
)


def gradient_weighted(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Abar = mean over heads of (grad * A)^+ : (rows, H, n, n) -> (rows, n, n)."""
    return (grad * attn).clamp(min=0).mean(dim=1)


class RowFold:
    """Folds ``r <- r + r @ Abar^l`` into the backward pass as each block's attention
    gradient arrives (last block first), for blocks ``l >= start``.

    The row starts at the readout token (one-hot); for a tower that pools with an attention
    head (SigLIP's MAP head: no readout token) it starts at the head's gradient-weighted
    probabilities, ``r = sum_q mean_h (dy/dA_pool * A_pool)^+`` over its query rows, which
    arrive first in the backward pass (the head comes after every block)."""

    def __init__(self, run: TowerRun, start: int):
        self.expected = len(run.attentions) - 1
        self.start = start
        self.handles = []
        if run.layout.has_readout_token:
            self.row: torch.Tensor | None = one_hot_rows(run)
        else:
            self.row = None
            pool = run.pool_attention
            self.handles.append(pool.register_hook(self._pool_hook(pool)))
        self.handles += [
            attn.register_hook(self._hook(l, attn)) for l, attn in enumerate(run.attentions) if l >= start
        ]

    def _pool_hook(self, pool: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            self.row = gradient_weighted(pool.detach(), grad).sum(dim=1)

        return hook

    def _hook(self, layer: int, attn: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            if layer != self.expected:
                raise RuntimeError(f"attention gradients arrived out of order (block {layer}, expected {self.expected})")
            self.expected -= 1
            if self.row is None:
                raise RuntimeError("the pooling attention's gradient did not arrive before the blocks'")
            abar = gradient_weighted(attn.detach(), grad)
            self.row = self.row + torch.bmm(self.row.unsqueeze(1), abar).squeeze(1)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def done(self) -> torch.Tensor:
        self.remove()
        if self.expected >= self.start or self.row is None:
            raise RuntimeError("the backward pass did not reach every explained block")
        return self.row


@register
class Chefer(Method):
    name = "chefer"
    summary = "gradient-weighted attention relevance, Chefer et al. 2021 (image map and token scores)"
    reference = "Chefer, Gur, Wolf. Generic Attention-model Explainability... ICCV 2021"
    options = {"start_layer": "first block to include (default: the last block; 0 = all; negative counts from the end)"}

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
            fw = forward_pairs(
                adapter, images, texts, target, image_grad="image" in towers, text_grad="text" in towers
            )
            folds: dict[str, RowFold] = {}
            try:
                for name, run in (("image", fw.image), ("text", fw.text)):
                    if name in towers:
                        if run.pool_attention is None:  # pooled towers start from the pooling head
                            require_readout_token(self.name, run)
                        n_layers = len(run.attentions)
                        folds[name] = RowFold(run, resolve_layer(start_layer, n_layers, n_layers - 1))
                fw.backward()
                rows = {name: fold.done().detach() for name, fold in folds.items()}
            finally:
                for fold in folds.values():
                    fold.remove()
        B, P = fw.B, fw.P
        return MethodResult(
            image_maps=grid_maps(fw.image, rows["image"], B, P) if "image" in rows else None,
            token_scores=token_rows(fw.text, rows["text"], B, P) if "text" in rows else None,
            logits=fw.logits,
            probs=fw.probs,
            target_values=fw.y.detach(),
        )
