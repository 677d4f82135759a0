"""Propagating a readout row through attention: the relevance rules the methods share.

Every rule works on the readout token's ROW of a relevance matrix, never on n x n products:
``row @ M`` costs O(H n^2) per block where forming M costs O(n^3).

- :func:`gradient_weighted`: Chefer's ``Abar = mean_h (dy/dA * A)^+`` of one attention event.
- :class:`RowFold`: the self-attention rule ``R <- R + Abar R`` (Chefer et al. 2021), applied to
  the readout row as each block's attention gradient arrives in the backward pass.
- :func:`rollout_row`: attention rollout, ``row <- row @ rownormalise(mean_h A + I)``.
- :func:`head_mean_row`: ``row @ mean_h A`` (raw attention).
- :func:`readout_rows`: where a row starts: one-hot at the readout token, or the pooling head's
  attention for towers that pool with one.

The bi-modal rules of the same paper (cross- and co-attention) join this module as further
entries, keyed by the kind of attention event.
"""

from __future__ import annotations

import torch

from ..adapters.base import TowerRun
from ..errors import InputError


def gradient_weighted(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Abar = mean over heads of (grad * A)^+ : (rows, H, q, n) -> (rows, q, n)."""
    return (grad * attn).clamp(min=0).mean(dim=1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Relevance is accumulated in at least float32, whatever the model computes in (bfloat16
    and float16 rows would lose the small terms a fold adds)."""
    return torch.promote_types(dtype, torch.float32)


def one_hot_rows(run: TowerRun) -> torch.Tensor:
    """(rows, n) one-hot rows at each row's readout token."""
    rows = run.layout.readout.shape[0]
    n = run.layout.valid.shape[1]
    dtype = accumulation_dtype(run.attentions[-1].dtype if run.attentions else torch.float32)
    out = torch.zeros(rows, n, dtype=dtype, device=run.layout.readout.device)
    out[torch.arange(rows), run.layout.readout] = 1.0
    return out


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


def rollout_step(attn: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """row @ rownormalise(mean_h A + I), without forming the matrix: with s the row sums of
    ``mean_h A + I``, ``row @ Ahat = (row / s) @ mean_h A + row / s``."""
    sums = attn.sum(dim=(1, 3)) / attn.shape[1] + 1.0  # (rows, n)
    scaled = row / sums
    return head_mean_row(attn, scaled) + scaled


def rollout_row(run: TowerRun, row: torch.Tensor, start: int) -> torch.Tensor:
    """row @ Ahat^{L-1} @ ... @ Ahat^{start}: (rows, n) -> (rows, n)."""
    for attn in reversed(run.attentions[start:]):
        row = rollout_step(attn, row)
    return row


class RowFold:
    """Folds ``r <- r + r @ Abar^l`` into the backward pass as each block's attention
    gradient arrives (last block first), for blocks ``l >= start``.

    The row starts at the readout token (one-hot); for a tower that pools with an attention
    head (SigLIP's MAP head: no readout token) it starts at the head's gradient-weighted
    probabilities, ``r = sum_q mean_h (dy/dA_pool * A_pool)^+`` over its query rows, which
    arrive first in the backward pass (the head comes after every block)."""

    def __init__(self, method: str, run: TowerRun, start: int):
        if not run.layout.has_readout_token and run.pool_attention is None:
            readout_rows(method, run)  # raises: the row has nowhere to start
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
            self.row = gradient_weighted(pool.detach(), grad).sum(dim=1).to(accumulation_dtype(grad.dtype))

        return hook

    def _hook(self, layer: int, attn: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            if layer != self.expected:
                raise RuntimeError(f"attention gradients arrived out of order (block {layer}, expected {self.expected})")
            self.expected -= 1
            if self.row is None:
                raise RuntimeError("the pooling attention's gradient did not arrive before the blocks'")
            abar = gradient_weighted(attn.detach(), grad).to(self.row.dtype)
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


def reduced_gradients(output: torch.Tensor, tensors: list[torch.Tensor], reduce, through: list[torch.Tensor]) -> list:
    """``reduce(i, d output / d tensors[i])`` for every tensor, from ONE backward pass, each
    gradient reduced by a hook the moment it is computed and then dropped: never all of them
    held at once (an attention gradient is rows x H x n x n). ``through``: leaves behind the
    tensors that the backward runs to (the block inputs). A tensor the output does not reach
    gives None."""
    out: list = [None] * len(tensors)

    def keep(i):
        def hook(grad: torch.Tensor) -> None:
            out[i] = reduce(i, grad.detach())

        return hook

    handles = [t.register_hook(keep(i)) for i, t in enumerate(tensors)]
    try:
        torch.autograd.grad(output, through, allow_unused=True, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return out
