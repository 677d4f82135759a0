"""Blocks before the first explained one run the fused attention kernel (SDPA), whose
probabilities no method reads; the explained blocks stay eager. The results equal an all-eager
run on every transformers dual-encoder family whose attention dispatches on its config: CLIP
(the text tower's causal and padding mask, built for the eager path, read by SDPA), SigLIP and
SigLIP 2 (its patch mask).

float32 only: in float64 the towers stay eager (transformers' eager softmax runs in float32,
SDPA in float64, and the float64 oracles and golden files read the eager blocks). The tiny
models' sharpened attention amplifies float32 rounding to at most 5.4e-4 of a map's scale
(measured, SigLIP 2); a mask read wrongly moves the maps by a large fraction of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
import cliplens.adapters.hf_encoder as hf_encoder
from families import ADAPTER_FACTORIES, random_image

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = [random_image(1), random_image(2, size=(40, 64))]
TEXTS = ["a red triangle", "a photo of a small dog", "cat"]  # padded in one batch
FUSED = [(name, f) for name, f in ADAPTER_FACTORIES if name in ("hf-clip", "hf-siglip", "hf-siglip2")]


@pytest.mark.parametrize("family,factory", FUSED, ids=[n for n, _ in FUSED])
@pytest.mark.parametrize("method,options", [("chefer", {}), ("chefer", {"start_layer": 1}), ("legrad", {}), ("gradcam", {})])
def test_fused_blocks_before_the_explained_ones_change_no_map(family, factory, method, options, monkeypatch):
    adapter = factory(seed=0, dtype=torch.float32)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    fused = cliplens.explain(adapter, IMAGES, TEXTS, method=method, **options)
    assert calls, "no block ran the fused kernel"
    monkeypatch.setattr(hf_encoder, "IMPLEMENTATION", dict.fromkeys(hf_encoder.IMPLEMENTATION, "eager"))
    calls.clear()
    eager = cliplens.explain(adapter, IMAGES, TEXTS, method=method, **options)
    assert not calls
    for b in range(len(IMAGES)):
        for p in range(len(TEXTS)):
            want = eager.grid_map(b, p)
            scale = np.nanmax(np.abs(want))
            np.testing.assert_allclose(fused.grid_map(b, p), want, rtol=0, atol=5e-3 * scale)
            if eager.token_scores is not None:
                want = np.asarray(eager.token_scores[b][p], dtype=np.float64)
                have = np.asarray(fused.token_scores[b][p], dtype=np.float64)
                np.testing.assert_allclose(have, want, rtol=0, atol=5e-3 * (np.nanmax(np.abs(want)) + 1e-12))


def test_float64_towers_stay_eager(monkeypatch):
    """The oracles' and the golden files' dtype: no block runs the fused kernel."""
    adapter = ADAPTER_FACTORIES[0][1](seed=0, dtype=torch.float64)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    cliplens.explain(adapter, IMAGES, TEXTS, method="chefer")
    assert not calls
