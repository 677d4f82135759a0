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

Each rule takes a block's probabilities, or a :class:`~cliplens.adapters.kept.KeptAttention`
whose probabilities it recomputes a chunk of query rows at a time (only the query rows the row
weighs: the last block's, the readout token's alone).

The bi-modal rules of the same paper (cross- and co-attention) join this module as further
entries, keyed by the kind of attention event.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..adapters.base import TowerRun
from ..adapters.kept import KeptAttention, in_graph, query_chunks
from ..errors import InputError


def gradient_weighted(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Abar = mean over heads of (grad * A)^+ : (..., H, q, n) -> (..., q, n) (leading axes
    broadcast: rows, or the (B, P) pairs of a shared run against its distinct inputs)."""
    return (grad * attn).clamp_(min=0).mean(dim=-3)


def row_times_abar(row: torch.Tensor, attn, grad: torch.Tensor) -> torch.Tensor:
    """``row @ Abar`` for (rows, n) readout rows and one block's attention: its probabilities
    and their gradient, or a :class:`~cliplens.adapters.kept.KeptAttention` and the gradient at
    its output, whose probabilities and gradient are recomputed a chunk of query rows at a time
    and reduced before the next (no H x n x n tensor of every row at once), for the query rows
    ``row`` weighs (the last block's fold reads the readout token's alone). Leading axes of
    ``attn`` broadcast against ``grad``'s, which flatten to the rows of ``row``."""
    if not isinstance(attn, KeptAttention):
        abar = gradient_weighted(attn, grad)
        return torch.bmm(row.unsqueeze(1), abar.reshape(-1, *abar.shape[-2:]).to(row.dtype)).squeeze(1)
    out = torch.zeros_like(row)
    for rows in query_chunks(attn, grad.shape[:-3].numel(), live=(row != 0).any(dim=0)):
        abar = gradient_weighted(attn.probs(rows, row.dtype), attn.grad(grad, rows, row.dtype))
        abar = abar.reshape(-1, *abar.shape[-2:])
        out += torch.bmm(row[:, None, rows], abar).squeeze(1)
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Relevance is accumulated in at least float32, whatever the model computes in (bfloat16
    and float16 rows would lose the small terms a fold adds)."""
    return torch.promote_types(dtype, torch.float32)


def one_hot_rows(run: TowerRun) -> torch.Tensor:
    """(rows, n) one-hot rows at each row's readout token."""
    rows = run.layout.readout.shape[0]
    n = run.layout.valid.shape[1]
    dtype = accumulation_dtype(run.block_outputs[-1].dtype if run.block_outputs else torch.float32)
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


def probability_chunks(attn, row: torch.Tensor) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]]:
    """(query rows, their probabilities (rows, H, q, n) in ``row``'s dtype) of one block's
    attention for (rows, n) rows ``row``: probabilities whole, or a
    :class:`~cliplens.adapters.kept.KeptAttention`'s recomputed a chunk of query rows at a time,
    for the query rows ``row`` weighs only."""
    if not isinstance(attn, KeptAttention):
        yield slice(None), attn.to(row.dtype)
        return
    for rows in query_chunks(attn, row.shape[0], live=(row != 0).any(dim=0)):
        yield rows, attn.probs(rows, row.dtype)


def head_mean_row(attn, row: torch.Tensor) -> torch.Tensor:
    """row @ mean_h A: (rows, H, n, n) probabilities (or a kept block), (rows, n) -> (rows, n),
    without forming mean_h A."""
    out = torch.zeros_like(row)
    for rows, probs in probability_chunks(attn, row):
        out += torch.einsum("ri,rhij->rj", row[:, rows], probs)
    return out / attn.shape[-3]


def rollout_step(attn, row: torch.Tensor) -> torch.Tensor:
    """row @ rownormalise(mean_h A + I), without forming the matrix: with s the row sums of
    ``mean_h A + I``, ``row @ Ahat = (row / s) @ mean_h A + row / s`` (a query row's sum comes
    with its own probabilities, so a kept block is read once)."""
    heads = attn.shape[-3]
    out = torch.zeros_like(row)
    for rows, probs in probability_chunks(attn, row):
        sums = probs.sum(dim=(1, 3)) / heads + 1.0  # (rows, q)
        scaled = row[:, rows] / sums
        out += torch.einsum("ri,rhij->rj", scaled, probs) / heads
        out[:, rows] += scaled
    return out


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
    arrive first in the backward pass (the head comes after every block).

    Fed by tensor hooks on a per-pair run's tensors (:meth:`hooked`, then one backward pass), or
    by :func:`~cliplens.methods.pairs.block_gradients` on a shared run (:meth:`pool`,
    :meth:`block`; ``pairs`` then turns the run's distinct rows into per-pair rows)."""

    def __init__(self, method: str, run: TowerRun, start: int, pairs=None):
        if not run.layout.has_readout_token and run.pool_attention is None:
            readout_rows(method, run)  # raises: the row has nowhere to start
        self.expected = self.last = len(run.attentions) - 1
        self.one_hot = run.layout.has_readout_token
        self.start = start
        self.handles: list = []
        self.row: torch.Tensor | None = None
        if run.layout.has_readout_token:
            self.row = one_hot_rows(run) if pairs is None else pairs(one_hot_rows(run))

    @classmethod
    def hooked(cls, method: str, run: TowerRun, start: int) -> "RowFold":
        """A fold fed by hooks on ``run``'s pooling attention and explained blocks' attention."""
        fold = cls(method, run, start)
        if not run.layout.has_readout_token:
            pool = run.pool_attention
            fold.handles.append(pool.register_hook(lambda grad: fold.pool(pool.detach(), grad)))
        for layer, attn in enumerate(run.attentions):
            if layer >= start:
                fold.handles.append(
                    in_graph(attn).register_hook(lambda grad, l=layer, a=attn: fold.block(l, a.detach(), grad))
                )
        return fold

    def pool(self, probs: torch.Tensor, grad: torch.Tensor) -> None:
        """The pooling head's probabilities and their gradient: the starting row."""
        weighted = gradient_weighted(probs, grad).sum(dim=-2)
        self.row = weighted.reshape(-1, weighted.shape[-1]).to(accumulation_dtype(grad.dtype))

    def block(self, layer: int, probs: torch.Tensor, grad: torch.Tensor) -> None:
        """Block ``layer``'s attention probabilities and their gradient: one fold."""
        if layer != self.expected:
            raise RuntimeError(f"attention gradients arrived out of order (block {layer}, expected {self.expected})")
        self.expected -= 1
        if self.row is None:
            raise RuntimeError("the pooling attention's gradient did not arrive before the blocks'")
        self.row = self.row + row_times_abar(self.row, probs, grad)

    def readout_block(self, layer: int, abar_row: torch.Tensor) -> None:
        """The last block's fold from the readout token's row of its Abar alone, ``abar_row``
        (rows, n): the row is still one-hot there, so ``r @ Abar`` is that row."""
        if layer != self.expected or layer != self.last or not self.one_hot:
            raise RuntimeError("a readout row alone folds only the last block of a tower that reads out a token")
        self.expected -= 1
        self.row = self.row + abar_row.to(self.row.dtype)

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


# ---- the bi-modal and encoder-decoder rules (Chefer et al. 2021, rules 6-11) --------------------

#: what a row of ``R - I`` that sums to zero gives in the cross-attention rule's normalisation:
#: "identity" (cliplens): that row of Rbar is e_i and the row is counted; "reference": 0/0 as
#: the reference code computes it, NaN, and the NaN entries of the cross term set to 0 as its
#: DETR generator does (which drops the layer's whole cross term, the NaN spreading through the
#: transpose)
DEGENERATE_POLICIES = ("identity", "reference")


def residual_normalised(R: torch.Tensor, policy: str, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Rbar = (R - I) / rowsum(R - I) + I`` for (rows, n, n) matrices, and (rows,) the number
    of rows of ``R - I`` that sum to zero (0/0, resolved by ``policy``). Padding tokens
    (``valid`` False) are not part of the sequence: their rows of Rbar are e_i under either
    policy and are not counted (a batch-of-one reference run has no padding)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    hat = R - eye
    sums = hat.sum(dim=-1, keepdim=True)
    zero = (sums == 0) & valid[:, :, None]
    # rows left as e_i: padding always; the 0/0 rows too unless the reference's NaN is asked for
    keep = ~valid[:, :, None] if policy == "reference" else ~valid[:, :, None] | zero
    normalised = torch.where(keep, torch.zeros_like(hat), hat / torch.where(keep, torch.ones_like(sums), sums))
    return normalised + eye, zero.squeeze(-1).sum(dim=-1)


class StreamRelevance:
    """The relevance matrices between every ordered pair of token streams, for N rows at once:
    ``R[s, s]`` start as identities, ``R[s, q]`` (s != q) as zeros, and every attention event
    updates them in execution order:

    - self-attention on s, ``Abar`` (n_s x n_s): ``R[s, x] += Abar R[s, x]`` for every stream x;
    - cross-attention from s (queries) to q (keys), ``Abar`` (n_s x n_q):
      ``R[s, q] += Rbar[s, s]^T Abar Rbar[q, q]`` and ``R[s, s] += Abar R[q, s]`` (zero unless
      q has already attended to s: co-attention);
    - events that share a step are computed from the same state, then added.

    Full matrices: O(n^3) per event and row; the rules' transpose and row sums need them."""

    def __init__(self, valid: dict[str, torch.Tensor], dtype: torch.dtype, policy: str = "identity"):
        """``valid``: stream name -> (rows, n) bool, the real (non-padding) tokens."""
        if policy not in DEGENERATE_POLICIES:
            raise InputError(f"degenerate_rows must be one of {', '.join(DEGENERATE_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.valid = valid
        self.R: dict[tuple[str, str], torch.Tensor] = {}
        for s, vs in valid.items():
            for q, vq in valid.items():
                rows, ns, nq, device = vs.shape[0], vs.shape[1], vq.shape[1], vs.device
                m = torch.zeros(rows, ns, nq, dtype=dtype, device=device)
                if s == q:
                    m += torch.eye(ns, dtype=dtype, device=device)
                self.R[s, q] = m
        self.streams = list(valid)
        rows = next(iter(valid.values())).shape[0]
        device = next(iter(valid.values())).device
        #: (rows,) rows of R - I that summed to zero in a cross rule's normalisation
        self.degenerate = torch.zeros(rows, dtype=torch.long, device=device)

    def additions(self, kind: str, s: str, q: str, abar: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """What one event adds to the matrices, from the current state."""
        if kind == "self":
            return {(s, x): abar @ self.R[s, x] for x in self.streams}
        if kind != "cross":
            raise ValueError(f"unknown attention event kind {kind!r}")
        bar_s, deg_s = residual_normalised(self.R[s, s], self.policy, self.valid[s])
        bar_q, deg_q = residual_normalised(self.R[q, q], self.policy, self.valid[q])
        self.degenerate += deg_s + deg_q
        cross = bar_s.transpose(1, 2) @ abar @ bar_q
        if self.policy == "reference":
            cross = torch.nan_to_num(cross, nan=0.0)
        return {(s, q): cross, (s, s): abar @ self.R[q, s]}

    def apply(self, step: list[tuple[str, str, str, torch.Tensor]]) -> None:
        """Events ``(kind, query stream, key stream, Abar)`` of one step: all computed from the
        state before the step, then added."""
        total: dict[tuple[str, str], torch.Tensor] = {}
        for kind, s, q, abar in step:
            for key, value in self.additions(kind, s, q, abar.to(self.R[s, s].dtype)).items():
                total[key] = total[key] + value if key in total else value
        for key, value in total.items():
            self.R[key] = self.R[key] + value

    def row(self, readout: str, weights: torch.Tensor, stream: str) -> torch.Tensor:
        """(rows, n_stream): the readout's row of ``R[readout, stream]``, ``weights`` (rows, n)
        over the readout stream's tokens (one-hot at a readout token, or an average)."""
        m = self.R[readout, stream]
        return torch.einsum("rn,rnm->rm", weights.to(m.dtype), m)
