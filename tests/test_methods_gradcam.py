"""Grad-CAM on the stream entering the last block: fast path against a float64 oracle with
explicit loops over channels and patches, one pair at a time."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from conftest import clip_tokenizer, make_tiny_clip, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def oracle_gradcam(model, adapter, images, texts, target="logit", layer=None, versus=None):
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("eager")
    m.eval()
    batch = adapter.tokenize(texts)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
    L = m.config.vision_config.num_hidden_layers
    layer = L - 1 if layer is None else layer
    out_maps = []
    for b in range(len(images)):
        row = []
        for p in range(len(texts)):
            out = m(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=pixels[b : b + 1],
                output_hidden_states=True,
            )
            logits = out.logits_per_image[0]
            if target == "logit":
                y = logits[p]
            elif target == "probability":
                y = logits.softmax(-1)[p]
            else:
                y = logits[p] - logits[versus]
            # hidden_states[l] is the stream entering block l (index 0: after pre_layrnorm)
            F = out.vision_model_output.hidden_states[layer]
            (G,) = torch.autograd.grad(y, [F])
            F, G = F[0, 1:].detach(), G[0, 1:]
            N, C = F.shape
            cam = torch.zeros(N, dtype=torch.float64)
            for c in range(C):
                alpha = G[:, c].sum() / N
                cam += alpha * F[:, c]
            row.append(cam.numpy())
        out_maps.append(row)
    return np.array(out_maps)


def explain(model, images, texts, **kw):
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    return cliplens.explain(adapter, images, texts, method="gradcam", **kw), adapter


@pytest.mark.parametrize(
    "layer,target", [(None, "logit"), (1, "logit"), (None, "probability"), (None, "contrast")]
)
def test_gradcam_matches_float64_oracle(layer, target):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2)]
    kw = {} if layer is None else {"layer": layer}
    tgt = "contrast:0" if target == "contrast" else target
    ex, adapter = explain(model, images, TEXTS, target=tgt, **kw)
    ref = oracle_gradcam(model, adapter, images, TEXTS, target=target, layer=layer, versus=0)
    B, P = 2, 3
    signed = ex.extras["signed"].reshape(B, P, -1)
    np.testing.assert_allclose(signed, ref, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(ex.image_maps.reshape(B, P, -1), np.maximum(ref, 0), rtol=1e-7, atol=1e-12)
    assert ex.token_scores is None
    if target == "logit":
        assert (signed < 0).any() and (signed > 0).any()  # the ReLU does something here
        assert not np.allclose(signed[:, 0], signed[:, 1])


def test_gradcam_has_no_text_side():
    model = make_tiny_clip()
    with pytest.raises(cliplens.InputError):
        explain(model, [random_image(1)], ["a cat"], towers=["text"])
