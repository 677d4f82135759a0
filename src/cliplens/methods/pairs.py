"""One forward pass of each tower over all (image, prompt) pairs, for the methods to use.

Layout: pair (b, p) is row ``b*P + p``. When a method needs gradients on a tower, that tower
runs once over the B*P rows (image b repeated for each prompt, prompt p repeated for each
image), so a single backward pass of ``y.sum()`` hands every pair its own gradient: rows of a
batch never mix in a transformer (no batch statistics). A tower that needs no gradient runs
on its B (or P) distinct inputs only, without building a graph.

A method that declares ``shared_graph`` instead has each gradient tower run ONCE over its
distinct inputs with a graph, and takes the pairs' gradients through that one graph with
:func:`block_gradients`: the P (or B) per-pair cotangents as one batched vector-Jacobian product
per block. The forward is then paid once, and activation memory grows with B (or P), not B*P.

The helpers below turn per-row tower values back into per-pair results (B, P, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..adapters.base import (
    FanOut,
    ImageBatch,
    ModelAdapter,
    TextBatch,
    TowerRun,
    against_pairs,
    readout_row_embeds,
    swap_pairs,
)
from ..adapters.kept import EVERY_BLOCK, AttentionReads, KeptAttention, in_graph, readout_heads
from ..targets import PairContext, PairScores, Target
from .relevance import accumulation_dtype


@dataclass
class PairRuns:
    """Both towers' runs for B images x P prompts and the explained scalars."""

    B: int
    P: int
    image: TowerRun  # B*P rows if image_per_pair else B rows
    text: TowerRun  # B*P rows if text_per_pair else P rows
    y: torch.Tensor  # (B, P) the explained scalars, live
    logits: torch.Tensor  # (B, P) detached
    probs: torch.Tensor  # (B, P) detached
    image_per_pair: bool
    text_per_pair: bool
    scores: PairScores
    images: ImageBatch  # the inputs, for a method that runs a tower again
    texts: TextBatch
    #: towers run once over their distinct inputs with a graph (``shared``): (B, P, D) per-pair
    #: copies of their embeddings, the leaves ``y`` was evaluated on
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    _cotangents: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def run(self, tower: str) -> TowerRun:
        return self.image if tower == "image" else self.text

    def per_pair(self, tower: str) -> bool:
        return self.image_per_pair if tower == "image" else self.text_per_pair

    def grad_inputs(self) -> list[torch.Tensor]:
        """Where a backward pass ends, for each tower that runs per pair: the per-pair leaf its
        run fanned out at (:class:`FanOut`), else its embedding input."""
        out = []
        for tower in ("image", "text"):
            if self.per_pair(tower):
                run = self.run(tower)
                out.append(run.graph_input if run.graph_input is not None else run.input_embeds)
        return out

    def backward(self) -> list[torch.Tensor]:
        """One backward pass of sum(y); returns gradients w.r.t. :meth:`grad_inputs`.
        Tensor hooks registered on captured tensors fire during it."""
        if self.leaves:
            raise RuntimeError("a shared-graph run takes its pairs' gradients through block_gradients or pair_gradients")
        inputs = self.grad_inputs()
        if not inputs:
            return []
        return list(torch.autograd.grad(self.y.sum(), inputs))

    def constant(self, tower: str) -> torch.Tensor:
        """(B, P, D) the final embeddings of ``tower`` for every pair, detached."""
        e = self.run(tower).embeds.detach()
        if self.per_pair(tower):
            return per_pair(e, self.B, self.P)
        return e[:, None].expand(self.B, self.P, -1) if tower == "image" else e[None].expand(self.B, self.P, -1)

    def context_with(self, tower: str, embeds: torch.Tensor) -> PairContext:
        """A target context in which ``tower``'s per-pair embeddings (B, P, D) are replaced by
        ``embeds`` (live) and the other tower's are its final embeddings, held constant."""
        if tower == "image":
            return PairContext.of(embeds, self.constant("text"), self.scores)
        return PairContext.of(self.constant("image"), embeds, self.scores)


    # ---- shared runs: one graph per tower, batched per-pair gradients -------------------
    def cotangents(self, tower: str) -> torch.Tensor:
        """A shared tower's per-pair gradients at its embedding, as a batch of cotangents for
        its one graph: (P, B, D) for the image tower (per prompt, a vector for each of the B
        images), (B, P, D) for the text tower. ``dy[b, p] / d(copy (b, p))``: every pair's
        scalar reads its own copies (other prompts enter as constants, see
        :mod:`cliplens.targets`). Both towers' are computed at once, the first time."""
        if self._cotangents is None:
            towers = list(self.leaves)
            grads = torch.autograd.grad(self.y.sum(), [self.leaves[t] for t in towers], allow_unused=True)
            self._cotangents = {
                t: self.batched(t, torch.zeros_like(self.leaves[t]) if g is None else g) for t, g in zip(towers, grads)
            }
        return self._cotangents[tower]

    def pair_gradients(self, wrt: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Every pair's gradient of its scalar w.r.t. tensors of each tower's run (tower ->
        tensors), each (B, P, *tensor.shape[1:]), zeros where the scalar does not reach it: a
        shared tower's by one batched vector-Jacobian product over its graph, the per-pair
        towers' by one backward pass of ``sum(y)`` for all of them."""
        out: dict[str, list[torch.Tensor]] = {}
        rows = [(t, x) for t, xs in wrt.items() if t not in self.leaves for x in xs]
        if rows:
            got = torch.autograd.grad(self.y.sum(), [x for _, x in rows], allow_unused=True)
            for (t, x), g in zip(rows, got):
                out.setdefault(t, []).append(per_pair(torch.zeros_like(x) if g is None else g, self.B, self.P))
        for t, xs in wrt.items():
            if t in self.leaves:
                got = batched_vjp(self.run(t).embeds, xs, self.cotangents(t), allow_unused=True)
                k = self.P if t == "image" else self.B  # the batch of cotangents
                out[t] = [self.batched(t, x.new_zeros(k, *x.shape) if g is None else g) for x, g in zip(xs, got)]
        return out

    def pair_values(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """(B, P, ...) a view of ``tower``'s per-row values ``x`` for every pair (per-pair rows
        reshaped, or a shared run's distinct rows expanded; ``.reshape(B * P, ...)`` gives the
        rows b*P + p)."""
        if tower in self.leaves or not self.per_pair(tower):
            return self.distinct(tower, x).expand(self.B, self.P, *x.shape[1:])
        return per_pair(x, self.B, self.P)

    def batched(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """(B, P, ...) per pair <-> (K, rows, ...): :func:`~cliplens.adapters.base.swap_pairs`."""
        return swap_pairs(tower, x)

    def distinct(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """(rows, ...) values of a shared tower's distinct inputs, broadcastable against (B, P, ...)."""
        return against_pairs(tower, x)


def block_gradients(
    runs: PairRuns,
    tower: str,
    start: int,
    head: list[torch.Tensor] | None = None,
    entering_last: torch.Tensor | None = None,
) -> Iterator[tuple[int | None, torch.Tensor, torch.Tensor]]:
    """Every pair's gradient of its scalar w.r.t. a shared tower's ``head`` tensors (between
    the last block and the embedding, e.g. a pooling head's attention) and then w.r.t. the
    attention probabilities of its blocks, from the last block down to ``start``
    (:func:`batched_block_vjps` over the tower's one graph). ``entering_last``: (B, P, n, C)
    the pairs' gradients at the last block's input, taken already (through its readout row,
    :func:`readout_input_gradients`): the products then start at the block below it.

    Yields ``(layer, probs, grad)``: layer None for a head tensor; ``probs`` the tensor's
    values (rows, ...) made broadcastable against ``grad`` (B, P, ...) per pair."""
    run = runs.run(tower)
    head = list(head or [])
    if entering_last is not None:
        below = len(run.attentions) - 2  # its output is the last block's input
        taps = {below: [(run.block_outputs[below], runs.batched(tower, entering_last))]}
        vjps = stack_vjps(run.block_outputs[: below + 1], run.attentions, start, taps)
    else:
        vjps = batched_block_vjps(run.embeds, runs.cotangents(tower), run.block_outputs, run.attentions, start, head)
    for layer, grad in vjps:
        tensor = head[-1 - layer] if layer < 0 else run.attentions[layer]
        yield (None if layer < 0 else layer), runs.distinct(tower, tensor.detach()), runs.batched(tower, grad)


def readout_attention_gradients(
    adapter: ModelAdapter,
    runs: PairRuns,
    tower: str,
    layer: int = -1,
    cotangents: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """(B, P, H, n) every pair's gradient of its scalar at the last block's attention
    probabilities, readout token's query row, taken through that row alone; None where this
    short way does not apply (then the gradient comes through the whole block, e.g. from
    :func:`block_gradients`).

    A tower that reads its embedding out of one token reads its last block only at that
    token's row: the block's other rows feed nothing after it. The embedding is then
    ``head(z + mlp(z))`` with ``z = x + attention_output(O_r)``, x the readout token's row of
    the block's input and O_r = A_r V its attention output's row (per head, before the output
    projection; :func:`~cliplens.adapters.base.readout_row_embeds`), and every pair's gradient
    at O_r is a batched vector-Jacobian product over that one row per input: rows x C where the
    whole block's is rows x n x C. ``dy/dA_r = dO_r V^T``. At P = 32 (ViT-B/16, 224 px) the whole block's
    product was half of a chefer explanation.

    ``layer`` and ``cotangents`` (K, rows, D): the same for block ``layer`` read out at its
    readout row as if it were the last (legrad's layer readouts), from the pairs' gradients at
    that readout; by default the last block and the tower's own embedding's
    (:meth:`PairRuns.cotangents`).

    Applies where :func:`readout_row_applies`."""
    if not readout_row_applies(adapter, runs, tower, layer):
        return None
    run, layer, attn, readout, rows = _block_row(runs, tower, layer)
    # from the kept queries, keys and values: a tower that stopped in this block (the
    # "readout" path of AttentionReads) never computed its output
    heads = readout_heads(attn, readout).requires_grad_(True)  # (rows, H, d)
    with torch.enable_grad():
        x = run.block_inputs[layer].detach()[rows, readout]  # (rows, C)
        embeds = readout_row_embeds(adapter, tower, layer, x, heads)
    cotangents = runs.cotangents(tower) if cotangents is None else cotangents
    (d_heads,) = batched_vjp(embeds, [heads], cotangents)  # (K, rows, H, d)
    return _readout_probs_gradient(runs, tower, d_heads, attn)


def _readout_probs_gradient(runs: PairRuns, tower: str, d_heads: torch.Tensor, attn: KeptAttention) -> torch.Tensor:
    """(B, P, H, n) ``dy/dA_r = dO_r V^T`` from the pairs' gradients at the readout row's
    attention output (K, rows, H, d), with the kept values."""
    dtype = accumulation_dtype(d_heads.dtype)
    # rows and heads as the batch of one product with the values, which are not copied per pair
    grad = d_heads.permute(1, 2, 0, 3).to(dtype) @ attn.value.to(dtype).transpose(-1, -2)  # (rows, H, K, n)
    return runs.batched(tower, grad.permute(2, 0, 1, 3))


def readout_input_gradients(
    adapter: ModelAdapter, runs: PairRuns, tower: str, attention: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """(B, P, n, C) every pair's gradient of its scalar at the residual stream entering the
    last block, taken through the readout token's row of that block alone; None where this short
    way does not apply (:func:`readout_row_applies`; then through the whole block). With
    ``attention``: ``(that, (B, P, H, n) the gradient at the readout row's attention
    probabilities)`` from the same product (:func:`readout_attention_gradients`' value).

    Every token reaches the readout row through the block's keys and values, so the row is
    rebuilt from the block's input X: ``q_r``, K and V from the adapter's linear pieces
    (``attention_qk``, ``attention_values``), ``A_r = softmax(q_r K^T * scale + mask_r)``
    (the kept block's scale and mask), ``O_r = A_r V``, then
    :func:`~cliplens.adapters.base.readout_row_embeds`. The pairs' batched product then runs
    through the norm and the key and value projections of n rows and the rest of one row, where
    the whole block's runs its query, output and MLP projections over n rows too."""
    if not readout_row_applies(adapter, runs, tower):
        return None
    run, last, attn, readout, rows = _block_row(runs, tower)
    x = run.block_inputs[last].detach().requires_grad_(True)  # (rows, n, C)
    with torch.enable_grad():
        q, k = adapter.attention_qk(tower, last, x)
        v = adapter.attention_values(tower, last, x)  # (rows, H, n, d)
        # only the readout token's query reaches the row: the others stay out of the backward
        q_r, _ = adapter.attention_qk(tower, last, x[rows, readout][:, None])  # (rows, H, 1, d)
        q = q.detach().clone()
        q[rows, :, readout] = q_r[:, :, 0]
        rebuilt = dataclasses.replace(attn, query=q, key=k, value=v)
        heads = readout_heads(rebuilt, readout)  # (rows, H, d)
        embeds = readout_row_embeds(adapter, tower, last, x[rows, readout], heads)
    got = batched_vjp(embeds, [x, heads] if attention else [x], runs.cotangents(tower))  # (K, rows, ...)
    grad = runs.batched(tower, got[0])
    return (grad, _readout_probs_gradient(runs, tower, got[1], attn)) if attention else grad


def readout_row_applies(adapter: ModelAdapter, runs: PairRuns, tower: str, layer: int = -1) -> bool:
    """Whether a tower's block ``layer`` (the last by default) can be taken through its readout
    row alone: a shared run (:attr:`PairRuns.leaves`) of a tower with a readout token and the
    adapter's linear pieces (``"linear_split"``) whose block ran kept (its values, scale and
    mask are there, see :class:`~cliplens.adapters.kept.KeptAttention`; float64 runs are eager)."""
    run = runs.run(tower)
    return (
        tower in runs.leaves
        and bool(run.attentions)
        and isinstance(run.attentions[layer], KeptAttention)
        and run.layout.has_readout_token
        and "linear_split" in adapter.capabilities(tower)
    )


def _block_row(runs: PairRuns, tower: str, layer: int = -1):
    """(run, the index of block ``layer`` (the last by default), its kept attention, the readout
    positions (rows,), the row indices (rows,)) of a shared tower run."""
    run = runs.run(tower)
    readout = run.layout.readout
    rows = torch.arange(readout.shape[0], device=readout.device)
    layer = layer % len(run.attentions)
    return run, layer, run.attentions[layer], readout, rows


def batched_block_vjps(
    output: torch.Tensor,
    cotangents: torch.Tensor,
    block_outputs: list[torch.Tensor],
    probs: list[torch.Tensor],
    start: int,
    head: list[torch.Tensor] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """K vector-Jacobian products at once (``cotangents`` (K, *output.shape)) from ``output``
    back through a stack of blocks, one block at a time (:func:`stack_vjps`).

    ``block_outputs[l]`` / ``probs[l]``: block l's output and attention probabilities (in the
    graph from block ``start`` on); ``head``: tensors between the last block and ``output``.
    Yields ``(l, (K, *probs[l].shape))`` from the last block down to ``start``, after
    ``(-1 - i, gradient of head[i])`` for the head tensors."""
    head = list(head or [])
    last = len(block_outputs) - 1
    got = batched_vjp(output, [*head, block_outputs[last]], cotangents)
    for i, grad in enumerate(got[:-1]):
        yield -1 - i, grad
    yield from stack_vjps(block_outputs, probs, start, {last: [(block_outputs[last], got[-1])]})


def stack_vjps(
    block_outputs: list[torch.Tensor],
    probs: list[torch.Tensor],
    start: int,
    taps: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
) -> Iterator[tuple[int, torch.Tensor]]:
    """K vector-Jacobian products at once back through a stack of blocks, one block at a time:
    ``taps[l]`` lists tensors read off block l's output (or that output itself) with their
    (K, ...) cotangents. The cotangent at a block's output (from the taps there and from the
    block above) goes back through that block alone (``is_grads_batched``), giving its attention
    probabilities' gradient and the cotangent at the block before. Each block's part of the
    graph is freed as it is passed, and the caller can reduce each gradient before the next is
    computed. Yields ``(l, (K, *probs[l].shape))`` from the last block down to ``start``, for
    the blocks a tap reaches."""
    g = None
    for layer in range(len(block_outputs) - 1, start - 1, -1):
        pending = list(taps.get(layer, []))
        if g is not None:
            pending.append((block_outputs[layer], g))
        if not pending:
            continue
        wrt = [in_graph(probs[layer])] + ([block_outputs[layer - 1]] if layer > start else [])
        got = batched_vjp([t for t, _ in pending], wrt, [c for _, c in pending], allow_unused=True)
        if got[0] is not None:
            yield layer, got[0]
        g = got[1] if layer > start else None


def batched_vjp(
    output: torch.Tensor | list[torch.Tensor],
    inputs: list[torch.Tensor],
    cotangents: torch.Tensor | list[torch.Tensor],
    allow_unused: bool = False,
) -> list[torch.Tensor | None]:
    """K vector-Jacobian products of ``output`` (a tensor or several) at ``inputs`` (``cotangents``
    (K, *output.shape), one per output), each gradient (K, *input.shape): ``is_grads_batched``,
    or a plain backward pass when K = 1 (the batched one adds vmap's overhead for nothing)."""
    outputs = list(output) if isinstance(output, (list, tuple)) else [output]
    cots = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
    if cots[0].shape[0] == 1:
        got = torch.autograd.grad(outputs, inputs, [c[0] for c in cots], allow_unused=allow_unused)
        return [None if g is None else g.unsqueeze(0) for g in got]
    return list(torch.autograd.grad(outputs, inputs, cots, is_grads_batched=True, allow_unused=allow_unused))


# Kept under its former name for code written against cliplens.engine
PairsForward = PairRuns


def per_pair(x: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P, ...) -> (B, P, ...)."""
    return x.reshape(B, P, *x.shape[1:])


def forward_pairs(
    adapter: ModelAdapter,
    images: ImageBatch,
    texts: TextBatch,
    target: Target,
    *,
    image_grad: bool,
    text_grad: bool,
    detach_blocks: bool = False,
    graph_from: dict[str, int | None] | None = None,
    shared: bool = False,
    reads: dict[str, AttentionReads] | None = None,
) -> PairRuns:
    """Run both towers (call inside ``adapter.explaining()``) and evaluate the target.

    ``graph_from`` (tower -> block), for a tower with a gradient: the first block whose tensors
    need one. The blocks before it run once per distinct input without a graph and the
    per-pair rows start there (:class:`~cliplens.adapters.base.FanOut`), so neither the forward
    nor the backward repeats work a method does not need. None (or a tower missing): per-pair
    rows from the input.

    ``shared`` (a tower with a gradient): no per-pair rows at all. The tower runs once over its
    distinct inputs, with a graph from its ``graph_from`` block on (or from the input), and the
    target is evaluated on per-pair copies of its embeddings (``PairRuns.leaves``); the pairs'
    gradients then come from :func:`block_gradients` or :meth:`PairRuns.pair_gradients`.

    ``reads`` (tower -> :class:`~cliplens.adapters.kept.AttentionReads`): which blocks of each
    tower keep their attention, and as what (a tower missing: every block its probabilities).
    The others run the fused kernel and keep nothing."""
    B, P = len(images), len(texts)
    graph_from = graph_from or {}
    reads = reads or {}
    leaves: dict[str, torch.Tensor] = {}

    def spread(name: str, e: torch.Tensor) -> torch.Tensor:
        """(B or P, D) -> (B, P, D), a view."""
        return e[:, None].expand(B, P, -1) if name == "image" else e[None].expand(B, P, -1)

    def tower(name: str, grad: bool, run, inputs: tuple, fan: FanOut | None, repeat):
        """(run, (B, P, D) per-pair embeddings) of one tower."""
        block = graph_from.get(name)
        kw = dict(detach_blocks=detach_blocks, reads=reads.get(name, EVERY_BLOCK))
        if grad and shared:
            if block is None:  # a graph from the input
                with torch.enable_grad():
                    out = run(*inputs, **kw)
            else:
                with torch.no_grad():  # the fan-out (one copy) turns gradients on at its block
                    out = run(*inputs, fan_out=FanOut(block, 1), **kw)
            leaves[name] = spread(name, out.embeds.detach()).clone().requires_grad_(True)
            return out, leaves[name]
        if grad and block is not None:
            with torch.no_grad():  # the fan-out turns gradients on at its block
                out = run(*inputs, fan_out=fan, **kw)
            return out, per_pair(out.embeds, B, P)
        if grad:
            with torch.enable_grad():
                out = run(*(repeat(x) for x in inputs), **kw)
            return out, per_pair(out.embeds, B, P)
        with torch.no_grad():
            out = run(*inputs, **kw)
        return out, spread(name, out.embeds.detach())

    image_fan = FanOut(graph_from["image"], P) if graph_from.get("image") is not None else None
    img, img_pairs = tower(
        "image", image_grad, adapter.run_image, (images.pixel_values,), image_fan, lambda x: x.repeat_interleave(P, dim=0)
    )
    text_fan = FanOut(graph_from["text"], B, tile=True) if graph_from.get("text") is not None else None
    txt, txt_pairs = tower(
        "text", text_grad, adapter.run_text, (texts.input_ids, texts.attention_mask), text_fan, lambda x: x.repeat(B, 1)
    )
    scores = PairScores.of(adapter, img_pairs.dtype)
    with torch.set_grad_enabled(image_grad or text_grad):
        y = target(PairContext.of(img_pairs, txt_pairs, scores))
    with torch.no_grad():
        logits = scores.logits(img_pairs.detach(), txt_pairs.detach())
        probs = scores.probs(logits)
    image_per_pair = image_grad and "image" not in leaves
    text_per_pair = text_grad and "text" not in leaves
    return PairRuns(
        B, P, img, txt, y, logits, probs, image_per_pair, text_per_pair, scores, images, texts, leaves=leaves
    )


# ---- per-row tower values -> per-pair results ----------------------------------------------


def grid_maps(run: TowerRun, token_values: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P or B, n) per-token values of an image tower -> (B, P, Gh, Gw) patch maps."""
    gh, gw = run.layout.grid
    vals = token_values[:, run.layout.patches]
    if vals.shape[0] == B:
        vals = vals[:, None].expand(B, P, -1)
    return vals.reshape(B, P, gh, gw)


def token_rows(run: TowerRun, token_values: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """(B*P or P, T) per-token values of a text tower -> (B, P, T), NaN on padding."""
    valid = run.layout.valid
    if valid.shape[0] != token_values.shape[0]:  # per-pair values of a shared run's P prompts
        valid = valid.repeat(B, 1)
    vals = token_values.masked_fill(~valid, float("nan"))
    if vals.shape[0] == P:
        vals = vals[None].expand(B, P, -1)
    return vals.reshape(B, P, -1)


def tower_result(runs: PairRuns, tower: str, token_values: torch.Tensor) -> torch.Tensor:
    """Per-row token values of ``tower`` -> its per-pair result: (B, P, Gh, Gw) image maps or
    (B, P, T) token scores."""
    shape = grid_maps if tower == "image" else token_rows
    return shape(runs.run(tower), token_values, runs.B, runs.P)
