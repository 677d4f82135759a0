"""Grad-ECLIP: the adapters' per-head queries and keys rebuild the captured attention; the map is
the gradient at the last attention output x values x min-max q-k affinity (float64 oracle in
tests/oracles.py, run on every family by test_oracles.py); towers without a readout token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cliplens
from conftest import ADAPTER_FACTORIES, random_image
from oracles import oracle_grad_eclip

FAMILIES = [
    pytest.param(factory, id=name, marks=[pytest.mark.open_clip] if name == "open_clip" else [])
    for name, factory in ADAPTER_FACTORIES
]


@pytest.mark.parametrize("factory", FAMILIES)
def test_attention_qk_rebuilds_the_attention(factory):
    adapter = factory(seed=0, dtype=torch.float64)
    batch = adapter.tokenize(["a red triangle", "cat"])
    pixels = adapter.prepare_images([random_image(2)])[0].pixel_values
    with adapter.explaining(), torch.no_grad():
        runs = [adapter.run_image(pixels), adapter.run_text(batch.input_ids, batch.attention_mask)]
        for run in runs:
            for l, (x, A) in enumerate(zip(run.block_inputs, run.attentions)):
                if "linear_split" not in adapter.capabilities(run.tower):
                    continue
                q, k = adapter.attention_qk(run.tower, l, x)
                assert q.shape == k.shape and q.shape[:3] == A.shape[:3]
                scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
                # rows of the readout token over the tokens it can see (causal text: up to itself)
                for i, r in enumerate(run.layout.readout.tolist()):
                    if r < 0:
                        r = 0  # no readout token: any row (no mask on an image tower)
                    cols = run.layout.valid[i].clone()
                    if run.tower == "text":
                        seen = A[i, 0, r] > 0
                        cols = cols & seen
                    want = A[i, :, r][:, cols]
                    got = scores[i, :, r][:, cols].softmax(-1)
                    if run.tower == "text":  # the attention's own normalisation over what it sees
                        got = scores[i, :, r].masked_fill(~(A[i, 0, r] > 0), float("-inf")).softmax(-1)[:, cols]
                    # (transformers takes the softmax in float32: 1e-6 relative)
                    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-9)


def test_grad_eclip_clip_map_is_nontrivial_and_prompt_dependent():
    from conftest import hf_clip_factory

    adapter = hf_clip_factory(dtype=torch.float64)
    ex = cliplens.explain(adapter, [random_image(1)], ["a red triangle", "cat"], method="grad_eclip")
    assert ex.image_maps.shape == (1, 2, 4, 4) and np.all(ex.image_maps >= 0)
    assert np.ptp(ex.image_maps) > 0 and not np.allclose(ex.image_maps[0, 0], ex.image_maps[0, 1])
    aff = np.asarray(ex.extras["affinity"])
    assert aff.min() >= 0 and aff.max() <= 1
    assert np.isfinite(ex.token_scores[0, 0, : len(ex.tokens[0])]).all()


def test_grad_eclip_siglip_image_refused_text_explained():
    from conftest import hf_siglip_factory

    adapter = hf_siglip_factory(dtype=torch.float64)
    images, texts = [random_image(1)], ["a cat", "two dogs"]
    with pytest.raises(cliplens.InputError, match="grad_eclip"):
        cliplens.explain(adapter, images, texts, method="grad_eclip")
    ex = cliplens.explain(adapter, images, texts, method="grad_eclip", towers=["text"])
    _, ref = oracle_grad_eclip(adapter, images, texts, towers=("text",))
    for p in range(2):
        t = len(ex.tokens[p])
        np.testing.assert_allclose(ex.token_scores[0, p, :t], ref[0, p, :t], rtol=1e-6, atol=1e-10)
    assert np.nanmax(ex.token_scores) > 0


def test_min_max_over_constant_and_masked_columns():
    from cliplens.methods.grad_eclip import min_max_over

    x = torch.tensor([[[1.0, 3.0, 2.0, 9.0], [5.0, 5.0, 5.0, 0.0]]])
    keep = torch.tensor([[True, True, True, False]])
    out = min_max_over(x, keep)
    assert out.tolist() == [[[0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]]
