"""Blocks on the fused kernel (cliplens.adapters.kept): a block a method reads keeps its queries,
keys, values and the kernel's output; chefer recomputes the probabilities and their gradient a
chunk of query rows at a time, legrad the gradient alone, rollout and raw attention the
probabilities alone. A block no method reads keeps nothing.

- The pieces against a slow, obvious float64 computation: the kernel's output, the recomputed
  probabilities, dy/dA = dO V^T (against autograd through explicit probabilities), the folded
  row ``row @ Abar`` and the rollout and head-mean rows (against the matrices formed) in chunks
  of one and two query rows, with masks (additive, boolean, causal) and a shared run's
  broadcast pair axes.
- End to end in float64, the kept path forced on: chefer, legrad, rollout and raw attention
  equal their eager runs with exact float64 probabilities (transformers' eager softmax runs in
  float32; the test swaps in one in float64), on CLIP (causal and padding masks), SigLIP and
  SigLIP 2 (patch mask) and open_clip (nn.MultiheadAttention and its own Attention), to 1e-9
  of the scale.
- End to end in float32, the path the methods take: the same maps as with their read blocks
  on the eager path, within float32 rounding (the tiny models' sharp attention amplifies it;
  5e-3 of the scale holds with room, measured at most 5.7e-4).
- Which blocks keep what (``AttentionReads``): known answers, and per method the blocks each
  tower run keeps, the others never reaching a path that returns probabilities.
- Short ways through a kept block, each against the block's own backward (float64, 1e-12 of the
  scale): the last block's readout row (chefer, grad_eclip, gradcam, the readout stop), and
  legrad's layer readouts (a mean-pooled one crossing the MLP's down-projection once per pair,
  a readout token's through its row alone).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
import cliplens.adapters.hf_encoder as hf_encoder
import cliplens.adapters.kept as kept_module
from cliplens.adapters.base import FanOut
from cliplens.adapters.kept import (
    AttentionReads,
    fused_attention_kept,
    query_chunks,
    query_rows,
    transformers_kept_attention,
)
from cliplens.methods import REGISTRY
from cliplens.methods.relevance import head_mean_row, rollout_step, row_times_abar
from families import ADAPTER_FACTORIES, random_image
from helpers import exact_eager_attention

pytestmark = pytest.mark.usefixtures("one_thread")

R, H, N, D = 2, 3, 7, 4


def _qkv(seed: int, rows: int = R):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _explicit_probs(q, k, mask, scale, causal):
    """softmax(q k^T * scale + mask), one query row, one head at a time."""
    out = torch.zeros(*q.shape[:-1], k.shape[-2], dtype=torch.float64)
    for r in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                s = torch.stack([(q[r, h, i] * k[r, h, j]).sum() * scale for j in range(k.shape[2])])
                if mask is not None:
                    s = s + mask[r if mask.shape[0] > 1 else 0, 0, i]
                if causal:
                    s[i + 1 :] = float("-inf")
                out[r, h, i] = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
    return out


def _padding_mask(rows: int = R) -> torch.Tensor:
    """(rows, 1, N, N) additive: row 1 cannot see its last two keys."""
    mask = torch.zeros(rows, 1, N, N, dtype=torch.float64)
    mask[1, :, :, -2:] = torch.finfo(torch.float64).min
    return mask


@pytest.mark.parametrize("masked,causal", [(False, False), (True, False), (False, True)])
def test_kept_pieces_equal_the_explicit_attention(masked, causal):
    q, k, v = _qkv(0)
    mask = _padding_mask() if masked else None
    scale = 0.7
    out, kept = fused_attention_kept(q, k, v, mask, scale, causal)
    A = _explicit_probs(q, k, mask, scale, causal).requires_grad_(True)
    torch.testing.assert_close(out, A.detach() @ v, rtol=0, atol=1e-12)
    assert kept.output is out and kept.shape == A.shape
    for rows in (slice(0, N), slice(2, 5), slice(6, 7)):
        torch.testing.assert_close(kept.probs(rows, torch.float64), A.detach()[..., rows, :], rtol=0, atol=1e-12)
    # dy/dA for y = <W, A V>: autograd through the explicit probabilities
    W = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (dA,) = torch.autograd.grad((W * (A @ v)).sum(), [A])
    dO = W  # dy/dO of y = <W, O>
    for rows in (slice(0, N), slice(1, 4), torch.tensor([0, 5, 6])):
        torch.testing.assert_close(kept.grad(dO, rows, torch.float64), dA[..., rows, :], rtol=0, atol=1e-12)
        torch.testing.assert_close(kept.probs(rows, torch.float64), A.detach()[..., rows, :], rtol=0, atol=1e-12)


def _explicit_fold(row, A, dA):
    """row @ mean_h (dA * A)^+, one pair at a time."""
    out = torch.zeros_like(row)
    for r in range(row.shape[0]):
        abar = (dA[r] * A[r]).clamp(min=0).mean(dim=0)
        out[r] = row[r] @ abar
    return out


@pytest.mark.parametrize("budget", [1, 2 * R * H * N, 10**9])  # one query row per chunk, two, all
def test_folded_row_in_chunks_equals_the_explicit_fold(budget, monkeypatch):
    monkeypatch.setattr(kept_module, "CHUNK_ELEMENTS", budget)
    q, k, v = _qkv(2)
    mask = _padding_mask()
    _, kept = fused_attention_kept(q, k, v, mask, 0.5)
    A = _explicit_probs(q, k, mask, 0.5, False)
    g = torch.Generator().manual_seed(3)
    dO = torch.randn(R, H, N, D, generator=g, dtype=torch.float64)
    row = torch.rand(R, N, generator=g, dtype=torch.float64)
    want = _explicit_fold(row, A, dO @ v.transpose(-1, -2))
    torch.testing.assert_close(row_times_abar(row, kept, dO), want, rtol=0, atol=1e-12)
    # the eager form (probabilities and their gradient) is the same function
    torch.testing.assert_close(row_times_abar(row, A, dO @ v.transpose(-1, -2)), want, rtol=0, atol=1e-12)
    chunks = list(query_chunks(kept, R))
    assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(N))
    assert len(chunks) == {1: N, 2 * R * H * N: 4, 10**9: 1}[budget]
    # query rows the row does not weigh are not recomputed: the readout's alone here
    one_hot = torch.zeros_like(row)
    one_hot[:, 0] = 1.0
    assert [c.tolist() for c in query_chunks(kept, R, live=(one_hot != 0).any(dim=0))] == [[0]]
    want = _explicit_fold(one_hot, A, dO @ v.transpose(-1, -2))
    torch.testing.assert_close(row_times_abar(one_hot, kept, dO), want, rtol=0, atol=1e-12)


def test_folded_row_of_a_shared_run_broadcasts_distinct_inputs_against_pairs(monkeypatch):
    """A shared run keeps B distinct images; P prompts give each a gradient: kept[:, None]
    against (B, P, H, n, d), the rows b*P + p."""
    monkeypatch.setattr(kept_module, "CHUNK_ELEMENTS", 3 * H * N)
    B, P = R, 3
    q, k, v = _qkv(4)
    _, kept = fused_attention_kept(q, k, v, _padding_mask(), 0.5)
    A = _explicit_probs(q, k, _padding_mask(), 0.5, False)
    g = torch.Generator().manual_seed(5)
    dO = torch.randn(B, P, H, N, D, generator=g, dtype=torch.float64)
    row = torch.rand(B * P, N, generator=g, dtype=torch.float64)
    row[:, [1, 4]] = 0.0  # query rows no pair weighs
    A_pairs = A.repeat_interleave(P, dim=0)
    dA_pairs = (dO @ v[:, None].transpose(-1, -2)).reshape(B * P, H, N, N)
    want = _explicit_fold(row, A_pairs, dA_pairs)
    torch.testing.assert_close(row_times_abar(row, kept[:, None], dO), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("budget", [1, 2 * R * H * N, 10**9])
@pytest.mark.parametrize("causal", [False, True])
def test_rollout_and_head_mean_rows_of_a_kept_block_equal_the_explicit_matrices(budget, causal, monkeypatch):
    """rollout and raw attention read a kept block chunk by chunk, decomposition and
    interactions its readout rows: against the matrices ``mean_h A`` and
    ``rownormalise(mean_h A + I)`` formed explicitly, and A's rows."""
    monkeypatch.setattr(kept_module, "CHUNK_ELEMENTS", budget)
    q, k, v = _qkv(7)
    mask = None if causal else _padding_mask()
    _, kept = fused_attention_kept(q, k, v, mask, 0.6, causal)
    A = _explicit_probs(q, k, mask, 0.6, causal)
    mean = A.mean(dim=1)  # (R, N, N)
    ahat = mean + torch.eye(N, dtype=torch.float64)
    ahat = ahat / ahat.sum(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(8)
    dense = torch.rand(R, N, generator=g, dtype=torch.float64)
    one_hot = torch.zeros(R, N, dtype=torch.float64)
    one_hot[:, 0] = 1.0
    # each row's probabilities at its own query position (a readout token)
    for index in (torch.tensor([0, 0]), torch.tensor([5, 2]), torch.tensor([6, 6])):
        want = torch.stack([A[r, :, int(index[r])] for r in range(R)])
        torch.testing.assert_close(query_rows(kept, index), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(query_rows(A, index), want, rtol=0, atol=1e-12)
    for row in (dense, one_hot):
        want_mean = torch.stack([row[r] @ mean[r] for r in range(R)])
        want_rollout = torch.stack([row[r] @ ahat[r] for r in range(R)])
        for attn in (kept, A):  # the kept block and the probabilities: one function
            torch.testing.assert_close(head_mean_row(attn, row), want_mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(rollout_step(attn, row), want_rollout, rtol=0, atol=1e-12)


def test_attention_reads_say_which_blocks_keep_what():
    """Known answers: a block outside ``blocks`` or before a fan-out runs fused and keeps
    nothing; float64 runs never fuse; the readout block stops where it would run kept."""
    f32, f64 = torch.float32, torch.float64
    reads = AttentionReads(frozenset({2, 3}), kept=True)
    fan = FanOut(3, 2)
    assert [reads.keeps(i) for i in range(5)] == [False, False, True, True, False]
    assert [reads.keeps(i, fan) for i in range(5)] == [False, False, False, True, False]
    assert [reads.path(i, None, f32) for i in range(5)] == ["fused", "fused", "kept", "kept", "fused"]
    assert [reads.path(i, fan, f32) for i in (2, 3)] == ["fused", "kept"]
    assert [reads.path(i, None, f64) for i in range(5)] == ["eager"] * 5
    assert [kept_module.EVERY_BLOCK.path(i, None, f32) for i in range(3)] == ["eager"] * 3
    assert [kept_module.EVERY_BLOCK.path(i, fan, f32) for i in (2, 3)] == ["fused", "eager"]
    assert [kept_module.NO_BLOCK.path(i, None, f32) for i in range(3)] == ["fused"] * 3
    assert not AttentionReads(None, kept=True).runs_kept(f64)
    stop = AttentionReads(frozenset({3, 4}), kept=True, readout_block=4)
    assert [stop.path(i, None, f32) for i in (2, 3, 4)] == ["fused", "kept", "readout"]
    assert [stop.path(i, None, f64) for i in (3, 4)] == ["eager", "eager"]
    assert AttentionReads(frozenset({4}), kept=False, readout_block=4).path(4, None, f32) == "eager"


@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool", "causal"])
def test_transformers_attention_function_returns_the_eager_output(mask_kind):
    q, k, v = _qkv(6)
    module = torch.nn.Module()
    module.is_causal = mask_kind == "causal"
    additive = _padding_mask()
    mask = {"none": None, "causal": None, "additive": additive, "bool": additive == 0}[mask_kind]
    out, kept = transformers_kept_attention(module, q, k, v, mask, scaling=0.3)
    A = _explicit_probs(q, k, None if mask is None else additive, 0.3, mask_kind == "causal")
    torch.testing.assert_close(out, (A @ v).transpose(1, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(kept.probs(slice(0, N), torch.float64), A, rtol=0, atol=1e-12)


# ---- end to end -----------------------------------------------------------------------------

IMAGES = [random_image(1), random_image(2, size=(40, 64))]
TEXTS = ["a red triangle", "a photo of a small dog", "cat"]  # padded in one batch
KEPT_FAMILIES = [
    pytest.param(name, factory, id=name, marks=[pytest.mark.open_clip] if name == "open_clip" else [])
    for name, factory in ADAPTER_FACTORIES
    if name in ("hf-clip", "hf-siglip", "hf-siglip2", "open_clip")
]
CASES = [
    ("chefer", {}),
    ("chefer", {"start_layer": 0}),
    ("chefer", {"start_layer": 1}),
    ("chefer", {"start_layer": 0, "target": "probability"}),
    ("legrad", {}),
    ("legrad", {"layers": None, "pooling": "model"}),
    ("legrad", {"correction": "on", "target": "probability"}),  # the correction: a hooked backward
    ("rollout", {}),
    ("rollout", {"start_layer": 1}),
    ("raw_attention", {}),
    ("raw_attention", {"layer": 0}),
    ("decomposition", {}),
]
CASE_IDS = [m + "-" + (",".join(f"{k}={v}" for k, v in o.items()) or "default") for m, o in CASES]


def _explained(method: str, options: dict, num_layers: int) -> int:
    if method == "chefer":
        return num_layers - options.get("start_layer", -1) % num_layers
    if method == "rollout":
        return num_layers - options.get("start_layer", 0) % num_layers
    if method == "raw_attention":
        return 1
    if method in ("decomposition", "interactions"):
        return num_layers
    if method == "grad_eclip":
        return 1
    return min(options.get("layers", 2) or num_layers, num_layers)


def _counting(fn, calls: list):
    """``fn``, adding an entry to ``calls`` per call."""

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


def _count_kept(family: str, monkeypatch) -> list:
    """A list that grows by one per block run on the fused kernel keeping its attention (or
    stopping there: the "readout" path)."""
    calls = []
    if family == "open_clip":
        import cliplens.adapters.capture as capture
        import cliplens.adapters.open_clip as open_clip_adapter

        for module in (capture, open_clip_adapter):
            monkeypatch.setattr(module, "fused_attention_kept", _counting(fused_attention_kept, calls))
    else:
        for name in ("transformers_kept_attention", "transformers_readout_attention"):
            monkeypatch.setattr(hf_encoder, name, _counting(getattr(hf_encoder, name), calls))
    return calls


def _kept_in_float64(monkeypatch) -> None:
    """The kept path on in float64 too (it is off there: the eager blocks are the oracles')."""
    monkeypatch.setattr(AttentionReads, "runs_kept", lambda self, dtype: self.kept)


def _assert_same(have, want, atol):
    for b in range(len(IMAGES)):
        for p in range(len(TEXTS)):
            w = want.grid_map(b, p)
            np.testing.assert_allclose(have.grid_map(b, p), w, rtol=0, atol=atol * np.nanmax(np.abs(w)))
            wt = np.asarray(want.token_scores[b][p], dtype=np.float64)
            ht = np.asarray(have.token_scores[b][p], dtype=np.float64)
            np.testing.assert_allclose(ht, wt, rtol=0, atol=atol * np.nanmax(np.abs(wt)))


@pytest.mark.parametrize("family,factory", KEPT_FAMILIES)
@pytest.mark.parametrize("method,options", CASES, ids=CASE_IDS)
def test_kept_blocks_equal_exact_eager_in_float64(family, factory, method, options, monkeypatch):
    _kept_equals_exact_eager(factory(seed=0, dtype=torch.float64), family, method, options, monkeypatch)


@pytest.mark.parametrize("method,options", [CASES[1], CASES[5]], ids=[CASE_IDS[1], CASE_IDS[5]])
def test_kept_blocks_on_per_pair_rows_equal_exact_eager_in_float64(method, options, monkeypatch):
    """The per-pair-rows path (``shared_graph`` off): the fold and the maps fed by tensor hooks
    on the kept outputs during one backward pass."""
    monkeypatch.setattr(REGISTRY[method], "shared_graph", False)
    _kept_equals_exact_eager(ADAPTER_FACTORIES[0][1](seed=0, dtype=torch.float64), "hf-clip", method, options, monkeypatch)


@pytest.mark.parametrize("family,factory", [f for f in KEPT_FAMILIES if f.id in ("hf-clip", "open_clip")])
@pytest.mark.parametrize("method", ["interactions", "grad_eclip"])
def test_token_readout_methods_on_kept_blocks_equal_exact_eager_in_float64(family, factory, method, monkeypatch):
    """Methods that need both towers to read out a token (not SigLIP's pooled image tower)."""
    _kept_equals_exact_eager(factory(seed=0, dtype=torch.float64), family, method, {}, monkeypatch)


@pytest.mark.open_clip
@pytest.mark.parametrize("method", ["chefer", "legrad"])
def test_open_clip_own_attention_blocks_on_kept_attention(method, monkeypatch):
    """open_clip's own ``Attention`` (query/key norms, head scales), not nn.MultiheadAttention."""
    pytest.importorskip("open_clip")
    from cliplens.adapters.open_clip import OpenClipAdapter
    from families import make_tiny_open_clip

    custom = dict(qk_norm=True, scale_heads=True, scale_attn=True, scale_attn_inner=True, scale_fc=True)
    adapter = OpenClipAdapter(make_tiny_open_clip(dtype=torch.float64, **custom))
    assert not isinstance(adapter.model.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    options = {"start_layer": 0} if method == "chefer" else {"layers": None}
    _kept_equals_exact_eager(adapter, "open_clip", method, options, monkeypatch)


def _kept_equals_exact_eager(adapter, family, method, options, monkeypatch):
    exact_eager_attention(monkeypatch)
    cls = REGISTRY[method]
    monkeypatch.setattr(cls, "kept_attention", False)
    want = cliplens.explain(adapter, IMAGES, TEXTS, method=method, **options)
    monkeypatch.setattr(cls, "kept_attention", True)
    _kept_in_float64(monkeypatch)
    calls = _count_kept(family, monkeypatch)
    have = cliplens.explain(adapter, IMAGES, TEXTS, method=method, **options)
    # every explained block of each tower once per call of the method (SigLIP 2 explains each
    # image size apart: two calls here; the correction runs the empty prompt's text tower too)
    per_call = sum(_explained(method, options, n) for n in adapter.num_layers.values())
    assert calls and len(calls) >= per_call
    _assert_same(have, want, 1e-9)
    for key, value in want.extras.items():
        if "delta_" in key:  # completeness residuals (text_delta_...): float64 rounding, in both runs
            assert np.nanmax(have.extras[key]) < 1e-12
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            np.testing.assert_allclose(have.extras[key], value, rtol=0, atol=1e-9 * (np.nanmax(np.abs(value)) + 1e-300))


@pytest.mark.parametrize("family,factory", KEPT_FAMILIES)
@pytest.mark.parametrize(
    "method,options", [CASES[i] for i in (0, 1, 4, 6, 8, 10)], ids=[CASE_IDS[i] for i in (0, 1, 4, 6, 8, 10)]
)
def test_kept_blocks_match_their_eager_blocks_in_float32(family, factory, method, options, monkeypatch):
    _kept_matches_eager_in_float32(factory(seed=0, dtype=torch.float32), family, method, options, monkeypatch)


@pytest.mark.parametrize("family,factory", [f for f in KEPT_FAMILIES if f.id in ("hf-clip", "open_clip")])
@pytest.mark.parametrize("method", ["interactions", "grad_eclip"])
def test_token_readout_methods_on_kept_blocks_match_eager_in_float32(family, factory, method, monkeypatch):
    _kept_matches_eager_in_float32(factory(seed=0, dtype=torch.float32), family, method, {}, monkeypatch)


def _kept_matches_eager_in_float32(adapter, family, method, options, monkeypatch):
    calls = _count_kept(family, monkeypatch)
    have = cliplens.explain(adapter, IMAGES, TEXTS, method=method, **options)
    assert calls, "the explained blocks did not run fused"
    monkeypatch.setattr(REGISTRY[method], "kept_attention", False)
    # a run for an embedding alone (legrad's empty prompt) stops at the readout row, whatever
    # the method reads: whole here, so that nothing runs kept
    monkeypatch.setattr(adapter, "embedding_reads", lambda tower: kept_module.NO_BLOCK)
    calls.clear()
    want = cliplens.explain(adapter, IMAGES, TEXTS, method=method, **options)
    assert not calls
    _assert_same(have, want, 5e-3)


def test_kept_attention_function_is_registered_for_the_call_only():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    adapter = ADAPTER_FACTORIES[0][1](seed=0, dtype=torch.float32)
    attn = adapter.model.config.vision_config._attn_implementation
    for options in ({}, {"start_layer": 0}):  # stopping at the readout row; every block kept
        cliplens.explain(adapter, IMAGES[:1], TEXTS[:1], method="chefer", **options)
        assert hf_encoder.KEPT not in ALL_ATTENTION_FUNCTIONS
        assert hf_encoder.READOUT not in ALL_ATTENTION_FUNCTIONS
        assert adapter.model.config.vision_config._attn_implementation == attn


# ---- which blocks keep their attention --------------------------------------------------------

READ_CASES = [
    # (method, options, towers, blocks kept per tower of L: a function of L); a tower the call
    # does not explain keeps its last block, where it stops at the readout row (its embedding alone)
    ("gradcam", {}, ("image",), lambda L: {"image": {L - 1}, "text": {L - 1}}),  # for the readout row
    ("gradcam", {"layer": 1}, ("image",), lambda L: {"image": set(), "text": {L - 1}}),
    ("sensitivity", {}, None, lambda L: {"image": set(), "text": set()}),
    ("chefer", {}, ("image",), lambda L: {"image": {L - 1}, "text": {L - 1}}),
    ("legrad", {"layers": 2}, ("text",), lambda L: {"image": {L - 1}, "text": {L - 2, L - 1}}),
    ("raw_attention", {"layer": 0}, None, lambda L: {"image": {0}, "text": {0}}),
    ("rollout", {"start_layer": 1}, None, lambda L: {"image": set(range(1, L)), "text": set(range(1, L))}),
    ("decomposition", {}, None, lambda L: {"image": set(range(L)), "text": set(range(L))}),
]


@pytest.mark.parametrize("family,factory", [f for f in KEPT_FAMILIES if f.id in ("hf-clip", "open_clip")])
@pytest.mark.parametrize(
    "method,options,towers,blocks", READ_CASES, ids=[c[0] + str(c[1] or "") for c in READ_CASES]
)
def test_blocks_no_method_reads_keep_nothing_and_run_fused(
    family, factory, method, options, towers, blocks, monkeypatch
):
    """Each tower run keeps the attention of the blocks the method reads and nothing else; the
    other blocks never reach an attention path that returns probabilities (float32)."""
    adapter = factory(seed=0, dtype=torch.float32)
    kept_runs: dict[str, set[int]] = {}
    for tower in ("image", "text"):
        run = getattr(adapter, f"run_{tower}")

        def spy(*args, _run=run, _tower=tower, **kwargs):
            out = _run(*args, **kwargs)
            kept_runs.setdefault(_tower, {i for i, a in enumerate(out.attentions) if a is not None})
            return out

        monkeypatch.setattr(adapter, f"run_{tower}", spy)
    read_paths = []  # one entry per block run on a path that keeps its attention
    if family == "open_clip":
        import cliplens.adapters.capture as capture
        import cliplens.adapters.open_clip as open_clip_adapter

        for module, name in ((capture, "mha_with_probabilities"), (open_clip_adapter, "open_clip_attention")):
            monkeypatch.setattr(module, name, _counting(getattr(module, name), read_paths))
    else:
        from transformers.models.clip import modeling_clip

        for module, name in (
            (modeling_clip, "eager_attention_forward"),
            (hf_encoder, "transformers_kept_attention"),
            (hf_encoder, "transformers_readout_attention"),
        ):
            monkeypatch.setattr(module, name, _counting(getattr(module, name), read_paths))
    kw = {} if towers is None else {"towers": towers}
    cliplens.explain(adapter, IMAGES[:1], TEXTS[:2], method=method, **kw, **options)
    want = {t: blocks(n)[t] for t, n in adapter.num_layers.items()}
    assert kept_runs == want
    assert len(read_paths) == sum(len(b) for b in want.values())


def test_runs_for_embeddings_only_keep_no_attention(monkeypatch):
    """The evaluation's encoders, the score table and legrad's empty prompt run every block on
    the fused kernel (a batch of 256 images at 224 px would otherwise hold 5.7 GB of
    probabilities) but the last, where they stop at the readout row and keep its queries, keys
    and values; with the embeddings of the eager path (float32 rounding)."""
    from cliplens.eval.classifier import encode_images, encode_texts
    from cliplens.methods.legrad import empty_prompt_embedding

    adapter = ADAPTER_FACTORIES[0][1](seed=0, dtype=torch.float32)
    images, texts = adapter.prepare_images(IMAGES[:1])[0], adapter.tokenize(TEXTS)
    kept = []
    for tower in ("image", "text"):
        run = getattr(adapter, f"run_{tower}")

        def spy(*args, _run=run, **kwargs):
            out = _run(*args, **kwargs)
            kept.append([i for i, a in enumerate(out.attentions) if a is not None])
            stopped.append(len(out.block_outputs) == len(out.block_inputs) - 1)
            return out

        monkeypatch.setattr(adapter, f"run_{tower}", spy)
    stopped = []
    fused = [
        encode_images(adapter, images.pixel_values),
        encode_texts(adapter, TEXTS),
        adapter.score_table(images, texts),
        empty_prompt_embedding(adapter),
    ]
    # images, texts, the table (two), the empty prompt: each its last block alone, stopped there
    last = {t: [n - 1] for t, n in adapter.num_layers.items()}
    assert kept == [last["image"], last["text"], last["image"], last["text"], last["text"]]
    assert stopped == [True] * 5
    monkeypatch.setattr(hf_encoder, "IMPLEMENTATION", dict.fromkeys(hf_encoder.IMPLEMENTATION, "eager"))
    eager = [
        encode_images(adapter, images.pixel_values),
        encode_texts(adapter, TEXTS),
        adapter.score_table(images, texts),
        empty_prompt_embedding(adapter),
    ]
    for have, want in zip(fused, eager):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-4 * float(want.abs().max()))


# ---- the last block's readout row on its own --------------------------------------------------

LINEAR_FAMILIES = [
    pytest.param(name, factory, id=name, marks=[pytest.mark.open_clip] if name == "open_clip" else [])
    for name, factory in ADAPTER_FACTORIES
    if name in ("hf-clip", "hf-siglip", "hf-siglip2", "hf-blip-itc", "open_clip")
]


#: the towers whose last block the embedding reads at one token, with linear pieces and a kept
#: last block (BLIP's attention computes its own probabilities: it never runs kept)
SHORT_TOWERS = {
    "hf-clip": ["image", "text"],
    "hf-siglip": ["text"],
    "hf-siglip2": ["text"],
    "hf-blip-itc": [],
    "open_clip": ["image", "text"],
}


@pytest.mark.parametrize("family,factory", LINEAR_FAMILIES)
def test_readout_row_branch_of_the_last_block_gives_the_embedding(family, factory, monkeypatch):
    """The readout row of the last block from the adapter's linear pieces: ``A_r V`` with
    ``attention_values`` is the kept output's row; ``attention_output`` of it equals the
    attention branch summed from the per-head mapped values (``attention_value_heads``,
    ``attention_out_bias``) with the probabilities; and ``head(z + mlp(z))`` from that row
    alone is the tower's embedding (float64, 1e-12; text rows padded to different lengths, so
    the readout sits at different positions)."""
    adapter = factory(seed=0, dtype=torch.float64)
    _kept_in_float64(monkeypatch)
    reads = AttentionReads(None, kept=True)
    towers = [t for t in ("image", "text") if {"readout_token", "linear_split"} <= adapter.capabilities(t)]
    assert towers
    with adapter.explaining():
        runs = {
            "image": lambda: adapter.run_image(adapter.prepare_images(IMAGES[:1])[0].pixel_values, reads=reads),
            "text": lambda: adapter.run_text(*_ids_and_mask(adapter), reads=reads),
        }
        for tower in towers:
            run = runs[tower]()
            last = len(run.attentions) - 1
            attn = run.attentions[last]
            r = run.layout.readout
            rows = torch.arange(r.shape[0])
            x = run.block_inputs[last][rows, r]
            A = query_rows(attn, r)  # (rows, H, n)
            V = adapter.attention_values(tower, last, run.block_inputs[last])  # (rows, H, n, d)
            heads = torch.einsum("rhn,rhnd->rhd", A, V)
            if tower in SHORT_TOWERS[family]:  # the kept output's readout row is A_r V
                torch.testing.assert_close(attn.output[rows, :, r], heads, rtol=0, atol=1e-12)
            U = adapter.attention_value_heads(tower, last, run.block_inputs[last])  # (rows, H, n, C)
            bias = adapter.attention_out_bias(tower, last)
            want = torch.einsum("rhn,rhnc->rc", A, U) + (0 if bias is None else bias)
            have = adapter.attention_output(tower, last, heads)
            torch.testing.assert_close(have, want, rtol=0, atol=1e-12)
            z = x + have
            embeds = adapter.head(tower, z + adapter.mlp_output(tower, last, z))
            torch.testing.assert_close(embeds, run.embeds, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family,factory", LINEAR_FAMILIES)
def test_a_tower_stopped_at_its_last_blocks_readout_row_gives_the_whole_runs_embedding(
    family, factory, monkeypatch
):
    """The ``"readout"`` path (``AttentionReads.readout_block``): on the towers that take it
    (``SHORT_TOWERS``) the run stops in the last block's attention (no output for that block, a
    kept attention without one) and its embedding, finished from the readout row alone, equals
    the whole run's; its kept queries, keys and values are the whole run's (float64, 1e-12; text
    rows padded to different lengths, with and without a fan-out). Elsewhere (BLIP's attention
    never runs kept) the tower runs whole and gives the same as without the stop."""
    adapter = factory(seed=0, dtype=torch.float64)
    _kept_in_float64(monkeypatch)
    pixels = adapter.prepare_images(IMAGES[:1])[0].pixel_values
    with adapter.explaining():
        for tower, n in adapter.num_layers.items():
            if not {"readout_token", "linear_split"} <= adapter.capabilities(tower):
                continue
            last = n - 1
            for fan_out in (None, FanOut(last, 1)):
                runs = {}
                for name, reads in (
                    ("whole", AttentionReads(frozenset({last}), kept=True)),
                    ("stopped", AttentionReads(frozenset({last}), kept=True, readout_block=last)),
                ):
                    kw = dict(reads=reads, fan_out=fan_out)
                    with torch.no_grad():
                        if tower == "image":
                            runs[name] = adapter.run_image(pixels, **kw)
                        else:
                            runs[name] = adapter.run_text(*_ids_and_mask(adapter), **kw)
                whole, stopped = runs["whole"], runs["stopped"]
                torch.testing.assert_close(stopped.embeds, whole.embeds, rtol=0, atol=1e-12)
                if tower not in SHORT_TOWERS[family]:
                    assert len(stopped.block_outputs) == n and stopped.pooled is not None
                    continue
                assert len(stopped.block_outputs) == n - 1 and len(stopped.block_inputs) == n
                assert stopped.pooled is None and stopped.attentions[last].output is None
                for field in ("query", "key", "value"):
                    have, want = (getattr(r.attentions[last], field) for r in (stopped, whole))
                    torch.testing.assert_close(have, want, rtol=0, atol=1e-12)
                assert stopped.attentions[last].scale == whole.attentions[last].scale


def test_the_readout_stop_is_asked_where_only_the_last_blocks_readout_row_is_read():
    """``Method.attention_reads``: the readout block is asked on the towers that read out a
    token with linear pieces, where the call reads that block only at that row: explained by
    chefer (any start), grad_eclip, or gradcam at the last block, on a shared graph; or not
    explained at all (its embedding alone). Never on a tower legrad explains, nor gradcam at an
    earlier layer."""
    adapter = ADAPTER_FACTORIES[0][1](seed=0)
    L = adapter.num_layers

    def asked(method, towers=("image", "text"), **options):
        cls = REGISTRY[method]
        reads = cls().attention_reads(adapter, towers, cls().parse_options(options))
        return {t: r.readout_block for t, r in reads.items()}

    every = {t: n - 1 for t, n in L.items()}
    text_alone = {"image": None, "text": L["text"] - 1}  # the text tower for its embedding alone
    assert asked("chefer") == every
    assert asked("grad_eclip") == every
    assert asked("chefer", towers=("image",)) == every
    assert asked("gradcam", towers=("image",)) == every
    assert asked("chefer", start_layer=0) == every
    assert asked("chefer", towers=("text",), start_layer=0) == every
    assert asked("gradcam", towers=("image",), layer=0) == text_alone
    assert asked("legrad") == {"image": None, "text": None}
    assert asked("legrad", towers=("image",)) == text_alone
    assert asked("rollout", towers=("image",)) == text_alone
    chefer = REGISTRY["chefer"]()
    siglip = dict(ADAPTER_FACTORIES)["hf-siglip"](seed=0)
    reads = chefer.attention_reads(siglip, ("image", "text"), chefer.parse_options({}))
    assert reads["image"].readout_block is None  # a pooling head reads every token
    assert reads["text"].readout_block == siglip.num_layers["text"] - 1


@pytest.mark.parametrize("family,factory", LINEAR_FAMILIES)
def test_embedding_only_runs_stop_at_the_readout_row_and_score_alike(family, factory, monkeypatch):
    """``ModelAdapter.embedding_reads``: the towers that can stop (``SHORT_TOWERS``) do, in a
    run for the embedding alone (``score_table``, the evaluation's encoders), and score every
    pair as the whole runs do (float32, 1e-5); the others keep nothing (``NO_BLOCK``)."""
    adapter = factory(seed=0, dtype=torch.float32)
    for tower, n in adapter.num_layers.items():
        reads = adapter.embedding_reads(tower)
        if {"readout_token", "linear_split"} <= adapter.capabilities(tower):
            assert reads == AttentionReads(frozenset({n - 1}), kept=True, readout_block=n - 1)
        else:
            assert reads == kept_module.NO_BLOCK
    images = adapter.prepare_images(IMAGES)[0]
    texts = adapter.tokenize(TEXTS)
    stopped = []
    for tower in ("image", "text"):
        run = getattr(adapter, f"run_{tower}")

        def spy(*args, _run=run, _tower=tower, **kwargs):
            out = _run(*args, **kwargs)
            if len(out.block_outputs) < adapter.num_layers[_tower]:
                stopped.append(_tower)
            return out

        monkeypatch.setattr(adapter, f"run_{tower}", spy)
    with adapter.explaining():
        have = adapter.score_table(images, texts)
    assert sorted(stopped) == SHORT_TOWERS[family]
    monkeypatch.setattr(adapter, "embedding_reads", lambda tower: kept_module.NO_BLOCK)
    with adapter.explaining():
        want = adapter.score_table(images, texts)
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_per_pair_rows_never_stop_at_the_readout_row(monkeypatch):
    """Without a shared graph the pairs' gradients go back through the tower's own graph: the
    towers run their last block whole."""
    monkeypatch.setattr(REGISTRY["chefer"], "shared_graph", False)
    adapter = ADAPTER_FACTORIES[0][1](seed=0)
    chefer = REGISTRY["chefer"]()
    reads = chefer.attention_reads(adapter, ("image", "text"), chefer.parse_options({}))
    assert all(r.readout_block is None for r in reads.values())


def _sort_towers(module, name: str, monkeypatch) -> tuple[list[str], list[str]]:
    """Two lists that grow by the towers ``module.name`` (a short-way helper called as
    ``(adapter, runs, tower, ...)``, None where it does not apply, e.g. a readout-row helper of
    :mod:`cliplens.methods.pairs`) takes the short way on, and those it turns away."""
    short, whole = [], []
    helper = getattr(module, name)

    def spy(adapter, runs, tower, *args, **kwargs):
        out = helper(adapter, runs, tower, *args, **kwargs)
        (short if out is not None else whole).append(tower)
        return out

    monkeypatch.setattr(module, name, spy)
    return short, whole


def _through_whole_block(module, name: str, method: str, monkeypatch) -> None:
    """The last block's gradient through the whole block again: the readout-row helper
    ``module.name`` turned away, and the towers run that block whole (no readout stop)."""
    monkeypatch.setattr(module, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(REGISTRY[method], "reads_readout_row", lambda *args: False)


def _ids_and_mask(adapter):
    batch = adapter.tokenize(TEXTS)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1
    return batch.input_ids, batch.attention_mask


@pytest.mark.parametrize("family,factory", LINEAR_FAMILIES)
@pytest.mark.parametrize("method", ["chefer", "grad_eclip"])
def test_last_block_gradient_through_its_readout_row_equals_the_whole_block(family, factory, method, monkeypatch):
    """chefer (default: the last block) and grad_eclip take the gradient at the last block's
    attention through the readout row alone on every tower that reads out a token with linear
    pieces, and never go back through the whole block there: the same maps and token scores as
    through the whole block (float64, kept blocks, 1e-12 of the scale)."""
    import cliplens.methods.chefer as chefer
    import cliplens.methods.grad_eclip as grad_eclip
    import cliplens.methods.pairs as pairs

    adapter = factory(seed=0, dtype=torch.float64)
    meth = REGISTRY[method]()
    if meth.unsupported(adapter, meth.towers, meth.parse_options({})):
        pytest.skip(f"{method} does not run on {family}")
    _kept_in_float64(monkeypatch)
    module = chefer if method == "chefer" else grad_eclip
    short, whole = _sort_towers(module, "readout_attention_gradients", monkeypatch)
    block_calls = []
    monkeypatch.setattr(chefer, "block_gradients", _counting(pairs.block_gradients, block_calls))
    have = cliplens.explain(adapter, IMAGES, TEXTS, method=method)
    assert sorted(set(short)) == SHORT_TOWERS[family]
    if method == "chefer":
        assert len(block_calls) == len(whole)  # the whole block only where the short way is shut
    _through_whole_block(module, "readout_attention_gradients", method, monkeypatch)
    want = cliplens.explain(adapter, IMAGES, TEXTS, method=method)
    _assert_same(have, want, 1e-12)


@pytest.mark.parametrize("family,factory", LINEAR_FAMILIES)
@pytest.mark.parametrize("start", [0, -2])
def test_chefer_from_an_earlier_block_enters_the_blocks_below_through_the_readout_row(
    family, factory, start, monkeypatch
):
    """chefer from an earlier start layer: the last block's readout row of Abar and the pairs'
    gradients at its input come from one product through that row
    (``readout_input_gradients(attention=True)``); the blocks below start from that input
    gradient. The same maps and token scores as through the whole block (float64, kept blocks,
    1e-12 of the scale), on exactly the towers that can take it."""
    import cliplens.methods.chefer as chefer
    import cliplens.methods.pairs as pairs

    adapter = factory(seed=0, dtype=torch.float64)
    _kept_in_float64(monkeypatch)
    short, whole = _sort_towers(chefer, "readout_input_gradients", monkeypatch)
    entered = []

    def spy(*args, entering_last=None, **kwargs):
        entered.append(entering_last is not None)
        return pairs.block_gradients(*args, entering_last=entering_last, **kwargs)

    monkeypatch.setattr(chefer, "block_gradients", spy)
    have = cliplens.explain(adapter, IMAGES, TEXTS, method="chefer", start_layer=start)
    assert sorted(set(short)) == SHORT_TOWERS[family]
    # every tower folds its blocks below, from the last block's input where it came through the row
    assert sum(entered) == len(short) and len(entered) == len(short) + len(whole)
    _through_whole_block(chefer, "readout_input_gradients", "chefer", monkeypatch)
    want = cliplens.explain(adapter, IMAGES, TEXTS, method="chefer", start_layer=start)
    _assert_same(have, want, 1e-12)


@pytest.mark.parametrize("family,factory", LINEAR_FAMILIES)
def test_gradcam_gradient_through_the_readout_row_equals_the_whole_block(family, factory, monkeypatch):
    """gradcam at the last block's input (the default) takes every pair's gradient through the
    block's readout row rebuilt from its input (keys and values of every token), on the image
    towers that read out a token with linear pieces: the same maps as through the whole block
    (float64, kept last block, 1e-12 of the scale); the whole block is never asked there."""
    import cliplens.methods.gradcam as gradcam
    import cliplens.methods.pairs as pairs

    adapter = factory(seed=0, dtype=torch.float64)
    _kept_in_float64(monkeypatch)
    short, whole = _sort_towers(gradcam, "readout_input_gradients", monkeypatch)
    asked = []
    monkeypatch.setattr(pairs.PairRuns, "pair_gradients", _counting(pairs.PairRuns.pair_gradients, asked))
    have = cliplens.explain(adapter, IMAGES, TEXTS, method="gradcam")
    assert bool(short) == ("image" in SHORT_TOWERS[family])
    assert len(asked) == len(whole)
    _through_whole_block(gradcam, "readout_input_gradients", "gradcam", monkeypatch)
    want = cliplens.explain(adapter, IMAGES, TEXTS, method="gradcam")
    for b in range(len(IMAGES)):
        for p in range(len(TEXTS)):
            w = want.extras["signed"][b][p]
            np.testing.assert_allclose(have.extras["signed"][b][p], w, rtol=0, atol=1e-12 * np.abs(w).max())


@pytest.mark.parametrize("target", ["probability", "contrast:1"])
@pytest.mark.parametrize("method", ["chefer", "grad_eclip", "gradcam"])
def test_readout_row_gradients_follow_every_target(method, target, monkeypatch):
    """Targets that read other prompts (softmax over the prompts, a contrast): the pairs'
    cotangents carry them into the readout row as into the whole block (CLIP, float64, kept
    last block, 1e-12 of the scale)."""
    import cliplens.methods.chefer as chefer
    import cliplens.methods.grad_eclip as grad_eclip
    import cliplens.methods.gradcam as gradcam

    adapter = ADAPTER_FACTORIES[0][1](seed=0, dtype=torch.float64)
    _kept_in_float64(monkeypatch)
    module = {"chefer": chefer, "grad_eclip": grad_eclip, "gradcam": gradcam}[method]
    name = "readout_input_gradients" if method == "gradcam" else "readout_attention_gradients"
    short, _ = _sort_towers(module, name, monkeypatch)
    have = cliplens.explain(adapter, IMAGES, TEXTS, method=method, target=target)
    assert short
    _through_whole_block(module, name, method, monkeypatch)
    want = cliplens.explain(adapter, IMAGES, TEXTS, method=method, target=target)
    # the scale of the whole call: a contrast of a prompt with itself explains 0 (rounding noise)
    pairs = [(b, p) for b in range(len(IMAGES)) for p in range(len(TEXTS))]
    scale = max(np.abs(want.grid_map(b, p)).max() for b, p in pairs)
    for b, p in pairs:
        np.testing.assert_allclose(have.grid_map(b, p), want.grid_map(b, p), rtol=0, atol=1e-12 * scale)
    if want.token_scores is not None:
        wt = np.nan_to_num(np.asarray(want.token_scores, dtype=np.float64))
        ht = np.nan_to_num(np.asarray(have.token_scores, dtype=np.float64))
        np.testing.assert_allclose(ht, wt, rtol=0, atol=1e-12 * np.abs(wt).max())


# ---- legrad's layer readouts: the short ways through a kept block ------------------------------

#: the towers legrad reads out by the mean of a kept block's output, with linear pieces (an image
#: tower with a class token: not SigLIP's pooling head; BLIP's attention never runs kept)
MEAN_POOLED_TOWERS = {"hf-clip": ["image"], "hf-siglip": [], "hf-siglip2": [], "hf-blip-itc": [], "open_clip": ["image"]}


@pytest.mark.parametrize("family,factory", LINEAR_FAMILIES)
def test_mlp_halves_make_the_mlp_branch_and_its_down_projection_is_affine(family, factory):
    """``mlp_down(mlp_hidden(z))`` is what the block's MLP branch adds (the block output from its
    middle residual, against the run's own); ``mlp_down`` is affine, which the mean-pooled
    gradient relies on to take its vector-Jacobian product at any point (float64, exact)."""
    adapter = factory(seed=0, dtype=torch.float64)
    images = adapter.prepare_images(IMAGES[:1])[0]
    with torch.no_grad():
        run = adapter.run_image(images.pixel_values)
        layer = len(run.block_inputs) - 1
        x = run.block_inputs[layer]
        heads = adapter.attention_values("image", layer, x)  # (rows, H, n, d), any heads will do
        z = x + adapter.attention_output("image", layer, heads.transpose(1, 2))
        hidden = adapter.mlp_hidden("image", layer, z)
        torch.testing.assert_close(
            adapter.mlp_down("image", layer, hidden), adapter.mlp_output("image", layer, z), rtol=0, atol=0
        )
        h1, h2 = torch.randn_like(hidden), torch.randn_like(hidden)
        down = lambda h: adapter.mlp_down("image", layer, h)  # noqa: E731
        mixed = down(0.3 * h1 + 1.9 * h2)
        torch.testing.assert_close(mixed, 0.3 * down(h1) + 1.9 * down(h2) - 1.2 * down(torch.zeros_like(h1)))


#: the towers whose layer readouts read one token's row of a kept block, with linear pieces (BLIP's
#: text blocks are post-norm: no linear pieces); with ``pooling="model"`` also these image towers
ROW_TOWERS = {
    "hf-clip": ["text"], "hf-siglip": ["text"], "hf-siglip2": ["text"], "hf-blip-itc": [], "open_clip": ["text"]
}
TOKEN_IMAGE_TOWERS = ("hf-clip", "open_clip")


@pytest.mark.parametrize(
    "family,factory,pooling,target",
    [
        pytest.param(*f.values, p, "logit", id=f"{f.id}-{p}", marks=f.marks)
        for f in LINEAR_FAMILIES
        for p in ("mean", "model")
    ]
    + [pytest.param(*LINEAR_FAMILIES[0].values, "mean", t, id=f"hf-clip-{t}") for t in ("probability", "contrast:1")],
)
def test_legrad_short_ways_equal_the_whole_blocks(family, factory, pooling, target, monkeypatch):
    """legrad's two short ways through a kept block, against the block's own backward (every
    block explained, float64, kept blocks, 1e-12 of the call's scale: maps, per-layer maps and
    token scores):

    - a mean-pooled readout gives every token's row of the block output the same cotangent, so
      it crosses the MLP's down-projection once per pair (``legrad.mean_pooled_gradients``);
      one prompt (one pair per image) keeps the block's own backward;
    - a readout token's layer readout reads the block at that token's row alone
      (``readout_attention_gradients`` at the layer, from the pairs' gradients at its readout).

    Each on exactly the towers that read out so."""
    import cliplens.methods.legrad as legrad

    adapter = factory(seed=0, dtype=torch.float64)
    _kept_in_float64(monkeypatch)
    pooled, _ = _sort_towers(legrad, "mean_pooled_gradients", monkeypatch)
    by_row, _ = _sort_towers(legrad, "readout_attention_gradients", monkeypatch)
    options = dict(method="legrad", layers=None, pooling=pooling, target=target)
    cliplens.explain(adapter, IMAGES, TEXTS[:1], **{**options, "target": "logit"})
    assert not pooled
    by_row.clear()
    have = cliplens.explain(adapter, IMAGES, TEXTS, **options)
    assert sorted(set(pooled)) == (MEAN_POOLED_TOWERS[family] if pooling == "mean" else [])
    image_rows = ["image"] if pooling == "model" and family in TOKEN_IMAGE_TOWERS else []
    assert sorted(set(by_row)) == sorted(ROW_TOWERS[family] + image_rows)
    monkeypatch.setattr(legrad, "mean_pooled_gradients", lambda *args, **kwargs: None)
    monkeypatch.setattr(legrad, "readout_attention_gradients", lambda *args, **kwargs: None)
    want = cliplens.explain(adapter, IMAGES, TEXTS, **options)
    pairs = [(b, p) for b in range(len(IMAGES)) for p in range(len(TEXTS))]
    scale = max(np.abs(want.grid_map(b, p)).max() for b, p in pairs)
    for b, p in pairs:
        np.testing.assert_allclose(have.grid_map(b, p), want.grid_map(b, p), rtol=0, atol=1e-12 * scale)
    for key in ("layer_maps", "text_layer_scores"):  # per pair: SigLIP 2 keeps each image's own grid
        w = [np.nan_to_num(np.asarray(want.extras[key][b][p], dtype=np.float64)) for b, p in pairs]
        h = [np.nan_to_num(np.asarray(have.extras[key][b][p], dtype=np.float64)) for b, p in pairs]
        top = max(np.abs(x).max() for x in w)
        for hp, wp in zip(h, w):
            np.testing.assert_allclose(hp, wp, rtol=0, atol=1e-12 * top)
