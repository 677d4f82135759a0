"""Fusion models (image and text scored together): the bi-modal Chefer rules against a float64
oracle written from the equations, the rule engine on its own, and the BLIP adapter's capture.

The oracles take the attention probabilities and their gradients with their own hooks
(``retain_grad`` on the tensors each attention module returns), one pair at a time, and apply
the rules with explicit full matrices in loops; nothing of the library's engine is used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
from cliplens.methods.relevance import StreamRelevance, residual_normalised
from families import hf_blip_factory, hf_clip_factory, random_image
from helpers import model_state

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]
IMAGES = [random_image(3), random_image(4, size=(40, 56))]


@pytest.fixture(scope="module")
def blip64():
    return hf_blip_factory(seed=0, dtype=torch.float64)


# ---- the oracle ------------------------------------------------------------------------------


def _blip_attention_with_grads(adapter, image, text, target="logit"):
    """(events, logit): every attention module's probabilities and dy/dA for ONE pair, in
    execution order, as ``(kind, probs (H, q, k), grad)``; taken with hooks of the test's own."""
    model = adapter.model
    group = adapter.prepare_images([image])[0]
    batch = adapter.tokenize([text])
    seen = []

    def keep(kind):
        def hook(module, args, output):
            seen.append((kind, output[1]))

        return hook

    modules = [(layer.self_attn, "image") for layer in model.vision_model.encoder.layers]
    for layer in model.text_encoder.encoder.layer:
        modules += [(layer.attention.self, "text"), (layer.crossattention.self, "cross")]
    handles = [m.register_forward_hook(keep(kind)) for m, kind in modules]
    # the text embeddings and the pixels require grad, so every attention is in the graph
    handles.append(model.text_encoder.embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_()))
    pixels = group.pixel_values.clone().requires_grad_(True)
    try:
        with adapter.explaining():
            itm = model(input_ids=batch.input_ids, pixel_values=pixels, attention_mask=batch.attention_mask).itm_score
            y = itm[0, 1] - itm[0, 0]
            grads = torch.autograd.grad(y, [a for _, a in seen])
    finally:
        for h in handles:
            h.remove()
    return [(kind, a.detach()[0], g[0]) for (kind, a), g in zip(seen, grads)], float(y.detach()), batch


def _abar(a, g):
    return (g * a).clamp(min=0).mean(dim=0)


def _rbar(R):
    """Eq. 8-9, row by row, with the identity policy for rows of R - I that sum to zero."""
    n = R.shape[0]
    out = torch.eye(n, dtype=R.dtype)
    for i in range(n):
        hat = R[i] - out[i]
        total = float(hat.sum())
        if total != 0.0:
            out[i] = hat / total + out[i]
    return out


def oracle_chefer_blip(adapter, image, text):
    """(image map (Gh, Gw), token scores (T,)) of one BLIP pair from the rules, full matrices."""
    events, _, batch = _blip_attention_with_grads(adapter, image, text)
    T = batch.input_ids.shape[1]
    n_img = events[0][1].shape[-1]
    R_ii, R_tt = torch.eye(n_img, dtype=torch.float64), torch.eye(T, dtype=torch.float64)
    R_ti, R_it = torch.zeros(T, n_img, dtype=torch.float64), torch.zeros(n_img, T, dtype=torch.float64)
    for kind, a, g in events:
        A = _abar(a, g)
        if kind == "image":  # rules 6-7 on the image stream
            R_ii, R_it = R_ii + A @ R_ii, R_it + A @ R_it
        elif kind == "text":
            R_tt, R_ti = R_tt + A @ R_tt, R_ti + A @ R_ti
        else:  # rules 10-11: text queries, image keys
            R_ti, R_tt = R_ti + _rbar(R_tt).T @ A @ _rbar(R_ii), R_tt + A @ R_it
    gh, gw = (s // adapter.patch_size[0] for s in adapter.prepare_images([image])[0].pixel_values.shape[-2:])
    return R_ti[0, 1:].reshape(gh, gw).numpy(), R_tt[0].numpy()


def _close(have, want, what):
    scale = np.nanmax(np.abs(want)) + 1e-300
    np.testing.assert_allclose(np.asarray(have, dtype=np.float64), want, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


def test_chefer_on_blip_matches_float64_oracle(blip64):
    ex = cliplens.explain(blip64, IMAGES, TEXTS, method="chefer")
    assert np.all(ex.extras["degenerate_rows"] == 0)  # padding is not a degenerate row
    for b, image in enumerate(IMAGES):
        for p, text in enumerate(TEXTS):
            want_map, want_tokens = oracle_chefer_blip(blip64, image, text)
            assert np.abs(want_map).max() > 1e-8  # the image really reaches the readout
            _close(ex.image_maps[b][p], want_map, f"image map {b},{p}")
            t = len(ex.tokens[p])
            _close(ex.token_scores[b, p, :t], want_tokens, f"tokens {b},{p}")
            assert np.isnan(ex.token_scores[b, p, t:]).all()


def test_raw_attention_and_gradcam_on_blip_match_their_formulas(blip64):
    image, text = IMAGES[0], TEXTS[1]
    events, _, batch = _blip_attention_with_grads(blip64, image, text)
    gh, gw = 4, 4
    cross = [(a, g) for kind, a, g in events if kind == "cross"]
    self_text = [a for kind, a, g in events if kind == "text"]
    raw = cliplens.explain(blip64, image, text, method="raw_attention")
    _close(raw.image_maps[0, 0], cross[-1][0].mean(0)[0, 1:].reshape(gh, gw).numpy(), "raw image row")
    _close(raw.token_scores[0, 0], self_text[-1].mean(0)[0].numpy(), "raw token row")
    for layer in (None, 1):
        a, g = cross[0 if layer is None else layer]  # the default on 2 layers: the first (not the last)
        words = (a * g.clamp(min=0)).mean(0)[:, 1:]  # (T, patches)
        content = batch.content[0]
        cam = cliplens.explain(blip64, image, text, method="gradcam", layer=layer)
        want = words[content].mean(0).reshape(gh, gw).numpy()
        # the last layer's content rows reach nothing (the head reads [CLS]): zero there
        assert (np.abs(want).max() > 1e-9) == (layer is None)
        _close(cam.image_maps[0, 0], want, f"gradcam layer {layer}")
        word_maps = cam.extras["word_maps"][0, 0]
        for t in range(len(content)):
            if content[t]:
                _close(word_maps[t], words[t].reshape(gh, gw).numpy(), f"word map {t}")
            else:
                assert np.isnan(word_maps[t]).all()


def test_blip_capture_sees_every_attention_and_leaves_the_model_as_found(blip64):
    adapter = blip64
    model = adapter.model
    n_attention = sum(
        1 for m in model.modules() if type(m).__name__ in ("BlipAttention", "BlipTextSelfAttention")
    )
    group = adapter.prepare_images(IMAGES[:1])[0]
    batch = adapter.tokenize(TEXTS)
    P = len(TEXTS)
    ids, mask, pixels = batch.input_ids, batch.attention_mask, group.pixel_values.repeat(P, 1, 1, 1)
    before = model_state(model)
    with torch.no_grad():
        itm = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
    with adapter.explaining():
        run = adapter.run_pairs(pixels, ids, mask)
    assert len(run.events) == n_attention == 2 + 2 * 2
    assert [e.kind for e in run.events] == ["self", "self", "self", "cross", "self", "cross"]
    torch.testing.assert_close(run.logits.detach(), itm[:, 1] - itm[:, 0], rtol=0, atol=0)
    cliplens.explain(adapter, IMAGES, TEXTS, method="chefer")
    assert model_state(model) == before
    with torch.no_grad():
        again = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
    assert torch.equal(itm, again)


def test_blip_probability_is_the_itm_softmax(blip64):
    ex = cliplens.explain(blip64, IMAGES[:1], TEXTS, method="raw_attention")
    group = blip64.prepare_images(IMAGES[:1])[0]
    batch = blip64.tokenize(TEXTS)
    with torch.no_grad():
        itm = blip64.model(
            input_ids=batch.input_ids,
            pixel_values=group.pixel_values.repeat(len(TEXTS), 1, 1, 1),
            attention_mask=batch.attention_mask,
        ).itm_score
    np.testing.assert_allclose(ex.probs[0], itm.softmax(-1)[:, 1].numpy(), rtol=1e-12)
    logits, probs = cliplens.similarity(blip64, IMAGES[:1], TEXTS)
    np.testing.assert_allclose(logits, ex.logits, rtol=0, atol=1e-12)


def test_dual_encoder_methods_and_bad_options_are_refused_in_one_line(blip64):
    for method, options in [("legrad", {}), ("decomposition", {}), ("rollout", {}), ("chefer", {"start_layer": 0})]:
        with pytest.raises(cliplens.InputError) as err:
            cliplens.explain(blip64, IMAGES[0], TEXTS[0], method=method, **options)
        assert "\n" not in str(err.value)
    with pytest.raises(cliplens.InputError, match="degenerate_rows"):
        cliplens.explain(blip64, IMAGES[0], TEXTS[0], method="chefer", degenerate_rows="nan")


# ---- the rule engine on its own ------------------------------------------------------------------


def test_with_no_cross_events_the_engine_is_the_chefer_row_fold():
    """Self-attention events only: StreamRelevance's readout row equals chefer's image map with
    every block (start_layer=0) on a dual encoder's image tower."""
    adapter = hf_clip_factory(seed=1, dtype=torch.float64)
    image, text = IMAGES[0], TEXTS[0]
    ex = cliplens.explain(adapter, image, text, method="chefer", start_layer=0, towers="image")
    from cliplens.targets import PairScores

    group = adapter.prepare_images([image])[0]
    batch = adapter.tokenize([text])
    with adapter.explaining():
        with torch.enable_grad():
            run = adapter.run_image(group.pixel_values)
        with torch.no_grad():
            txt = adapter.run_text(batch.input_ids, batch.attention_mask).embeds
        y = PairScores.of(adapter).logits(run.embeds, txt)
        grads = torch.autograd.grad(y.sum(), run.attentions)
    n = run.attentions[0].shape[-1]
    rel = StreamRelevance({"image": torch.ones(1, n, dtype=torch.bool)}, torch.float64)
    for a, g in zip(run.attentions, grads):
        rel.apply([("self", "image", "image", (g * a.detach()).clamp(min=0).mean(1))])
    readout = torch.zeros(1, n, dtype=torch.float64)
    readout[0, 0] = 1.0  # the class token
    row = rel.row("image", readout, "image")[0, 1:]
    _close(ex.image_maps[0, 0].ravel(), row.numpy(), "engine vs row fold")


def _random_abar(rows, nq, nk, gen):
    return torch.rand(rows, nq, nk, generator=gen, dtype=torch.float64)


def test_cross_rule_and_co_attention_step_follow_the_equations():
    """Two streams, a self event on each, then both cross directions in one step (LXMERT's
    co-attention): every matrix against the equations written out with the pre-step state."""
    gen = torch.Generator().manual_seed(0)
    ns, nq = 3, 4
    valid = {"s": torch.ones(1, ns, dtype=torch.bool), "q": torch.ones(1, nq, dtype=torch.bool)}
    rel = StreamRelevance(valid, torch.float64)
    A_ss, A_qq = _random_abar(1, ns, ns, gen), _random_abar(1, nq, nq, gen)
    A_sq, A_qs = _random_abar(1, ns, nq, gen), _random_abar(1, nq, ns, gen)
    A_ss2 = _random_abar(1, ns, ns, gen)
    rel.apply([("self", "s", "s", A_ss)])
    rel.apply([("self", "q", "q", A_qq)])
    rel.apply([("cross", "s", "q", A_sq), ("cross", "q", "s", A_qs)])
    # second round: s now attends to itself with a non-zero R_sq, and across to q again
    rel.apply([("self", "s", "s", A_ss2)])
    rel.apply([("cross", "s", "q", A_sq)])
    I_s, I_q = torch.eye(ns, dtype=torch.float64), torch.eye(nq, dtype=torch.float64)
    R_ss, R_qq = I_s + A_ss[0], I_q + A_qq[0]
    R_sq, R_qs = torch.zeros(ns, nq, dtype=torch.float64), torch.zeros(nq, ns, dtype=torch.float64)
    pre = (R_ss, R_qq, R_sq, R_qs)
    R_sq = pre[2] + _rbar(pre[0]).T @ A_sq[0] @ _rbar(pre[1])
    R_ss = pre[0] + A_sq[0] @ pre[3]
    R_qs = pre[3] + _rbar(pre[1]).T @ A_qs[0] @ _rbar(pre[0])
    R_qq = pre[1] + A_qs[0] @ pre[2]
    R_ss, R_sq = R_ss + A_ss2[0] @ R_ss, R_sq + A_ss2[0] @ R_sq
    R_sq, R_ss = R_sq + _rbar(R_ss).T @ A_sq[0] @ _rbar(R_qq), R_ss + A_sq[0] @ R_qs
    for key, want in {("s", "s"): R_ss, ("q", "q"): R_qq, ("s", "q"): R_sq, ("q", "s"): R_qs}.items():
        _close(rel.R[key][0].numpy(), want.numpy(), str(key))
    assert int(rel.degenerate[0]) == 0


def test_degenerate_rows_identity_policy_and_reference_mode():
    """A key stream that never attended to itself has R = I: every row of R - I sums to zero.
    The identity policy reads those rows of Rbar as e_i and counts them; the reference mode
    gives 0/0 = NaN and zeroes the cross term (the reference DETR generator's behaviour)."""
    gen = torch.Generator().manual_seed(1)
    A_ss, A_sq = _random_abar(1, 3, 3, gen), _random_abar(1, 3, 5, gen)
    valid = {"s": torch.ones(1, 3, dtype=torch.bool), "q": torch.ones(1, 5, dtype=torch.bool)}
    out = {}
    for policy in ("identity", "reference"):
        rel = StreamRelevance(valid, torch.float64, policy)
        rel.apply([("self", "s", "s", A_ss)])
        rel.apply([("cross", "s", "q", A_sq)])
        out[policy] = rel
    ident = out["identity"]
    R_ss = torch.eye(3, dtype=torch.float64) + A_ss[0]
    _close(ident.R["s", "q"][0].numpy(), (_rbar(R_ss).T @ A_sq[0]).numpy(), "identity policy")
    assert int(ident.degenerate[0]) == 5
    assert torch.equal(out["reference"].R["s", "q"], torch.zeros(1, 3, 5, dtype=torch.float64))
    # padding is not part of the sequence: its rows are e_i and never counted
    pad = torch.tensor([[True, True, False]])
    bar, count = residual_normalised(torch.eye(3, dtype=torch.float64)[None] + A_ss * pad[:, :, None], "reference", pad)
    assert int(count[0]) == 0 and torch.equal(bar[0, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


# ---- evaluation of fusion models ---------------------------------------------------------------


def test_token_perturbation_curve_keeps_the_reference_counts():
    """Chefer et al.'s text test keeps int((1 - f) * n) tokens: with n = 4 and the score the
    sum of the kept tokens' relevance, every step of both orders is known."""
    from cliplens.eval.metrics import TEXT_FRACTIONS, token_perturbation_curve

    r = np.array([0.1, 0.4, 0.3, 0.2])
    kept_sum = lambda removed: float(r[~removed].sum())  # noqa: E731
    pos = token_perturbation_curve(r, kept_sum, order="positive")
    neg = token_perturbation_curve(r, kept_sum, order="negative")
    # kept counts 4 3 2 1 0 0 0 0 0 (f = 0, .25, .5, .75, .8, ...)
    np.testing.assert_allclose(pos.scores, [1.0, 0.6, 0.3, 0.1, 0, 0, 0, 0, 0])  # least relevant stay
    np.testing.assert_allclose(neg.scores, [1.0, 0.9, 0.7, 0.4, 0, 0, 0, 0, 0])  # most relevant stay
    assert pos.auc == pytest.approx(np.trapezoid(pos.scores, TEXT_FRACTIONS))


def test_text_perturbation_scores_are_the_model_on_shortened_prompts(blip64):
    """Every point of the text curves is the ITM log-odds of the prompt with those tokens
    deleted from the sequence ([CLS] and [SEP] kept), computed here by hand."""
    from cliplens.eval.perturbation import PromptScorer
    from cliplens.eval.runner import text_perturbation_scores
    from cliplens.targets import resolve_target

    texts = ["a photo of a small dog", "a red triangle"]
    target = resolve_target("logit", texts)
    group = blip64.prepare_images([IMAGES[0]])[0]
    batch = blip64.tokenize(texts)
    content = [np.flatnonzero(c[: len(t)]) for c, t in zip(batch.content.numpy(), batch.tokens)]
    scores = {"m": [np.linspace(1.0, 0.0, len(c)) ** 2 for c in content]}  # the first content token most relevant
    got = text_perturbation_scores(blip64, group.pixel_values[0], texts, content, scores, PromptScorer.of(blip64, texts, target))
    for p, text in enumerate(texts):
        ids = batch.input_ids[p, : len(batch.tokens[p])].tolist()
        n = len(content[p])
        for order in ("positive", "negative"):
            want = []
            for f in (0.0, 0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0):
                k = int((1 - f) * n + 1e-9)
                by_relevance = list(range(1, n + 1))  # content positions, most relevant first
                stay = set(by_relevance[n - k :] if order == "positive" else by_relevance[:k])
                kept = [ids[0]] + [ids[t] for t in range(1, n + 1) if t in stay] + [ids[-1]]
                with torch.no_grad():
                    itm = blip64.model(
                        input_ids=torch.tensor([kept]), pixel_values=group.pixel_values, attention_mask=torch.ones(1, len(kept), dtype=torch.long)
                    ).itm_score
                want.append(float(itm[0, 1] - itm[0, 0]))
            np.testing.assert_allclose(got[("m", p)][f"text_{order}"], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["blip", "vilt"])
def test_evaluate_scores_fusion_models(family, tmp_path):
    """`cliplens evaluate` on a fusion model: its own methods only (no refusals), localisation,
    image perturbation and the text test, with the recorded pair values the model's own."""
    from cliplens.eval import harness
    from cliplens.worlds.shapes import write_dataset
    from families import hf_vilt_factory

    adapter = hf_blip_factory(seed=0) if family == "blip" else hf_vilt_factory(seed=0)
    ds = write_dataset(tmp_path / "s", 2, seed=3, size=64)
    res = harness.evaluate(
        adapter, None, f"shapes:{ds}", limit=2, progress=False, metrics="pointing,segmentation,perturbation,text_perturbation"
    )
    assert not res.refused
    methods = {"chefer", "raw_attention"} | ({"gradcam"} if family == "blip" else {"rollout"})
    rows = {r["source"]: r for r in res.rows}
    assert set(rows) == methods | {"random", "centre", "oracle"}
    assert rows["oracle"]["pointing"] == 1.0
    for m in ("chefer", "raw_attention", "random"):
        assert np.isfinite(rows[m]["positive_auc"]) and np.isfinite(rows[m]["text_positive_auc"])
    with pytest.raises(cliplens.InputError, match="fusion model"):
        harness.evaluate(adapter, None, f"shapes:{ds}", limit=1, progress=False, target="class")


@pytest.mark.app
def test_the_app_offers_a_fusion_model_only_its_own_methods(tmp_path):
    pytest.importorskip("starlette")
    from cliplens.app.core import Limits, Service
    from cliplens.app.page import index_html

    svc = Service(hf_blip_factory(seed=0), Limits(), root=tmp_path)
    try:
        page = index_html(svc)
    finally:
        svc.close()
    offered = set(__import__("re").findall(r"name='methods' value='(\w+)'", page))
    assert offered == {"chefer", "raw_attention", "gradcam"}


def test_the_page_shows_lavis_word_maps_behind_the_word_chips(blip64, tmp_path):
    """gradcam on BLIP gives per-word maps but no token scores: the page still shows one chip per
    content word, each with its word map to hover (grey chips, no score)."""
    import re

    from cliplens.viz.pages import write_folder

    ex = cliplens.explain(blip64, IMAGES[0], TEXTS[:2], method="gradcam")
    assert ex.token_scores is None
    write_folder(ex, ["img"], tmp_path, model="tiny")
    page = (tmp_path / "index.html").read_text()
    linked = re.findall(r'data-img="([^"]+)"', page)
    n_words = sum(int(c.sum()) for c in ex.content[:2])
    assert len(linked) == n_words and all((tmp_path / f).is_file() for f in linked)
    np.testing.assert_array_equal(ex.word_matrix(0, 1)[1], ex.extras["word_maps"][0, 1, 1])
