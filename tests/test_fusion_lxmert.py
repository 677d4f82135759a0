"""LXMERT (hf-lxmert): co-attention over region features, the bi-modal rules' own case.

The oracle is written from the equations on the transformers model itself: a deep copy, one
pair at a time, float64, with forward hooks of the test's own on every attention module's
dropout (in eval mode its output is the tensor that multiplies the values) and
``torch.autograd.grad`` at those tensors; the rules run on full matrices in plain loops, in
the order the source code runs the layers. Nothing of cliplens' engine is used.

LXMERT reads RegionImage inputs, never the pictures the contract tests give every family, so
its contract (shapes, finite values, batch against single, the model left as found, one-line
refusals) is checked here."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters.hf_lxmert import HFLxmertAdapter
from cliplens.errors import InputError, ModelLoadError
from cliplens.regions import RegionImage, paint_regions
from families import (
    hf_clip_factory,
    hf_lxmert_factory,
    make_tiny_lxmert,
    random_image,
    random_regions,
    word_tokenizer,
)
from helpers import model_state

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a red circle", "the big dog and a small cat", "cat"]  # different lengths: padding in a batch


def regions():
    """Two region images with different numbers of regions (two batches), one given with its
    picture and one by its size only."""
    return [random_regions(0, regions=3), random_regions(1, regions=5, size=(160, 120), with_image=False)]


@pytest.fixture(scope="module")
def lx64():
    return hf_lxmert_factory(dtype=torch.float64)


@pytest.fixture(scope="module")
def qa64():
    return hf_lxmert_factory(dtype=torch.float64, head="answer")


# ---- the oracle --------------------------------------------------------------------------------


def roles(model) -> list[str]:
    """What each attention call is, in the order LxmertEncoder.forward makes them: the language
    layers (text self), the relationship layers (image self), then per cross-modality layer
    visual_attention twice (text -> image, image -> text), lang_self_att, visn_self_att."""
    cfg = model.config
    return ["tt"] * cfg.l_layers + ["ii"] * cfg.r_layers + ["ti", "it", "tt", "ii"] * cfg.x_layers


def attention_and_gradients(adapter, region: RegionImage, text: str, head: str):
    """([(role, A (H, q, k), dy/dA)], y) of ONE pair through the model's own forward."""
    model = copy.deepcopy(adapter.model).eval().requires_grad_(True)
    ids = adapter.tokenize([text]).input_ids
    kept = []
    handles = [
        m.dropout.register_forward_hook(lambda mod, args, out: kept.append(out))
        for m in model.modules()
        if type(m).__name__ == "LxmertAttention"
    ]
    try:
        out = model(
            input_ids=ids,
            visual_feats=region.features.to(torch.float64)[None],
            visual_pos=torch.from_numpy(region.normalized_boxes())[None],
            attention_mask=torch.ones_like(ids),
        )
    finally:
        for h in handles:
            h.remove()
    if head == "match":
        s = out.cross_relationship_score[0]
        y = s[1] - s[0]
    else:
        y = out.question_answering_score[0].max()
    grads = torch.autograd.grad(y, kept, allow_unused=True)
    names = roles(model)
    assert len(kept) == len(names)
    T, n = ids.shape[1], region.num_regions
    size = {"t": T, "i": n}
    events = []
    for role, a, g in zip(names, kept, grads):
        assert a.shape[-2:] == (size[role[0]], size[role[1]]), role
        events.append((role, a.detach()[0], torch.zeros_like(a[0]) if g is None else g[0]))
    return events, float(y.detach())


def rbar(R: torch.Tensor, policy: str) -> tuple[torch.Tensor, int]:
    """Eq. 8-9 row by row; (Rbar, number of rows of R - I that sum to 0). Such a row is e_i
    (identity) or 0/0 = NaN (reference)."""
    n = R.shape[0]
    eye = torch.eye(n, dtype=R.dtype)
    out, count = eye.clone(), 0
    for i in range(n):
        hat = R[i] - eye[i]
        total = hat.sum()
        if float(total) == 0.0:
            count += 1
            if policy == "identity":
                continue
        out[i] = hat / total + eye[i]
    return out, count


def oracle_chefer(adapter, region, text, head="match", policy="identity", schedule="all"):
    """(region row (R,), token row (T,), degenerate rows, y) of one pair from the rules.
    ``schedule="reference"`` skips the last cross-modality layer's image-side events, as the
    reference generator does."""
    events, y = attention_and_gradients(adapter, region, text, head)
    T = adapter.tokenize([text]).input_ids.shape[1]
    n = region.num_regions
    f64 = torch.float64
    R = {"tt": torch.eye(T, dtype=f64), "ii": torch.eye(n, dtype=f64)}
    R["ti"], R["it"] = torch.zeros(T, n, dtype=f64), torch.zeros(n, T, dtype=f64)
    degenerate = 0
    abar = lambda a, g: (g * a).clamp(min=0).mean(dim=0)

    def self_rule(s, A):  # R_ss += A R_ss, R_sq += A R_sq
        q = "i" if s == "t" else "t"
        R[s + s], R[s + q] = R[s + s] + A @ R[s + s], R[s + q] + A @ R[s + q]

    x_layers = adapter.model.config.x_layers
    x_first = len(events) - 4 * x_layers
    for e in events[:x_first]:
        self_rule(e[0][0], abar(e[1], e[2]))
    for j in range(x_layers):
        (_, a_ti, g_ti), (_, a_it, g_it), (_, a_tt, g_tt), (_, a_ii, g_ii) = events[
            x_first + 4 * j : x_first + 4 * j + 4
        ]
        last = j == x_layers - 1
        pre = dict(R)  # both cross directions read the state before the layer
        directions = [("t", "i", abar(a_ti, g_ti))]
        if not (last and schedule == "reference"):
            directions.append(("i", "t", abar(a_it, g_it)))
        for s, q, A in directions:
            bar_s, c_s = rbar(pre[s + s], policy)
            bar_q, c_q = rbar(pre[q + q], policy)
            degenerate += c_s + c_q
            cross = bar_s.T @ A @ bar_q
            if policy == "reference":
                cross = torch.nan_to_num(cross, nan=0.0)
            R[s + q] = R[s + q] + cross
            R[s + s] = R[s + s] + A @ pre[q + s]
        self_rule("t", abar(a_tt, g_tt))
        if not (last and schedule == "reference"):
            self_rule("i", abar(a_ii, g_ii))
    return R["ti"][0].numpy(), R["tt"][0].numpy(), degenerate, y


def rel(have, want) -> float:
    have, want = np.asarray(have, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(have - want).max() / np.abs(want).max())


# ---- chefer against the oracle -------------------------------------------------------------------


@pytest.mark.parametrize("head", ["match", "answer"])
def test_chefer_matches_float64_oracle(head, lx64, qa64):
    adapter = lx64 if head == "match" else qa64
    imgs = regions()
    ex = cliplens.explain(adapter, imgs, TEXTS, method="chefer")
    assert isinstance(ex.image_maps, list)  # 3 and 5 regions: one (P, 1, R) array per image
    for b, region in enumerate(imgs):
        assert ex.image_maps[b].shape == (len(TEXTS), 1, region.num_regions)
        for p, text in enumerate(TEXTS):
            regions_row, tokens_row, degenerate, y = oracle_chefer(adapter, region, text, head)
            assert np.abs(regions_row).max() > 1e-6  # the regions really reach [CLS]
            assert rel(ex.image_maps[b][p, 0], regions_row) < 1e-6
            t = len(ex.tokens[p])
            assert rel(ex.token_scores[b, p, :t], tokens_row) < 1e-6
            assert np.isnan(ex.token_scores[b, p, t:]).all()
            assert ex.extras["degenerate_rows"][b][p] == degenerate
            assert ex.logits[b, p] == pytest.approx(y, rel=1e-10, abs=1e-12)
            assert ex.probs[b, p] == pytest.approx(1.0 / (1.0 + np.exp(-y)), rel=1e-10)
            # the reference's schedule (no image-side events in the last layer) reads the same rows
            ref_regions, ref_tokens, _, _ = oracle_chefer(adapter, region, text, head, schedule="reference")
            assert rel(ref_regions, regions_row) < 1e-12 and rel(ref_tokens, tokens_row) < 1e-12


def test_degenerate_rows_with_and_without_relationship_layers():
    """The image stream starts from R_ii = I plus the relationship layers. Without them
    (r_layers=0) every row of R_ii - I sums to 0 when the first cross-modality layer reads it
    (both directions): the identity policy counts them and reads them as e_i; the reference
    policy's 0/0 makes that layer's cross terms NaN, zeroed as the reference generators do."""
    region, text = random_regions(2, regions=4), TEXTS[1]
    with_r = hf_lxmert_factory(seed=1, dtype=torch.float64)
    ex = cliplens.explain(with_r, region, text, method="chefer")
    assert ex.extras["degenerate_rows"][0, 0] == oracle_chefer(with_r, region, text)[2]
    bare = hf_lxmert_factory(seed=1, dtype=torch.float64, r_layers=0)
    got = {}
    for policy in ("identity", "reference"):
        got[policy] = cliplens.explain(bare, region, text, method="chefer", degenerate_rows=policy)
        regions_row, tokens_row, degenerate, _ = oracle_chefer(bare, region, text, policy=policy)
        assert rel(got[policy].image_maps[0, 0, 0], regions_row) < 1e-6
        assert rel(got[policy].token_scores[0, 0, : len(tokens_row)], tokens_row) < 1e-6
        assert got[policy].extras["degenerate_rows"][0, 0] == degenerate >= 2 * region.num_regions
    assert rel(got["identity"].image_maps, got["reference"].image_maps) > 1e-3  # the policies differ here


# ---- the capture -----------------------------------------------------------------------------------


def test_capture_sees_every_attention_call_and_leaves_the_model_as_found(lx64):
    adapter, model = lx64, lx64.model
    assert model.training  # a fresh model: explaining must switch dropout off and back on
    plain_model = copy.deepcopy(model).eval()  # the model's own outputs, without dropout
    calls = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: calls.append(mod))
        for m in plain_model.modules()
        if type(m).__name__ == "LxmertAttention"
    ]
    (group,) = adapter.prepare_images(regions()[:1])
    batch = adapter.tokenize(TEXTS)
    P = len(TEXTS)
    pixels = group.pixel_values.repeat(P, 1, 1)
    feats, pos = pixels[..., :-4], pixels[..., -4:]
    ids, mask = batch.input_ids, batch.attention_mask
    try:
        with torch.no_grad():
            plain = plain_model(input_ids=ids, visual_feats=feats, visual_pos=pos, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    before = model_state(model)
    with adapter.explaining():
        run = adapter.run_pairs(pixels, ids, mask)
    assert len(run.events) == len(calls) == 2 + 1 + 2 * 4
    assert [(e.kind, e.query, e.key) for e in run.events] == [
        ("self", "text", "text"),
        ("self", "text", "text"),
        ("self", "image", "image"),
        *[
            ("cross", "text", "image"),
            ("cross", "image", "text"),
            ("self", "text", "text"),
            ("self", "image", "image"),
        ]
        * 2,
    ]
    steps = [e.step for e in run.events]
    assert steps == [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]  # the two cross directions of a layer share one
    assert [e.layer for e in run.events] == [0, 1, 0, 2, 1, 2, 1, 3, 2, 3, 2]  # along the query stream
    assert all(e.probs.shape[:2] == (P, 4) for e in run.events)
    s = plain.cross_relationship_score
    torch.testing.assert_close(run.logits.detach(), s[:, 1] - s[:, 0], rtol=0, atol=0)
    assert run.grid == (1, 3) and run.readout[0] == "text"
    cliplens.explain(adapter, regions(), TEXTS, method="chefer")
    assert model_state(model) == before
    with torch.no_grad():
        again = copy.deepcopy(model).eval()(
            input_ids=ids, visual_feats=feats, visual_pos=pos, attention_mask=mask
        )
    assert torch.equal(plain.cross_relationship_score, again.cross_relationship_score)
    assert torch.equal(plain.prediction_logits, again.prediction_logits)


def test_the_logit_depends_on_features_boxes_and_text(lx64):
    base = random_regions(3, regions=4)
    logit = lambda region, text="a red circle": cliplens.similarity(lx64, region, text)[0][0, 0]
    y = logit(base)
    other_feats = RegionImage(base.features + 0.5, base.boxes, image=base.image)
    other_boxes = RegionImage(base.features, base.boxes * 0.5, image=base.image)
    for changed in (logit(other_feats), logit(other_boxes), logit(base, "the big dog")):
        assert abs(changed - y) > 1e-4


def test_batch_single_and_chunks_agree_and_values_are_finite(lx64):
    imgs = regions()
    ex = cliplens.explain(lx64, imgs, TEXTS, method="chefer")
    chunked = cliplens.explain(lx64, imgs, TEXTS, method="chefer", max_pairs=1)
    for b, region in enumerate(imgs):
        alone = cliplens.explain(lx64, region, TEXTS, method="chefer")
        for other in (alone.image_maps[0], chunked.image_maps[b]):
            np.testing.assert_allclose(other, ex.image_maps[b], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(alone.token_scores[0], ex.token_scores[b], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(alone.logits[0], ex.logits[b], rtol=1e-12)
        assert np.isfinite(ex.image_maps[b]).all()
    assert np.isfinite(ex.token_scores[~np.isnan(ex.token_scores)]).all()
    for method in ("raw_attention", "gradcam"):
        e = cliplens.explain(lx64, imgs, TEXTS, method=method)
        assert all(np.isfinite(m).all() for m in e.image_maps)


# ---- the other fusion methods ----------------------------------------------------------------------


def test_raw_attention_and_gradcam_read_the_cls_path(lx64):
    region, text = random_regions(4, regions=5), TEXTS[1]
    events, _ = attention_and_gradients(lx64, region, text, "match")
    cross = [(a, g) for role, a, g in events if role == "ti"]
    text_self = [a for role, a, g in events if role == "tt"]
    raw = cliplens.explain(lx64, region, text, method="raw_attention")
    assert rel(raw.image_maps[0, 0, 0], cross[-1][0].mean(0)[0].numpy()) < 1e-10
    assert rel(raw.token_scores[0, 0], text_self[-1].mean(0)[0].numpy()) < 1e-10
    first = cliplens.explain(
        lx64, region, text, method="raw_attention", layer=0
    )  # the language encoder's first
    assert rel(first.token_scores[0, 0], text_self[0].mean(0)[0].numpy()) < 1e-10
    assert rel(first.image_maps[0, 0, 0], cross[0][0].mean(0)[0].numpy()) < 1e-10
    content = lx64.tokenize([text]).content[0]
    from cliplens.methods.gradcam import lavis_layer

    for layer in (None, 0):
        a, g = cross[lavis_layer(len(cross)) if layer is None else layer]
        words = (a * g.clamp(min=0)).mean(0)  # (T, R)
        cam = cliplens.explain(lx64, region, text, method="gradcam", layer=layer)
        assert rel(cam.image_maps[0, 0, 0], words[content].mean(0).numpy()) < 1e-8


# ---- region maps ---------------------------------------------------------------------------------


def test_region_maps_are_the_boxes_painted_by_hand():
    # a 4 x 3 image, box A (0, 0)-(2, 2) worth 1, box B (1, 1)-(4, 3) worth 10: sums where they overlap
    painted = paint_regions([1.0, 10.0], [[0, 0, 2, 2], [1, 1, 4, 3]], (4, 3))
    np.testing.assert_array_equal(painted, [[1, 1, 0, 0], [1, 11, 10, 10], [0, 10, 10, 10]])
    # a box that covers half a pixel gives it half its value
    np.testing.assert_array_equal(paint_regions([2.0], [[0.5, 0, 1, 1]], (2, 1)), [[1.0, 0.0]])
    # at display size each pixel is the mean of the full-size painting over the pixels it shows
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 9, (5, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1).astype(float) * [16, 12, 16, 12] / 8
    values = rng.normal(size=(3, 5))
    full = paint_regions(values, boxes, (16, 12), max_side=None)
    small = paint_regions(values, boxes, (16, 12), max_side=4)
    assert small.shape == (3, 3, 4)
    np.testing.assert_allclose(small, full.reshape(3, 3, 4, 4, 4).mean(axis=(2, 4)), rtol=1e-12, atol=1e-12)


def test_explanations_carry_region_maps_and_save(lx64, tmp_path):
    imgs = regions()  # 48 x 40 (shown as is) and 160 x 120 (shown at 64 x 48)
    ex = cliplens.explain(lx64, imgs, TEXTS, method="chefer")
    maps = ex.extras["region_maps"]
    assert [m.shape for m in maps] == [(3, 40, 48), (3, 48, 64)]
    for b, region in enumerate(imgs):
        want = paint_regions(ex.image_maps[b][:, 0], region.boxes, region.size)
        np.testing.assert_array_equal(maps[b], want)
        assert ex.images[b].shape == (region.size[1], region.size[0], 3)
        assert (ex.geometries[b].width, ex.geometries[b].height) == region.size
    np.testing.assert_array_equal(ex.images[0], np.asarray(imgs[0].image))
    assert (ex.images[1] == 128).all()  # size only: a grey canvas
    back = cliplens.Explanation.load(ex.save(tmp_path / "ex"))
    for b in range(2):
        np.testing.assert_array_equal(back.extras["region_maps"][b], maps[b])
        np.testing.assert_array_equal(back.image_maps[b], ex.image_maps[b])
    assert back.meta["family"] == "hf-lxmert" and back.probability == "sigmoid"
    json.dumps(ex.to_dict())


# ---- the question-answering head ---------------------------------------------------------------------


def test_the_answer_head_explains_the_top_answer(qa64):
    imgs = regions()
    ex = cliplens.explain(qa64, imgs, TEXTS, method="raw_attention")
    scores = qa64.answer_scores(imgs, TEXTS)
    assert scores.shape == (2, 3, 7)
    np.testing.assert_allclose(ex.logits, scores.max(-1).values.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ex.probs, torch.sigmoid(scores.max(-1).values).numpy(), rtol=1e-12)
    pre = hf_lxmert_factory(dtype=torch.float64)
    as_qa = HFLxmertAdapter(pre.model, word_tokenizer(), head="answer")
    logits, _ = cliplens.similarity(as_qa, imgs[:1], TEXTS)
    np.testing.assert_allclose(
        logits[0], as_qa.answer_scores(imgs[:1], TEXTS)[0].max(-1).values.numpy(), rtol=1e-12
    )


# ---- refusals --------------------------------------------------------------------------------------


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_wrong_kinds_of_image_and_dual_encoder_methods_are_refused_in_one_line(lx64):
    clip = hf_clip_factory()
    for call in (
        lambda: cliplens.explain(clip, random_regions(0), "a cat"),
        lambda: cliplens.explain(clip, [random_image(0), random_regions(0)], "a cat"),
        lambda: cliplens.similarity(clip, random_regions(0), "a cat"),
    ):
        with pytest.raises(InputError) as err:
            call()
        assert "RegionImage" in one_line(err) and "pixels" in one_line(err)
    for images in (random_image(0), [random_regions(0), random_image(1)]):
        with pytest.raises(InputError) as err:
            cliplens.explain(lx64, images, "a cat")
        assert "region features" in one_line(err)
    with pytest.raises(InputError) as err:
        cliplens.explain(lx64, random_regions(0, feat_dim=8), "a cat")
    assert "8 features" in one_line(err)
    for method, options in [
        ("legrad", {}),
        ("decomposition", {}),
        ("rollout", {}),
        ("chefer", {"start_layer": 0}),
    ]:
        with pytest.raises(InputError) as err:
            cliplens.explain(lx64, random_regions(0), "a cat", method=method, **options)
        one_line(err)


@pytest.mark.parametrize(
    "features, boxes, kwargs, fragment",
    [
        (np.ones(16), [[0, 0, 1, 1]], {"size": (8, 8)}, "(R, D)"),
        (np.ones((2, 16)), [[0, 0, 4, 4]], {"size": (8, 8)}, "(R, 4)"),
        (np.ones((1, 16)), [[4, 0, 2, 4]], {"size": (8, 8)}, "x0 <= x1"),
        (np.ones((1, 16)), [[0, 0, 12, 4]], {"size": (8, 8)}, "outside"),
        (np.ones((1, 16)), [[0.1, 0.1, 0.5, 0.9]], {"size": (8, 8)}, "normalised"),
        (np.ones((1, 16)), [[0, 0, 4, 4]], {}, "size=(width, height)"),
        (np.ones((1, 16)), [[0, 0, 4, 4]], {"size": (8, 0)}, "positive"),
        (np.ones((1, 16)), [[0, 0, 4, 4]], {"image": random_image(0), "size": (8, 8)}, "differs"),
        (np.full((1, 16), np.nan), [[0, 0, 4, 4]], {"size": (8, 8)}, "NaN"),
        ("features", [[0, 0, 4, 4]], {"size": (8, 8)}, "features"),
    ],
)
def test_bad_region_images_are_refused_in_one_line(features, boxes, kwargs, fragment):
    with pytest.raises(InputError) as err:
        RegionImage(features, boxes, **kwargs)
    assert fragment in one_line(err)


# ---- loading ---------------------------------------------------------------------------------------


def test_checkpoints_load_by_their_head_and_a_bare_backbone_is_refused(tmp_path):
    region, text = random_regions(5, regions=3), "a red circle"
    for head in ("match", "answer"):
        model = make_tiny_lxmert(seed=2, head=head)
        path = tmp_path / head
        model.save_pretrained(path)
        word_tokenizer().save_pretrained(path)
        adapter = cliplens.load_model(str(path))
        assert isinstance(adapter, HFLxmertAdapter) and adapter.family == "hf-lxmert" and adapter.head == head
        direct = cliplens.adapters.adapt(model, word_tokenizer())
        assert isinstance(direct, HFLxmertAdapter) and direct.head == head
        np.testing.assert_allclose(
            cliplens.similarity(adapter, region, text)[0],
            cliplens.similarity(direct, region, text)[0],
            rtol=1e-6,
        )
    from transformers import LxmertModel

    bare = tmp_path / "bare"
    LxmertModel(make_tiny_lxmert().config).save_pretrained(bare)
    word_tokenizer().save_pretrained(bare)
    with pytest.raises(ModelLoadError) as err:
        cliplens.load_model(str(bare))
    assert "LxmertModel" in one_line(err)
    with pytest.raises(ModelLoadError) as err:
        HFLxmertAdapter(make_tiny_lxmert(head="answer"), word_tokenizer(), head="match")
    one_line(err)
