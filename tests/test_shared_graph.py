"""Methods that run each tower once over its distinct inputs and take the pairs' gradients as
batched vector-Jacobian products (``Method.shared_graph``) give the numbers of the per-pair-rows
path (the image repeated per prompt, the prompts per image, one backward): float64, 2 images
x 3 prompts, every dual-encoder family, every target kind, the default and the first block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
from cliplens.methods import REGISTRY
from conftest import ADAPTER_FACTORIES, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]
IMAGES = [random_image(1), random_image(2, size=(40, 64))]

#: method -> the option naming its first block with a gradient
FIRST_BLOCK = {"chefer": "start_layer", "gradcam": "layer", "legrad": "layers", "sensitivity": None, "grad_eclip": None}
SHARED = [name for name, cls in REGISTRY.items() if cls.shared_graph]


def test_every_shared_method_is_covered():
    assert set(SHARED) == set(FIRST_BLOCK)


def _close(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-10) -> None:
    """Equal to ``tol`` of the largest magnitude over the whole call (a contrast of a prompt
    with itself is 0 and its maps rounding noise), NaN where the other is NaN."""
    scale = max(np.nanmax(np.abs(x), initial=0.0) for x in b)  # 0 where all are NaN (no scores)
    for x, y in zip(a, b):
        assert np.array_equal(np.isnan(x), np.isnan(y))
        assert np.nanmax(np.abs(x - y), initial=0.0) <= tol * scale


#: the open_clip family runs in the open_clip suite (`pytest -m open_clip`, its own environment)
FAMILIES = [
    pytest.param(factory, id=name, marks=[pytest.mark.open_clip] if name == "open_clip" else [])
    for name, factory in ADAPTER_FACTORIES
]


def _same_results(shared, rows) -> None:
    """Two explanations of IMAGES x TEXTS agree: maps, token scores, every extra, the pair
    logits and the explained values."""
    pairs = [(b, p) for b in range(2) for p in range(3)]
    _close([shared.grid_map(b, p) for b, p in pairs], [rows.grid_map(b, p) for b, p in pairs])
    if rows.token_scores is not None:
        _close([shared.token_scores], [rows.token_scores])
    assert set(shared.extras) == set(rows.extras)
    for key in rows.extras:
        _close([np.asarray(shared.extra(key, b)) for b in range(2)], [np.asarray(rows.extra(key, b)) for b in range(2)])
    _close([shared.logits], [rows.logits], 1e-12)
    _close([shared.target_values], [rows.target_values], 1e-12)


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return request.param(seed=0, dtype=torch.float64)


@pytest.mark.parametrize("method", SHARED)
@pytest.mark.parametrize("first", [None, "all"])
@pytest.mark.parametrize("target", ["logit", "probability", "contrast:cat"])
def test_shared_graph_equals_per_pair_rows(adapter, method, first, target, monkeypatch):
    cls = REGISTRY[method]
    # "all": from the first block (legrad: every block, the empty-prompt correction on too;
    # sensitivity, whose graph always starts at the input: its other shared variant)
    opts = {} if first is None else {FIRST_BLOCK[method]: None if method == "legrad" else 0}
    if method == "legrad" and first is not None:
        opts["correction"] = "on"
    if method == "sensitivity":
        opts = {} if first is None else {"variant": "grad_x_input"}
    if method == "sensitivity" and target == "logit":  # the pixel variant, once per family
        opts = {"variant": "pixel_grad"} if first is not None else opts
    if method == "grad_eclip" and first is not None:
        pytest.skip("grad_eclip has no first-block option (always the last block)")
    if cls().unsupported(adapter, cls.towers, cls().parse_options(opts)):
        pytest.skip(f"{method} does not explain this family")
    shared = cliplens.explain(adapter, IMAGES, TEXTS, method=method, target=target, **opts)
    monkeypatch.setattr(cls, "shared_graph", False)
    rows = cliplens.explain(adapter, IMAGES, TEXTS, method=method, target=target, **opts)
    _same_results(shared, rows)


@pytest.mark.parametrize("method", SHARED)
def test_shared_graph_in_bfloat16_follows_float32(method):
    """The batched products run in bfloat16 too (relevance accumulated in float32): finite maps
    that follow float32's on the same weights (tiny CLIP; measured r >= 0.998)."""
    from families import hf_clip_factory

    half = cliplens.explain(hf_clip_factory(seed=0, dtype=torch.bfloat16), IMAGES, TEXTS, method=method)
    full = cliplens.explain(hf_clip_factory(seed=0, dtype=torch.float32), IMAGES, TEXTS, method=method)
    x = np.concatenate([np.ravel(half.grid_map(b, p)) for b in range(2) for p in range(3)]).astype(np.float64)
    y = np.concatenate([np.ravel(full.grid_map(b, p)) for b in range(2) for p in range(3)]).astype(np.float64)
    assert np.isfinite(x).all()
    assert np.corrcoef(x, y)[0, 1] > 0.99


# ---- fusion models whose encoders run alone before image and text meet ------------------------

from families import FUSION_FACTORIES  # noqa: E402

SHARING = [(name, f) for name, f in FUSION_FACTORIES if name in ("hf-blip-itm", "hf-blip2-itm", "hf-bridgetower-itm")]


def _per_pair_rows(adapter, monkeypatch) -> None:
    """Every part of the model once per pair from here on (the path before sharing)."""
    monkeypatch.setattr(type(adapter), "shares_image", False)
    monkeypatch.setattr(type(adapter), "shares_text", False)


def test_the_sharing_fusion_families_are_the_ones_that_declare_it():
    shares = {name for name, f in FUSION_FACTORIES if f().shares_image or f().shares_text}
    assert shares == {name for name, _ in SHARING}


@pytest.mark.parametrize("family,factory", SHARING, ids=[n for n, _ in SHARING])
@pytest.mark.parametrize("method", ["chefer", "gradcam", "raw_attention"])
@pytest.mark.parametrize("target", ["logit", "probability"])
def test_encoders_once_per_input_equal_once_per_pair(family, factory, method, target, monkeypatch):
    """BLIP and BLIP-2 run their ViT once per image, BridgeTower its two uni-modal encoders once
    per image and once per prompt (every link to the cross-modal layers reads per-pair copies);
    chefer's events there get their per-pair gradients as batched products through the one
    graph, block by block. The same numbers as every part run once per pair, float64."""
    adapter = factory(seed=0, dtype=torch.float64)
    cls = REGISTRY[method]
    if cls().unsupported(adapter, cls.towers, cls().parse_options({})):
        pytest.skip(f"{method} does not explain {family}")
    shared = cliplens.explain(adapter, IMAGES, TEXTS, method=method, target=target)
    _per_pair_rows(adapter, monkeypatch)
    rows = cliplens.explain(adapter, IMAGES, TEXTS, method=method, target=target)
    _same_results(shared, rows)


@pytest.mark.parametrize("head", ["match", "answer"])
@pytest.mark.parametrize("method", ["chefer", "gradcam", "raw_attention"])
@pytest.mark.parametrize("target", ["logit", "probability"])
def test_lxmert_encoders_once_per_input_equal_once_per_pair(head, method, target, monkeypatch):
    """LXMERT's language and object-relationship encoders run once per prompt and once per
    region image; the cross-modality layers read per-pair copies of their outputs. The same
    numbers as every pair its own row, float64, 2 region images x 3 prompts, both heads."""
    from families import hf_lxmert_factory, random_regions

    adapter = hf_lxmert_factory(dtype=torch.float64, head=head, r_layers=2)
    assert adapter.shares_image and adapter.shares_text
    images = [random_regions(0, regions=4), random_regions(1, regions=4)]
    shared = cliplens.explain(adapter, images, TEXTS, method=method, target=target)
    _per_pair_rows(adapter, monkeypatch)
    rows = cliplens.explain(adapter, images, TEXTS, method=method, target=target)
    _same_results(shared, rows)


@pytest.mark.parametrize("method", ["chefer", "gradcam"])
def test_bridgetower_links_above_unlinked_blocks(method, monkeypatch):
    """Four uni-modal layers per encoder and two cross-modal layers: the links read blocks 2 and
    3, and the batched products carry their cotangents on down through blocks 1 and 0. The same
    numbers as every pair its own row, float64."""
    from families import hf_bridgetower_factory

    adapter = hf_bridgetower_factory(seed=0, dtype=torch.float64, unimodal_layers=4)
    shared = cliplens.explain(adapter, IMAGES, TEXTS, method=method)
    _per_pair_rows(adapter, monkeypatch)
    rows = cliplens.explain(adapter, IMAGES, TEXTS, method=method)
    _same_results(shared, rows)


def test_shared_events_have_one_row_per_distinct_input():
    """What the sharing families' runs hold: BridgeTower's uni-modal events one row per image or
    prompt, each link read off its block, the cross-modal events one row per pair."""
    from families import hf_bridgetower_factory

    adapter = hf_bridgetower_factory(seed=0, dtype=torch.float64, unimodal_layers=3)
    images = adapter.prepare_images(IMAGES)
    texts = adapter.tokenize(TEXTS)
    (group,) = images
    with adapter.explaining():
        run = adapter.run_grid(group, texts)
    B, P = len(IMAGES), len(TEXTS)
    rows = {"image": B, "text": P, None: B * P}
    assert [e.probs.shape[0] for e in run.events] == [rows[e.shared] for e in run.events]
    assert {e.shared for e in run.events if e.stack != "cross"} == {"image", "text"}
    parts = {part.tower: part for part in run.shared}
    assert parts["image"].copies == P and parts["text"].copies == B
    for part in parts.values():
        assert part.taps == [1, 2]  # the two links: after uni-modal block 1, then block 2
        assert all(leaf.shape[0] == B * P for leaf in part.leaves)
    # pair row b*P + p reads image b and prompt p
    image_out, text_out = parts["image"].outputs[0], parts["text"].outputs[0]
    for b in range(B):
        for p in range(P):
            torch.testing.assert_close(parts["image"].leaves[0][b * P + p], image_out[b], rtol=0, atol=0)
            torch.testing.assert_close(parts["text"].leaves[0][b * P + p], text_out[p], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["chefer", "raw_attention"])
@pytest.mark.parametrize("target", ["logit", "probability"])
def test_detr_runs_once_per_image_for_every_class_asked(method, target, monkeypatch):
    """DETR's prompts only pick the class (and so the query) read out: the detector runs once per
    image, and chefer's events get each pair's gradient by one batched product through it. The
    same numbers as one detector run per (image, class), float64, 2 images x 3 classes."""
    from families import DETR_LABELS, hf_detr_factory

    adapter = hf_detr_factory(seed=0, dtype=torch.float64)
    assert adapter.shares_image
    labels = DETR_LABELS[:3]
    shared = cliplens.explain(adapter, IMAGES, labels, method=method, target=target)
    _per_pair_rows(adapter, monkeypatch)
    rows = cliplens.explain(adapter, IMAGES, labels, method=method, target=target)
    _same_results(shared, rows)
