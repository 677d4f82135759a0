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


def oracle_legrad(model, adapter, images, texts, target="logit", layers=None, pooling="model", versus=None):
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
    ex = cliplens.explain(adapter, images, texts, method="legrad", towers=["image"])
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
