"""Every method against its slow float64 oracle (tests/oracles.py), on a tiny model of every
family that can express it: the oracle registry is keyed by method, the family list is
conftest.ADAPTER_FACTORIES, and the pairs that run are those the method's capability flags
allow (a refused pair is checked as a one-line refusal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
from cliplens.methods import REGISTRY
from conftest import ADAPTER_FACTORIES, random_image
from oracles import ORACLES

TEXTS = ["a red triangle", "cat"]
IMAGES = [random_image(3), random_image(4, size=(40, 56))]

CASES = [
    ("chefer", {}),
    ("chefer", {"start_layer": 0}),
    ("chefer", {"target": "probability"}),
    ("rollout", {}),
    ("rollout", {"start_layer": 1}),
    ("raw_attention", {}),
    ("raw_attention", {"layer": 0}),
    ("gradcam", {}),
    ("gradcam", {"layer": 0, "target": "probability"}),
    ("legrad", {}),
    ("legrad", {"layers": None, "pooling": "model", "correction": "off"}),
    ("legrad", {"correction": "on", "correction_threshold": 0.5}),
    ("legrad", {"target": "probability"}),
    ("grad_eclip", {}),
    ("grad_eclip", {"target": "probability"}),
    ("sensitivity", {}),
    ("sensitivity", {"variant": "grad_x_input"}),
]

FAMILIES = [
    pytest.param((name, factory), id=name, marks=[pytest.mark.open_clip] if name == "open_clip" else [])
    for name, factory in ADAPTER_FACTORIES
]


@pytest.fixture(scope="module", params=FAMILIES)
def adapter64(request):
    name, factory = request.param
    return factory(seed=0, dtype=torch.float64)


def test_every_method_has_an_oracle_or_a_dedicated_test():
    # decomposition and interactions have their own float64 oracles over the linear pieces
    # (test_methods_decomposition, test_methods_interactions)
    dedicated = {"decomposition", "interactions", "jacobian_interactions"}
    assert set(ORACLES) | dedicated == {m for m in REGISTRY if not m.startswith("_")}


def _close(have, want, what):
    have, want = np.asarray(have, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert have.shape == want.shape, what
    scale = np.nanmax(np.abs(want)) + 1e-300
    np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


@pytest.mark.parametrize("method,kwargs", CASES, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for m, kw in CASES])
def test_method_matches_its_float64_oracle(adapter64, method, kwargs):
    meth = REGISTRY[method]()
    options = {k: v for k, v in kwargs.items() if k != "target"}
    if meth.unsupported(adapter64, meth.towers, meth.parse_options(options)):
        with pytest.raises(cliplens.InputError):
            cliplens.explain(adapter64, IMAGES, TEXTS, method=method, **kwargs)
        return
    ex = cliplens.explain(adapter64, IMAGES, TEXTS, method=method, **kwargs)
    ref_maps, ref_tokens = ORACLES[method](adapter64, IMAGES, TEXTS, **kwargs)
    if ref_maps is not None:
        for b in range(len(IMAGES)):
            for p in range(len(TEXTS)):
                _close(ex.image_maps[b][p], ref_maps[b][p], f"image map {b},{p}")
    if ref_tokens is not None:
        T = ref_tokens.shape[-1]
        for b in range(len(IMAGES)):
            for p in range(len(TEXTS)):
                t = len(ex.tokens[p])
                _close(ex.token_scores[b, p, :t], ref_tokens[b, p, :t], f"tokens {b},{p}")
                assert np.isnan(ref_tokens[b, p, t:T]).all()
