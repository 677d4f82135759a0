"""Raw attention: the head-mean readout row of one block, against the model's own attention
output in float64, and the uniform-attention known answer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from conftest import clip_tokenizer, make_tiny_clip, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def explain(model, images, texts, **kw):
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    return cliplens.explain(adapter, images, texts, method="raw_attention", **kw), adapter


@pytest.mark.parametrize("layer", [None, 0, -2])
def test_raw_attention_matches_oracle(layer):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2)]
    kw = {} if layer is None else {"layer": layer}
    ex, adapter = explain(model, images, TEXTS, **kw)
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    batch = adapter.tokenize(TEXTS)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
    with torch.no_grad():
        vatt = m.vision_model(pixel_values=pixels, output_attentions=True).attentions
        tatt = m.text_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True
        ).attentions
    lv = {None: 2, 0: 0, -2: 1}[layer]
    lt = {None: 1, 0: 0, -2: 0}[layer]
    eots = adapter._readout_positions(batch.input_ids)
    valid = batch.attention_mask.numpy().astype(bool)
    for b in range(2):
        A = vatt[lv][b]
        ref = np.array([sum(A[h, 0, j].item() for h in range(A.shape[0])) / A.shape[0] for j in range(1, 17)])
        for p in range(3):
            np.testing.assert_allclose(ex.image_maps[b, p].ravel(), ref, rtol=1e-12)
            At = tatt[lt][p]
            ref_t = At[:, eots[p]].mean(0).numpy()
            np.testing.assert_allclose(ex.token_scores[b, p, valid[p]], ref_t[valid[p]], rtol=1e-12)


def test_raw_attention_uniform_known_answer():
    model = make_tiny_clip(dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.zero_()
    ex, adapter = explain(model, [random_image(3)], ["a cat"])
    np.testing.assert_allclose(ex.image_maps, 1 / 17, rtol=1e-7)  # softmax runs in float32 in HF eager
    eot = int(adapter._readout_positions(adapter.tokenize(["a cat"]).input_ids)[0])
    np.testing.assert_allclose(
        ex.token_scores[0, 0, : eot + 1], 1 / (eot + 1), rtol=1e-7
    )  # causal: keys 0..eot
