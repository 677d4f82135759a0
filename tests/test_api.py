"""The public entry points: the request is validated once, before any model loads; per-image
results of mixed grids (resize="full") keep every method extra; similarity uses the one pair
formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
from cliplens.api import ExplainRequest
from cliplens.targets import PairScores
from conftest import hf_clip_factory, random_image

WIDE, TALL = random_image(1, size=(64, 32)), random_image(2, size=(32, 48))
TEXTS = ["a red circle", "a dog"]


@pytest.fixture(scope="module")
def adapter():
    return hf_clip_factory(seed=0)


@pytest.mark.parametrize(
    "method,options,extra",
    [
        ("legrad", {}, "layer_maps"),
        ("sensitivity", {"variant": "pixel_grad"}, "pixel_saliency"),
        ("gradcam", {}, "signed"),
    ],
)
def test_mixed_grids_keep_extras_per_image(adapter, method, options, extra):
    """resize="full" with two aspect ratios gives two grids: grid-shaped extras are kept per
    image, as the maps are (they were silently dropped), and equal the one-image results."""
    ex = cliplens.explain(adapter, [WIDE, TALL], TEXTS, method=method, resize="full", **options)
    assert isinstance(ex.image_maps, list)
    assert isinstance(ex.extras[extra], list) and len(ex.extras[extra]) == 2
    for b, img in enumerate([WIDE, TALL]):
        one = cliplens.explain(adapter, img, TEXTS, method=method, resize="full", **options)
        assert ex.extras[extra][b].shape == one.extras[extra][0].shape
        scale = np.abs(one.extras[extra][0]).max()
        np.testing.assert_allclose(ex.extras[extra][b], one.extras[extra][0], rtol=1e-4, atol=1e-5 * scale)
    # extras that are not grid-shaped stay one array
    if method == "legrad":
        assert isinstance(ex.extras["text_layer_scores"], np.ndarray)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"method": "nope"}, "unknown method"),
        ({"method": "chefer", "start_layer": "abc"}, "start_layer must be an integer"),
        ({"method": "chefer", "start_layer": True}, "start_layer must be an integer"),
        ({"method": "raw_attention", "layer": "last"}, "layer must be an integer"),
        ({"method": "legrad", "layers": 0}, "layers must be a positive integer"),
        ({"method": "legrad", "pooling": "max"}, "pooling must be one of model, mean"),
        ({"method": "sensitivity", "variant": "x"}, "variant must be one of"),
        ({"method": "sensitivity", "step_size": -1}, "step_size must be a positive number"),
        ({"method": "chefer", "bogus": 1}, "has no option 'bogus'"),
        ({"method": "gradcam", "towers": ["text"]}, "gives no text map"),
        ({"method": "chefer", "resize": "crop"}, "resize must be"),
        ({"method": "chefer", "target": "contrast:zebra"}, "not among the prompts"),
    ],
)
def test_bad_requests_fail_before_the_model_loads(kwargs, fragment):
    # the model spec would fail to load: the request error must come first
    with pytest.raises(cliplens.InputError, match=fragment):
        cliplens.explain("/no/such/model", [WIDE], TEXTS, **kwargs)


def test_towers_as_a_string_is_one_tower(adapter):
    req = ExplainRequest.build(TEXTS, "chefer", towers="image")
    assert req.towers == ("image",)
    ex = cliplens.explain(adapter, WIDE, TEXTS, method="chefer", towers="image")
    assert ex.token_scores is None and ex.image_maps is not None


def test_similarity_is_the_explained_logit(adapter):
    """similarity(), the reported logits and the logit target are one formula: equal bit for
    bit on the same embeddings."""
    logits, probs = cliplens.similarity(adapter, [WIDE, TALL], TEXTS)
    ex = cliplens.explain(adapter, [WIDE, TALL], TEXTS, method="rollout")
    np.testing.assert_array_equal(ex.logits, ex.target_values)
    np.testing.assert_allclose(logits, ex.logits, rtol=1e-6, atol=1e-6 * np.abs(logits).max())
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)


def test_pair_scores_against_float64_oracle():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    scores = PairScores(torch.tensor(7.0, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64), "sigmoid")
    want = np.array(
        [[7.0 * (a @ b) / np.linalg.norm(a) / np.linalg.norm(b) - 1.5 for b in txt.numpy()] for a in img.numpy()]
    )
    np.testing.assert_allclose(scores.table(img, txt).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(scores.against(img, txt).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(scores.probs(scores.table(img, txt)).numpy(), 1 / (1 + np.exp(-want)), rtol=1e-12)


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("chefer", {}),  # logit target: the prompts are split
        ("legrad", {"target": "probability"}),  # a target over every prompt: the images are split
        ("decomposition", {}),  # an extra without a prompt axis
        ("interactions", {}),
    ],
)
def test_chunks_give_the_numbers_of_one_batch(adapter, method, kwargs):
    """max_pairs bounds the pairs per forward/backward; the result is the one-batch result."""
    images = [WIDE, TALL, random_image(3)]
    texts = ["a red circle", "a dog", "two cats", "a blue star", "cat"]
    whole = cliplens.explain(adapter, images, texts, method=method, **kwargs)
    parts = cliplens.explain(adapter, images, texts, method=method, max_pairs=2, **kwargs)
    np.testing.assert_allclose(parts.logits, whole.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts.probs, whole.probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(parts.target_values, whole.target_values, rtol=1e-5, atol=1e-6)
    for b in range(len(images)):
        scale = np.abs(whole.image_maps[b]).max()
        np.testing.assert_allclose(parts.image_maps[b], whole.image_maps[b], rtol=1e-4, atol=1e-5 * scale)
    if whole.token_scores is not None:
        scale = np.nanmax(np.abs(whole.token_scores))
        np.testing.assert_allclose(parts.token_scores, whole.token_scores, rtol=1e-4, atol=1e-5 * scale)
    assert parts.extras.keys() == whole.extras.keys()
    for key in whole.extras:
        if "delta_" in key:  # completeness errors are rounding noise: both stay at it
            assert np.nanmax(parts.extras[key]) < 1e-4
            continue
        for a, w in zip(parts.extras[key], whole.extras[key]):
            scale = np.nanmax(np.abs(w)) + 1e-12
            np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5 * scale, err_msg=key)


def test_max_pairs_must_be_positive():
    with pytest.raises(cliplens.InputError, match="max_pairs"):
        cliplens.explain("/no/such/model", [WIDE], TEXTS, max_pairs=0)
