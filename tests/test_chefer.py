"""Chefer relevance: fast path against a slow float64 oracle written from the equations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from conftest import clip_tokenizer, make_tiny_clip, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def oracle_chefer(model, adapter, images, texts, target="logit", start_layer=None, versus=None):
    """Plain loops and full n x n matrices, one pair at a time, float64.

    For pair (b, p): a full forward of image b with ALL prompts, y from the logits row,
    gradients w.r.t. every block's attention, R = I; R += Abar R; image row R[0, 1:],
    text row R[eot, :] of prompt p.
    """
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("eager")
    m.eval()
    batch = adapter.tokenize(texts)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
    B, P = len(images), len(texts)
    L_img = m.config.vision_config.num_hidden_layers
    L_txt = m.config.text_config.num_hidden_layers
    s_img = L_img - 1 if start_layer is None else start_layer
    s_txt = L_txt - 1 if start_layer is None else start_layer
    img_maps, tok_scores = [], []
    for b in range(B):
        row_i, row_t = [], []
        for p in range(P):
            out = m(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=pixels[b : b + 1],
                output_attentions=True,
            )
            logits = out.logits_per_image[0]
            if target == "logit":
                y = logits[p]
            elif target == "probability":
                y = logits.softmax(-1)[p]
            else:
                y = logits[p] - logits[versus]
            v_att = out.vision_model_output.attentions
            t_att = out.text_model_output.attentions
            grads = torch.autograd.grad(y, list(v_att) + list(t_att), allow_unused=True)
            gv, gt = grads[:L_img], grads[L_img:]
            n = v_att[0].shape[-1]
            R = torch.eye(n, dtype=torch.float64)
            for l in range(s_img, L_img):
                A, G = v_att[l][0].detach(), gv[l][0]
                abar = torch.zeros(n, n, dtype=torch.float64)
                for h in range(A.shape[0]):
                    abar += torch.clamp(G[h] * A[h], min=0)
                abar /= A.shape[0]
                R = R + abar @ R
            row_i.append(R[0, 1:].numpy())
            T = t_att[0].shape[-1]
            eot = int(adapter._readout_positions(batch.input_ids)[p])
            Rt = torch.eye(T, dtype=torch.float64)
            for l in range(s_txt, L_txt):
                A = t_att[l][p].detach()
                G = gt[l][p] if gt[l] is not None else torch.zeros_like(A)
                abar = torch.clamp(G * A, min=0).mean(0)
                Rt = Rt + abar @ Rt
            row_t.append(Rt[eot].numpy())
        img_maps.append(row_i)
        tok_scores.append(row_t)
    return np.array(img_maps), np.array(tok_scores), batch


def fast(model, images, texts, **kw):
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    return cliplens.explain(adapter, images, texts, method="chefer", **kw), adapter


@pytest.mark.parametrize("start_layer", [None, 0, 1])
def test_chefer_matches_float64_oracle(start_layer):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2, size=(40, 64))]
    ex, adapter = fast(model, images, TEXTS, start_layer=start_layer)
    img_ref, tok_ref, batch = oracle_chefer(model, adapter, images, TEXTS, start_layer=start_layer)
    B, P = len(images), len(TEXTS)
    assert ex.image_maps.shape == (B, P, 4, 4)
    np.testing.assert_allclose(ex.image_maps.reshape(B, P, -1), img_ref, rtol=1e-6, atol=1e-9)
    valid = batch.attention_mask.numpy().astype(bool)
    for p in range(P):
        np.testing.assert_allclose(ex.token_scores[:, p, valid[p]], tok_ref[:, p, valid[p]], rtol=1e-6, atol=1e-9)
        assert np.isnan(ex.token_scores[:, p, ~valid[p]]).all()
    # the maps are not trivial: relevance differs across patches and across prompts
    assert np.ptp(ex.image_maps) > 1e-3
    assert not np.allclose(ex.image_maps[:, 0], ex.image_maps[:, 1])


@pytest.mark.parametrize("target", ["probability", "contrast"])
def test_chefer_targets_match_oracle(target):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(3)]
    tgt = "contrast:2" if target == "contrast" else target
    ex, adapter = fast(model, images, TEXTS, target=tgt, start_layer=0)
    img_ref, tok_ref, batch = oracle_chefer(model, adapter, images, TEXTS, target=target, start_layer=0, versus=2)
    np.testing.assert_allclose(ex.image_maps.reshape(1, 3, -1), img_ref, rtol=1e-6, atol=1e-9)
    valid = batch.attention_mask.numpy().astype(bool)
    for p in range(3):
        np.testing.assert_allclose(ex.token_scores[:, p, valid[p]], tok_ref[:, p, valid[p]], rtol=1e-6, atol=1e-9)
    if target == "contrast":  # prompt 2 against itself: zero target, identity relevance only
        assert np.allclose(ex.target_values[0, 2], 0.0)
        assert np.allclose(ex.image_maps[0, 2], 0.0)


def test_batch_equals_one_by_one():
    model = make_tiny_clip()
    images = [random_image(4), random_image(5, size=(64, 30))]
    ex, _ = fast(model, images, TEXTS, start_layer=0)
    for b, img in enumerate(images):
        for p, text in enumerate(TEXTS):
            single, _ = fast(model, [img], [text], start_layer=0)
            np.testing.assert_allclose(single.image_maps[0, 0], ex.image_maps[b, p], rtol=1e-5, atol=1e-7)
            t = len(single.tokens[0])
            np.testing.assert_allclose(single.token_scores[0, 0, :t], ex.token_scores[b, p, :t], rtol=1e-5, atol=1e-7)
            assert single.logits[0, 0] == pytest.approx(ex.logits[b, p], rel=1e-5)


def test_logits_and_probs_match_model_forward():
    model = make_tiny_clip()
    images = [random_image(6), random_image(7)]
    ex, adapter = fast(model, images, TEXTS)
    batch = adapter.tokenize(TEXTS)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images])
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)
    # float32 through two code paths (ours and the model's forward): tolerances relative to the
    # logits' scale, which hold on any BLAS; the explained logit and the reported one are the
    # same formula on the same embeddings, so those two agree exactly
    scale = np.abs(out.logits_per_image.numpy()).max()
    np.testing.assert_allclose(ex.logits, out.logits_per_image.numpy(), rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(ex.probs, out.logits_per_image.softmax(-1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ex.target_values, ex.logits)

