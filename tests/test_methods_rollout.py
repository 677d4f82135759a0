"""Attention rollout: the row fast path against full n x n matrix products in float64, and a
closed-form answer on a model whose attention is exactly uniform."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from conftest import clip_tokenizer, make_tiny_clip, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def rollout_matrix(attentions, start: int) -> torch.Tensor:
    """R = Ahat^{L-1} ... Ahat^{start}, Ahat = rownormalise(mean_h A + I), full matrices."""
    n = attentions[0].shape[-1]
    R = torch.eye(n, dtype=torch.float64)
    for A in attentions[start:]:
        abar = A.mean(0) + torch.eye(n, dtype=torch.float64)
        abar = abar / abar.sum(-1, keepdim=True)
        R = abar @ R
    return R


def oracle_rollout(model, adapter, images, texts, start=0):
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("eager")
    m.eval()
    batch = adapter.tokenize(texts)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
    eots = adapter._readout_positions(batch.input_ids)
    with torch.no_grad():
        vout = m.vision_model(pixel_values=pixels, output_attentions=True, interpolate_pos_encoding=True)
        tout = m.text_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True
        )
    img = [rollout_matrix([a[b] for a in vout.attentions], start)[0, 1:].numpy() for b in range(len(images))]
    tok = [rollout_matrix([a[p] for a in tout.attentions], start)[eots[p]].numpy() for p in range(len(texts))]
    return np.array(img), np.array(tok), batch


def explain(model, images, texts, **kw):
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    return cliplens.explain(adapter, images, texts, method="rollout", **kw), adapter


@pytest.mark.parametrize("start_layer", [None, 1, -1])
def test_rollout_matches_full_matrix_oracle(start_layer):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2, size=(40, 64))]
    kw = {} if start_layer is None else {"start_layer": start_layer}
    ex, adapter = explain(model, images, TEXTS, **kw)
    start = {None: 0, 1: 1, -1: 2}[start_layer]
    ref_img, ref_tok, batch = oracle_rollout(model, adapter, images, TEXTS, start=start)
    B, P = 2, 3
    assert ex.image_maps.shape == (B, P, 4, 4)
    for p in range(P):  # the same map for every prompt: no gradient, nothing prompt-specific
        np.testing.assert_allclose(ex.image_maps[:, p].reshape(B, -1), ref_img, rtol=1e-10, atol=1e-13)
    valid = batch.attention_mask.numpy().astype(bool)
    tstart = {None: 0, 1: 1, -1: 1}[start_layer]  # the text tower has 2 blocks
    _, ref_tok, _ = oracle_rollout(model, adapter, images, TEXTS, start=tstart)
    for b in range(B):
        for p in range(P):
            np.testing.assert_allclose(
                ex.token_scores[b, p, valid[p]], ref_tok[p, valid[p]], rtol=1e-10, atol=1e-13
            )
    assert np.ptp(ex.image_maps) > 1e-4


def uniform_attention_model():
    """Queries and keys zeroed: every head attends uniformly (over the allowed keys)."""
    model = make_tiny_clip(dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.zero_()
    return model


def test_rollout_known_answer_uniform_attention():
    """Uniform attention U = 11^T/n: the readout row after k blocks is 1/n + (e_0 - 1/n)/2^k,
    so every patch gets (1 - 2^-L)/n."""
    model = uniform_attention_model()
    ex, _ = explain(model, [random_image(3)], ["a cat", "two dogs"], towers=["image"])
    n, L = 17, 3
    # HF's eager attention takes its softmax in float32 even for a float64 model
    np.testing.assert_allclose(ex.image_maps, (1 - 2.0**-L) / n, rtol=1e-7)
    ex2, _ = explain(model, [random_image(3)], ["a cat"], towers=["image"], start_layer=2)
    np.testing.assert_allclose(ex2.image_maps, (1 - 2.0**-1) / n, rtol=1e-7)


def test_rollout_known_answer_identity_attention(monkeypatch):
    """Attention that is exactly the identity: Ahat = I, the readout row stays one-hot on the
    class token, every patch gets 0."""
    model = make_tiny_clip(dtype=torch.float64)
    import transformers.models.clip.modeling_clip as mc

    original = mc.eager_attention_forward

    def identity_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        _, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kw)
        eye = torch.eye(weights.shape[-1], dtype=weights.dtype).expand_as(weights)
        return torch.matmul(eye, value).transpose(1, 2).contiguous(), eye

    monkeypatch.setattr(mc, "eager_attention_forward", identity_attention)
    ex, _ = explain(model, [random_image(3)], ["a cat"])
    np.testing.assert_array_equal(ex.image_maps, 0.0)
    assert np.nansum(ex.token_scores[0, 0]) == pytest.approx(1.0)
