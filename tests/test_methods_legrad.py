"""LeGrad: fast path (one backward, detached blocks) against a slow float64 oracle written from
the equations (one pair and one layer at a time, gradients in the ordinary graph)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from conftest import clip_tokenizer, make_tiny_clip, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def _score(logits_row: torch.Tensor, p: int, target: str, versus: int | None) -> torch.Tensor:
    if target == "logit":
        return logits_row[p]
    if target == "probability":
        return logits_row.softmax(-1)[p]
    return logits_row[p] - logits_row[versus]


def oracle_legrad(model, adapter, images, texts, target="logit", layers=2, pooling="mean", versus=None):
    """For pair (b, p) and layer l: s^l = target on the layer-l readout (other tower final),
    G = ds^l/dA^l in the plain graph, map_l[j] = sum_{h,i} relu(G[h,i,j]) / (H * rows)."""
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("eager")
    m.eval()
    batch = adapter.tokenize(texts)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
    B, P = len(images), len(texts)
    scale = m.logit_scale.exp().detach()
    eots = adapter._readout_positions(batch.input_ids)
    mask = batch.attention_mask
    img_maps = np.zeros((B, P, 0)).tolist()
    img_layers, tok_scores = [], []
    for b in range(B):
        row_img, row_img_layers, row_tok = [], [], []
        for p in range(P):
            vout = m.vision_model(
                pixel_values=pixels[b : b + 1],
                output_attentions=True,
                output_hidden_states=True,
                interpolate_pos_encoding=True,
            )
            tout = m.text_model(
                input_ids=batch.input_ids,
                attention_mask=mask,
                output_attentions=True,
                output_hidden_states=True,
            )
            img_final = m.visual_projection(vout.pooler_output)[0].detach()
            txt_final = m.text_projection(tout.pooler_output).detach()
            t_hat = txt_final / txt_final.norm(dim=-1, keepdim=True)
            i_hat = img_final / img_final.norm()
            Lv = len(vout.attentions)
            chosen = range(Lv) if layers is None else range(max(0, Lv - layers), Lv)
            per_layer = []
            for l in chosen:
                h = vout.hidden_states[l + 1][0]
                pooled = h[0] if pooling == "model" else h.mean(0)
                e = m.visual_projection(m.vision_model.post_layernorm(pooled))
                logits_row = scale * (t_hat @ (e / e.norm()))
                s = _score(logits_row, p, target, versus)
                (G,) = torch.autograd.grad(s, [vout.attentions[l]], retain_graph=True)
                G = G[0]
                H, n, _ = G.shape
                mp = torch.zeros(n, dtype=torch.float64)
                for hh in range(H):
                    for i in range(n):
                        mp += torch.clamp(G[hh, i], min=0)
                per_layer.append((mp / (H * n))[1:].numpy())
            row_img_layers.append(np.stack(per_layer))
            row_img.append(np.sum(per_layer, 0))
            # text side: each layer's end-of-text readout of every prompt against the final image
            Lt = len(tout.attentions)
            chosen = range(Lt) if layers is None else range(max(0, Lt - layers), Lt)
            T = batch.input_ids.shape[1]
            tok = np.zeros(T)
            for l in chosen:
                hs = tout.hidden_states[l + 1]
                e_all = m.text_projection(m.text_model.final_layer_norm(hs[torch.arange(P), eots]))
                logits_row = scale * ((e_all / e_all.norm(dim=-1, keepdim=True)) @ i_hat)
                s = _score(logits_row, p, target, versus)
                (G,) = torch.autograd.grad(s, [tout.attentions[l]], retain_graph=True)
                G = G[p]  # only prompt p's own attention (the other prompts are other rows)
                H = G.shape[0]
                valid = mask[p].bool()
                acc = torch.zeros(T, dtype=torch.float64)
                for hh in range(H):
                    for i in range(T):
                        if valid[i]:
                            acc += torch.clamp(G[hh, i], min=0)
                tok += (acc / (H * valid.sum())).numpy()
            row_tok.append(tok)
        img_maps[b] = row_img
        img_layers.append(row_img_layers)
        tok_scores.append(row_tok)
    return np.array(img_maps), np.array(img_layers), np.array(tok_scores), batch


def fast(model, images, texts, **kw):
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    return cliplens.explain(adapter, images, texts, method="legrad", **kw), adapter


def _compare(ex, ref_img, ref_layers, ref_tok, batch):
    B, P = ex.shape
    np.testing.assert_allclose(ex.image_maps.reshape(B, P, -1), ref_img, rtol=1e-6, atol=1e-12)
    lm = ex.extras["layer_maps"]
    np.testing.assert_allclose(lm.reshape(B, P, lm.shape[2], -1), ref_layers, rtol=1e-6, atol=1e-12)
    valid = batch.attention_mask.numpy().astype(bool)
    for p in range(P):
        np.testing.assert_allclose(
            ex.token_scores[:, p, valid[p]], ref_tok[:, p, valid[p]], rtol=1e-6, atol=1e-12
        )
        assert np.isnan(ex.token_scores[:, p, ~valid[p]]).all()


@pytest.mark.parametrize("layers,pooling", [(None, "model"), (2, "mean")])
def test_legrad_matches_float64_oracle(layers, pooling):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2)]
    ex, adapter = fast(model, images, TEXTS, layers=layers, pooling=pooling)
    ref_img, ref_layers, ref_tok, batch = oracle_legrad(
        model, adapter, images, TEXTS, layers=layers, pooling=pooling
    )
    assert ex.image_maps.shape == (2, 3, 4, 4)
    assert ex.extras["layer_maps"].shape == (2, 3, 3 if layers is None else 2, 4, 4)
    _compare(ex, ref_img, ref_layers, ref_tok, batch)
    # non-trivial, prompt-dependent, and the per-layer maps add up to the map
    assert np.ptp(ex.image_maps) > 1e-4
    assert not np.allclose(ex.image_maps[:, 0], ex.image_maps[:, 1])
    np.testing.assert_allclose(ex.extras["layer_maps"].sum(2), ex.image_maps, rtol=1e-12)


@pytest.mark.parametrize("target", ["probability", "contrast"])
def test_legrad_targets_match_oracle(target):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(3)]
    tgt = "contrast:1" if target == "contrast" else target
    ex, adapter = fast(model, images, TEXTS, target=tgt)
    ref = oracle_legrad(model, adapter, images, TEXTS, target=target, versus=1)
    _compare(ex, *ref)
    if target == "contrast":  # prompt 1 against itself: zero at every layer, zero map
        assert np.allclose(ex.image_maps[0, 1], 0.0)


def test_legrad_image_tower_only():
    model = make_tiny_clip(dtype=torch.float64)
    ex, _ = fast(model, [random_image(4)], ["a cat"], layers=1, towers=["image"])
    assert ex.token_scores is None and "text_layer_scores" not in ex.extras
    assert ex.extras["layer_maps"].shape == (1, 1, 1, 4, 4)
    assert np.all(ex.image_maps >= 0)


def test_legrad_bad_options():
    model = make_tiny_clip()
    with pytest.raises(cliplens.InputError):
        fast(model, [random_image(1)], ["a cat"], layers=0)
    with pytest.raises(cliplens.InputError):
        fast(model, [random_image(1)], ["a cat"], pooling="max")


def test_legrad_pooled_tower_takes_the_pooling_heads_gradient():
    """SigLIP's image tower pools with an attention head: G^l is ds^l/d(pooling probabilities)
    in the readout of block l. Checked against one plain (undetached) forward and one gradient
    per layer."""
    from conftest import hf_siglip_factory

    adapter = hf_siglip_factory(dtype=torch.float64)
    images, texts = [random_image(1)], ["a cat", "two dogs"]
    # every layer, no correction: the pooling head's gradient alone (the defaults: test below)
    ex = cliplens.explain(adapter, images, texts, method="legrad", towers=["image"], layers=None, correction="off")
    batch = adapter.tokenize(texts)
    pixels = adapter.prepare_images(images)[0].pixel_values
    with adapter.explaining():
        txt = adapter.run_text(batch.input_ids, batch.attention_mask).embeds.detach()
        t_hat = txt / txt.norm(dim=-1, keepdim=True)
        with torch.enable_grad():
            run = adapter.run_image(pixels)
            for p in range(2):
                total = np.zeros(ex.image_maps.shape[2:]).ravel()
                for l, hidden in enumerate(run.block_outputs):
                    e, pool = adapter.readout_with_attention("image", hidden, run.layout)
                    assert pool is not None
                    s = adapter.logit_scale() * (e[0] / e[0].norm()) @ t_hat[p] + adapter.logit_bias()
                    (G,) = torch.autograd.grad(s, [pool], retain_graph=True)
                    per = G[0].clamp(min=0).mean(dim=(0, 1))[run.layout.patches].numpy()
                    np.testing.assert_allclose(
                        ex.extras["layer_maps"][0, p, l].ravel(), per, rtol=1e-6, atol=1e-12
                    )
                    total += per
                np.testing.assert_allclose(ex.image_maps[0, p].ravel(), total, rtol=1e-6, atol=1e-12)
    assert np.ptp(ex.image_maps) > 0


def test_legrad_defaults_are_the_references():
    """Reference defaults (LeWrapper(layer_index=-2), mean readout, correction on SigLIP); the
    former behaviour stays reachable (layers=None, pooling='model', correction='off')."""
    from cliplens.methods.legrad import LeGrad

    opts = LeGrad().parse_options({})
    assert (opts.layers, opts.pooling, opts.correction, opts.correction_threshold) == (2, "mean", "auto", 0.8)
    old = LeGrad().parse_options({"layers": None, "pooling": "model", "correction": "off"})
    assert old.layers is None and old.pooling == "model"
    model = make_tiny_clip(dtype=torch.float64)
    ex, _ = fast(model, [random_image(1)], TEXTS[:2])
    assert ex.extras["layer_maps"].shape[2] == 2 and "empty_prompt_maps" not in ex.extras


def test_legrad_siglip_empty_prompt_correction():
    """SigLIP (auto): the map is the uncorrected map with the patches zeroed where the min-max of
    the empty-prompt ("a photo of a") map exceeds the threshold, as the reference does before its
    min-max; the empty map is LeGrad for the cosine with that prompt's embedding."""
    from conftest import hf_siglip_factory

    adapter = hf_siglip_factory(dtype=torch.float64)
    images, texts = [random_image(1), random_image(5)], ["a cat", "two dogs"]
    plain = cliplens.explain(adapter, images, texts, method="legrad", correction="off")
    for thr in (0.8, 0.3):
        ex = cliplens.explain(adapter, images, texts, method="legrad", correction_threshold=thr)
        empty = np.asarray(ex.extras["empty_prompt_maps"])
        lo = empty.min(axis=(2, 3), keepdims=True)
        mm = (empty - lo) / (empty.max(axis=(2, 3), keepdims=True) - lo)
        want = np.where(mm > thr, 0.0, plain.image_maps)
        np.testing.assert_allclose(ex.image_maps, want, rtol=1e-12, atol=0)
        assert (mm > thr).any() and not (mm > thr).all()
        # the empty map does not depend on the prompt explained
        np.testing.assert_allclose(empty[:, 0], empty[:, 1], rtol=1e-10)
    # the empty map equals the uncorrected map explained against "a photo of a" (cosine target:
    # a positive multiple of the logit target, so equal after dividing by the scale)
    ref = cliplens.explain(adapter, images, ["a photo of a"], method="legrad", correction="off", towers=["image"])
    np.testing.assert_allclose(
        empty[:, 0], ref.image_maps[:, 0] / float(adapter.logit_scale()), rtol=1e-8, atol=1e-14
    )
    # CLIP: off by default, 'on' applies it
    model = make_tiny_clip(dtype=torch.float64)
    on, _ = fast(model, images, texts, correction="on")
    off, _ = fast(model, images, texts)
    assert "empty_prompt_maps" in on.extras
    assert np.all((on.image_maps == off.image_maps) | (on.image_maps == 0))
