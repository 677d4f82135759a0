"""Explained blocks on the fused attention kernel: their attention kept as what it is made of.

The fused kernel (``torch.nn.functional.scaled_dot_product_attention``) never writes a block's
H x n x n probabilities, and its backward pass recomputes them a tile at a time: at 896 px a
ViT-B/16 block's probabilities and their gradient are 472 MB each, and the eager path that
returns them takes most of an explanation's time. A method that reads a block's attention only
as ``probabilities x their gradient`` (Chefer's Abar) does not need them whole:

- the block runs fused and keeps its (detached) queries, keys and values, its mask and the
  kernel's output ``O = A V`` (per head, before the output projection), which stays in the graph;
- a backward pass asked for the gradient at ``O`` gives ``dy/dA = dO V^T``;
- :meth:`KeptAttention.probs` and :meth:`KeptAttention.grad` then recompute A and dy/dA for a
  chunk of query rows at a time, which the method reduces before the next chunk.

:class:`KeptAttention` stands where a run keeps a block's probabilities (``TowerRun.
attentions[l]``), so every consumer says which it reads: :func:`in_graph` is the tensor a
gradient is taken at, :func:`query_chunks` the row chunks to reduce.

:class:`AttentionReads` tells a tower run which blocks keep their attention at all, and as
what (``kept``: a :class:`KeptAttention`); a tower whose attention cannot run fused keeps
probabilities instead, and the consumers take either. The blocks no method reads run the fused
kernel and keep nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: how many elements one chunk of recomputed probabilities (and their gradient) may hold, over
#: all its pairs and heads: 2^22 (16 MB in float32). Chunks that stay in cache matter on a CPU:
#: at 896 px (ViT-B/16, one pair) a block's fold takes 0.27 s in chunks of 111 query rows and
#: 0.81 s in chunks of 445 (2^24)
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class KeptAttention:
    """A block's attention run on the fused kernel, kept as its inputs and output.

    query, key, value: (rows, H, n, d), detached (leading axes may be more than one: a shared
                       run's distinct rows made broadcastable against its pairs).
    mask:   additive mask broadcastable against the (rows, H, n, n) scores, or None.
    scale:  the factor on ``q k^T``.
    causal: keys after the query are masked (a causal kernel call without a mask).
    output: (rows, H, n, d) ``A V``, in the graph while the run's graph lives; None where the
            tower stopped in this block (:class:`ReadoutStop`): it was never computed."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    causal: bool
    output: torch.Tensor | None

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def shape(self) -> torch.Size:
        """The probabilities' shape, (rows, H, n, n)."""
        return torch.Size((*self.query.shape[:-1], self.key.shape[-2]))

    def detach(self) -> "KeptAttention":
        return self._map(lambda t: t, output=None if self.output is None else self.output.detach())

    def __getitem__(self, index) -> "KeptAttention":
        """Index the leading (row) axes of every tensor alike, e.g. ``kept[:, None]``."""
        return self._map(lambda t: t[index], output=None if self.output is None else self.output[index])

    def _map(
        self, fn: Callable[[torch.Tensor], torch.Tensor], output: torch.Tensor | None
    ) -> "KeptAttention":
        mask = self.mask
        if mask is not None:
            # a mask shared by every row (leading axis 1) gets the same new axes
            mask = fn(mask) if mask.dim() == self.query.dim() else mask
        return KeptAttention(fn(self.query), fn(self.key), fn(self.value), mask, self.scale, self.causal, output)

    def probs(self, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., H, len(rows), n) the probabilities of query rows ``rows`` (a slice or an index
        tensor), in ``dtype``."""
        q = self.query[..., rows, :].to(dtype)
        scores = (q * self.scale) @ self.key.to(dtype).transpose(-1, -2)
        if self.mask is not None:
            mask = self.mask[..., rows, :] if self.mask.shape[-2] > 1 else self.mask
            scores = scores + mask.to(dtype)
        if self.causal:
            n = self.key.shape[-2]
            later = torch.arange(n, device=q.device)[None, :] > torch.arange(n, device=q.device)[rows, None]
            scores = scores.masked_fill(later, float("-inf"))
        return scores.softmax(dim=-1)

    def grad(self, d_output: torch.Tensor, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., H, len(rows), n) dy/dA at query rows ``rows``, from ``d_output`` = dy/dO
        (..., H, n, d) (its leading axes broadcast against the kept tensors')."""
        return d_output[..., rows, :].to(dtype) @ self.value.to(dtype).transpose(-1, -2)


class ReadoutStop(Exception):
    """Raised inside a block's attention on the ``"readout"`` path, once its queries, keys and
    values are computed: carries the block's :class:`KeptAttention` (output None) out of the
    tower's forward, which goes no further (see :func:`~cliplens.adapters.base.forward_or_readout`)."""

    def __init__(self, kept: KeptAttention):
        super().__init__("the tower stopped at its last block's readout row")
        self.kept = kept


@dataclass(frozen=True)
class AttentionReads:
    """Which blocks of a tower run keep their attention for the method, and as what.

    blocks: the blocks whose attention the method reads (None: every block).
    kept:   it reads them through a :class:`KeptAttention` (the fused kernel) rather than as
            probabilities.
    readout_block: the tower's last block, where the method reads that block only at the
            readout token's row (its attention there, and the embedding): where the block runs
            kept, the tower stops in its attention (:class:`ReadoutStop`) and its embedding is
            finished from that row. None: every block runs whole.

    A block the method does not read, or one before a fan-out (no graph, no method reads it),
    runs the fused kernel and keeps None in ``TowerRun.attentions``: at 896 px a ViT-B/16
    block's probabilities are 472 MB, and a run that keeps every block's holds 5.7 GB."""

    blocks: frozenset[int] | None = None
    kept: bool = False
    readout_block: int | None = None

    def keeps(self, index: int, fan_out=None) -> bool:
        """Whether block ``index`` keeps its attention (``fan_out``: a
        :class:`~cliplens.adapters.base.FanOut` or None)."""
        if fan_out is not None and index < fan_out.block:
            return False
        return self.blocks is None or index in self.blocks

    def runs_kept(self, dtype: torch.dtype) -> bool:
        """Whether the blocks it keeps run fused and keep :class:`KeptAttention`: when asked,
        except in float64. float64 stays eager: transformers' eager softmax runs in float32 where
        the fused kernel runs in float64, and float64 runs (the oracles, the golden files) read
        the eager blocks."""
        return self.kept and dtype != torch.float64

    def path(self, index: int, fan_out, dtype: torch.dtype) -> str:
        """How block ``index`` computes its attention: ``"eager"`` (probabilities returned),
        ``"fused"`` (the kernel; nothing kept), ``"kept"``, or ``"readout"`` (kept, and the
        tower stops there: :class:`ReadoutStop`). float64 runs never fuse (see
        :meth:`runs_kept`)."""
        if not self.keeps(index, fan_out):
            return "eager" if dtype == torch.float64 else "fused"
        if not self.runs_kept(dtype):
            return "eager"
        return "readout" if index == self.readout_block else "kept"


#: every block keeps its probabilities (what a run does unless told otherwise)
EVERY_BLOCK = AttentionReads()
#: no block keeps anything (a run for its embeddings only)
NO_BLOCK = AttentionReads(frozenset())


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as a term added to the scores: a boolean one (True = masked, as
    ``nn.MultiheadAttention`` reads it) as -inf where True and 0 elsewhere."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def in_graph(attention) -> torch.Tensor:
    """The tensor a block's attention gradient is taken at: the probabilities themselves, or a
    :class:`KeptAttention`'s output."""
    return attention.output if isinstance(attention, KeptAttention) else attention


def query_rows(attention, index: torch.Tensor) -> torch.Tensor:
    """(rows, H, n): each row's attention probabilities at its own query position ``index[row]``
    (a readout token), from a block's probabilities (rows, H, n, n) or a :class:`KeptAttention`,
    whose probabilities are recomputed at those query positions alone."""
    rows = torch.arange(index.shape[0], device=index.device)
    if not isinstance(attention, KeptAttention):
        return attention[rows, :, index]
    positions, where = index.unique(return_inverse=True)
    return attention.probs(positions, attention.dtype)[rows, :, where]


def query_chunks(kept: KeptAttention, lead: int, live: torch.Tensor | None = None) -> Iterator[slice | torch.Tensor]:
    """Query rows in chunks whose probabilities for ``lead`` pairs (or rows) x H heads fit
    :data:`CHUNK_ELEMENTS`: slices, or with ``live`` ((n,) bool) index tensors of the live rows
    only (slices again when every row is live)."""
    *_, heads, n, _ = kept.query.shape
    per_row = max(1, lead * heads * kept.key.shape[-2])
    step = max(1, CHUNK_ELEMENTS // per_row)
    if live is not None and not bool(live.all()):
        rows = live.nonzero().squeeze(1)
        for start in range(0, rows.numel(), step):
            yield rows[start : start + step]
        return
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def fused_attention_kept(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool = False,
    stop: bool = False,
) -> tuple[torch.Tensor, KeptAttention]:
    """``(A V, kept)`` for (rows, H, n, d) queries, keys and values on the fused kernel; ``mask``
    additive (or None). ``A V`` is (rows, H, n, d) and is the kept output itself. ``stop``: the
    ``"readout"`` path; nothing is computed, :class:`ReadoutStop` is raised with the kept inputs."""
    if mask is not None and mask.dtype == torch.bool:
        raise TypeError("fused_attention_kept takes an additive mask")
    if stop:
        kept = KeptAttention(query.detach(), key.detach(), value.detach(), mask, scale, causal, None)
        raise ReadoutStop(kept)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=None if mask is None else mask.to(query.dtype), scale=scale, is_causal=causal
    )
    kept = KeptAttention(query.detach(), key.detach(), value.detach(), mask, scale, causal, out)
    return out, kept


def transformers_kept_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, stop: bool = False, **kwargs
):
    """A transformers attention function (the ``AttentionInterface`` signature): the block on
    the fused kernel, returning ``(output (rows, n, H, d), KeptAttention)`` where the eager path
    returns its probabilities (``stop``: raising :class:`ReadoutStop` instead)."""
    if dropout:
        raise RuntimeError("kept attention runs in eval mode only")
    n = query.shape[-2]
    causal = attention_mask is None and bool(getattr(module, "is_causal", False)) and n > 1
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
        if attention_mask.dtype == torch.bool:  # True = attend, as the SDPA mask path reads it
            attention_mask = additive_mask(~attention_mask, query.dtype)
    scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    out, kept = fused_attention_kept(query, key, value, attention_mask, scale, causal, stop)
    return out.transpose(1, 2).contiguous(), kept


def transformers_readout_attention(module, query, key, value, attention_mask, **kwargs):
    """:func:`transformers_kept_attention` on the ``"readout"`` path: raises :class:`ReadoutStop`."""
    return transformers_kept_attention(module, query, key, value, attention_mask, stop=True, **kwargs)


def readout_heads(attention: KeptAttention, index: torch.Tensor) -> torch.Tensor:
    """(rows, H, d) each row's attention output at its readout position ``index[row]``, per head
    (before the output projection): ``A_r V``, from the kept queries, keys and values (in their
    graph, where they are in one)."""
    return (query_rows(attention, index).unsqueeze(-2) @ attention.value).squeeze(-2)
