"""DETR (DetrForObjectDetection) explained as a fusion model: prompts are class names, the pair
logit is the class logit of the most confident query. Chefer's encoder-decoder rules and raw
attention against float64 oracles written from the equations, with the test's own hooks, one pair
at a time and the chosen query found here; then the capture, the model left as found, batching,
loading and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cliplens
from families import DETR_LABELS, hf_detr_factory, random_image
from helpers import model_state


def blocky(seed, size=(48, 40), cells=(4, 3)) -> Image.Image:
    """A random picture of a few flat blocks (white noise averages out over the feature map)."""
    return random_image(seed, size=cells).resize(size, Image.NEAREST)


IMAGES = [blocky(3), blocky(4, size=(40, 56), cells=(3, 4))]
LABELS = ["cat", "red car"]


@pytest.fixture(scope="module")
def detr64():
    return hf_detr_factory(seed=0, dtype=torch.float64)


# ---- the oracle ------------------------------------------------------------------------------


def _detr_attention_with_grads(adapter, image, label):
    """(events, chosen query, logits (Q, C+1), grid) of ONE pair: every attention module's
    probabilities and dy/dA in execution order as ``(kind, probs (H, q, k), grad)``, taken with
    hooks of the test's own; y is the class's log-odds at the query whose softmax gives the class
    the highest probability."""
    model = adapter.model
    detr = model.model
    pixels = adapter.prepare_images([image])[0].pixel_values.clone()
    c = DETR_LABELS.index(label)
    seen = []

    def keep(kind):
        def hook(module, args, output):
            seen.append((kind, output[1]))

        return hook

    modules = [(layer.self_attn, "encoder") for layer in detr.encoder.layers]
    for layer in detr.decoder.layers:
        modules += [(layer.self_attn, "decoder"), (layer.encoder_attn, "cross")]
    handles = [m.register_forward_hook(keep(kind)) for m, kind in modules]
    try:
        with adapter.explaining():  # eager attention, frozen parameters (restored on exit)
            pixels.requires_grad_(True)
            detr.query_position_embeddings.weight.requires_grad_(True)  # the first decoder layer too
            h, w = pixels.shape[-2:]
            logits = model(pixel_values=pixels, pixel_mask=torch.ones(1, h, w, dtype=torch.long)).logits[0]
            q = int(logits.detach().softmax(-1)[:, c].argmax())
            others = torch.cat([logits[q, :c], logits[q, c + 1 :]])
            y = logits[q, c] - torch.logsumexp(others, 0)  # the log-odds of c at q
            grads = torch.autograd.grad(y, [a for _, a in seen], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    events = [
        (kind, a.detach()[0], torch.zeros_like(a[0]) if g is None else g[0]) for (kind, a), g in zip(seen, grads)
    ]
    stride = adapter.patch_size[0]
    return events, q, logits.detach(), (h // stride, w // stride)


def _abar(a, g):
    return (g * a).clamp(min=0).mean(dim=0)


def _rbar(R, policy):
    """Eq. 8-9 row by row: (Rbar, number of rows of R - I summing to zero). Such a row is e_i
    (identity) or NaN (reference: 0/0)."""
    n = R.shape[0]
    eye = torch.eye(n, dtype=R.dtype)
    out = eye.clone()
    zero = 0
    for i in range(n):
        hat = R[i] - eye[i]
        total = float(hat.sum())
        if total != 0.0:
            out[i] = hat / total + eye[i]
        else:
            zero += 1
            if policy == "reference":
                out[i] = float("nan")
    return out, zero


def oracle_chefer_detr(adapter, image, label, policy="identity"):
    """(image map (h, w), degenerate row count) of one pair from the rules, full matrices: the
    encoder's self-attention builds R_ii; per decoder layer the queries' self-attention updates
    R_qq and R_qi, then the cross-attention adds Rbar_qq^T Abar Rbar_ii to R_qi (and Abar R_iq,
    zero, to R_qq). The map is the chosen query's row of R_qi."""
    events, q, _, grid = _detr_attention_with_grads(adapter, image, label)
    n = events[0][1].shape[-1]
    Q = next(a for kind, a, g in events if kind == "decoder").shape[-1]
    R_ii, R_qq = torch.eye(n, dtype=torch.float64), torch.eye(Q, dtype=torch.float64)
    R_qi, R_iq = torch.zeros(Q, n, dtype=torch.float64), torch.zeros(n, Q, dtype=torch.float64)
    degenerate = 0
    for kind, a, g in events:
        A = _abar(a, g)
        if kind == "encoder":
            R_ii, R_iq = R_ii + A @ R_ii, R_iq + A @ R_iq
        elif kind == "decoder":
            R_qq, R_qi = R_qq + A @ R_qq, R_qi + A @ R_qi
        else:
            bar_q, zq = _rbar(R_qq, policy)
            bar_i, zi = _rbar(R_ii, policy)
            degenerate += zq + zi
            cross = bar_q.T @ A @ bar_i
            if policy == "reference":
                cross = torch.nan_to_num(cross, nan=0.0)
            R_qi, R_qq = R_qi + cross, R_qq + A @ R_iq
    return R_qi[q].reshape(grid).numpy(), degenerate


def _close(have, want, what):
    scale = np.nanmax(np.abs(want)) + 1e-300
    np.testing.assert_allclose(np.asarray(have, dtype=np.float64), want, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


# ---- the model and the explained scalar --------------------------------------------------------


def test_tiny_detr_logits_depend_on_the_image(detr64):
    ex = cliplens.explain(detr64, IMAGES, LABELS, method="raw_attention")
    assert np.abs(ex.logits[0] - ex.logits[1]).max() > 1e-2
    for b, image in enumerate(IMAGES):
        for p, label in enumerate(LABELS):
            _, q, logits, _ = _detr_attention_with_grads(detr64, image, label)
            c = DETR_LABELS.index(label)
            others = torch.cat([logits[q, :c], logits[q, c + 1 :]])
            assert ex.logits[b, p] == pytest.approx(float(logits[q, c] - torch.logsumexp(others, 0)), rel=1e-12)
            # its sigmoid, the reported probability, is DETR's own softmax probability
            assert ex.probs[b, p] == pytest.approx(float(logits.softmax(-1)[q, c]), rel=1e-10)
            group = detr64.prepare_images([image])[0]
            with detr64.explaining():
                own = detr64.class_probabilities(group.pixel_values, detr64.tokenize([label]).input_ids)
            assert float(own[0]) == pytest.approx(float(logits.softmax(-1)[q, c]), rel=1e-12)


def test_prompts_are_class_names_with_no_token_scores(detr64):
    batch = detr64.tokenize(LABELS)
    assert batch.input_ids.tolist() == [[0], [2]] and batch.tokens == [["cat"], ["red car"]]
    assert detr64.context_length == 1 and detr64.patch_size == (8, 8)
    ex = cliplens.explain(detr64, IMAGES[0], LABELS, method="chefer")
    assert np.isnan(ex.token_scores).all()
    assert np.isfinite(np.asarray(ex.image_maps)).all()


# ---- the rules against the oracle --------------------------------------------------------------


def test_chefer_on_detr_matches_float64_oracle(detr64):
    ex = cliplens.explain(detr64, IMAGES, LABELS, method="chefer")
    queries = set()
    for b, image in enumerate(IMAGES):
        for p, label in enumerate(LABELS):
            want, degenerate = oracle_chefer_detr(detr64, image, label)
            queries.add(_detr_attention_with_grads(detr64, image, label)[1])
            assert np.abs(want).max() > 1e-8
            _close(ex.image_maps[b][p], want, f"chefer map {b},{p}")
            assert ex.extras["degenerate_rows"][b, p] == degenerate
    assert len(queries) > 1  # the pairs read out different queries


def test_raw_attention_on_detr_is_the_chosen_querys_last_cross_row(detr64):
    ex = cliplens.explain(detr64, IMAGES, LABELS, method="raw_attention")
    for b, image in enumerate(IMAGES):
        for p, label in enumerate(LABELS):
            events, q, _, grid = _detr_attention_with_grads(detr64, image, label)
            last = [a for kind, a, g in events if kind == "cross"][-1]
            _close(ex.image_maps[b][p], last.mean(0)[q].reshape(grid).numpy(), f"raw map {b},{p}")


def test_degenerate_rows_reference_and_identity_policies():
    """A zero value bias in the first decoder self-attention (over zero query states) makes its
    output, hence its gradient, exactly zero: every query row of R_qq - I sums to zero at the
    first cross-attention. The identity policy reads them as e_i; the reference code's 0/0 drops
    the cross terms (here every one: the last layer's self-attention gradient reaches only the
    chosen query's row, so the other rows are degenerate again)."""
    adapter = hf_detr_factory(seed=0, dtype=torch.float64)
    with torch.no_grad():
        adapter.model.model.decoder.layers[0].self_attn.v_proj.bias.zero_()
    image, label = IMAGES[0], "cat"
    maps = {}
    for policy in ("identity", "reference"):
        ex = cliplens.explain(adapter, image, label, method="chefer", degenerate_rows=policy)
        want, degenerate = oracle_chefer_detr(adapter, image, label, policy)
        _close(ex.image_maps[0, 0], want, policy)
        assert ex.extras["degenerate_rows"][0, 0] == degenerate
        maps[policy] = np.asarray(ex.image_maps[0, 0])
    Q = adapter.model.config.num_queries
    assert degenerate == Q + (Q - 1)
    assert np.abs(maps["identity"]).max() > 1e-8 and np.all(maps["reference"] == 0)


# ---- the capture -------------------------------------------------------------------------------


def test_detr_capture_sees_every_attention_and_leaves_the_model_as_found(detr64):
    adapter = detr64
    model = adapter.model
    before = model_state(model)
    calls = []
    handles = [
        m.register_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
        for m in model.modules()
        if type(m).__name__ in ("DetrSelfAttention", "DetrCrossAttention")
    ]
    group = adapter.prepare_images(IMAGES[:1])[0]
    batch = adapter.tokenize(LABELS)
    P = len(LABELS)
    pixels = group.pixel_values.repeat(P, 1, 1, 1)
    mask = torch.ones(P, *pixels.shape[-2:], dtype=torch.long)
    with torch.no_grad():
        plain = model(pixel_values=pixels, pixel_mask=mask).logits
        with adapter.explaining():  # the same attention path as the run (eager)
            logits = model(pixel_values=pixels, pixel_mask=mask).logits
    calls.clear()  # the attention calls of the run alone
    try:
        with adapter.explaining():
            run = adapter.run_pairs(pixels, batch.input_ids, batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    assert len(run.events) == len(calls) == 2 + 2 * 2
    assert [(e.kind, e.query, e.key) for e in run.events] == [
        ("self", "image", "image"),
        ("self", "image", "image"),
        ("self", "queries", "queries"),
        ("cross", "queries", "image"),
        ("self", "queries", "queries"),
        ("cross", "queries", "image"),
    ]
    assert run.grid == (6, 7) and run.streams["image"].size == 42  # 48 x 57.6 -> 48 x 56 and run.streams["queries"].size == 10
    classes = batch.input_ids[:, 0]
    chosen = logits.softmax(-1)[torch.arange(P), :, classes].argmax(1)
    own = logits[torch.arange(P), chosen]
    odds = own.gather(1, classes[:, None])[:, 0] - own.scatter(1, classes[:, None], float("-inf")).logsumexp(1)
    torch.testing.assert_close(run.logits.detach(), odds, rtol=0, atol=0)
    assert torch.equal(run.readout[1].argmax(1), chosen) and torch.equal(run.readout[1].sum(1), torch.ones(P))
    cliplens.explain(adapter, IMAGES, LABELS, method="chefer")
    assert model_state(model) == before
    with torch.no_grad():
        again = model(pixel_values=pixels, pixel_mask=mask).logits
    assert torch.equal(plain, again)


def test_a_batch_gives_what_each_pair_gives_alone(detr64):
    for method in ("chefer", "raw_attention"):
        ex = cliplens.explain(detr64, IMAGES, LABELS, method=method)
        for b, image in enumerate(IMAGES):
            for p, label in enumerate(LABELS):
                one = cliplens.explain(detr64, image, label, method=method)
                np.testing.assert_allclose(one.image_maps[0, 0], ex.image_maps[b][p], rtol=1e-9, atol=1e-12)
                assert one.logits[0, 0] == pytest.approx(ex.logits[b, p], rel=1e-12)


# ---- refusals and loading ----------------------------------------------------------------------


def _one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def test_refusals_are_one_line(detr64):
    with pytest.raises(cliplens.InputError) as err:
        cliplens.explain(detr64, IMAGES[0], "a photo of a cat", method="chefer")
    assert "'cat'" in _one_line(err) and "class names" in str(err.value)
    for method in ("legrad", "gradcam", "rollout"):
        with pytest.raises(cliplens.InputError) as err:
            cliplens.explain(detr64, IMAGES[0], "cat", method=method)
        _one_line(err)


def test_detr_checkpoints_load_and_a_timm_backbone_without_timm_is_refused(detr64, tmp_path):
    from cliplens.adapters.hf_detr import HFDetrAdapter

    detr64.model.save_pretrained(tmp_path / "tiny")
    adapter = cliplens.load_model(str(tmp_path / "tiny"), dtype=torch.float64)
    assert isinstance(adapter, HFDetrAdapter) and adapter.family == "hf-detr" and adapter.patch_size == (8, 8)
    assert adapter.preprocess.size == 800 and adapter.preprocess.max_size == 1333
    assert adapter.preprocess.model_size(640, 480) == (800, 1064)  # 800 x 1066.7, floored to 8
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    for name, changes, match in [
        ("seg", {"architectures": ["DetrForSegmentation"]}, "DetrForSegmentation"),
        ("timm", {"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet50"}}, "timm"),
    ]:
        if name == "timm" and __import__("importlib").util.find_spec("timm") is not None:
            continue
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(cliplens.ModelLoadError, match=match) as err:
            cliplens.load_model(str(tmp_path / name))
        _one_line(err)
