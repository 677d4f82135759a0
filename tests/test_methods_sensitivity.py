"""Input-gradient sensitivity: every variant against a float64 oracle (one pair at a time, the
embedding stage's output swapped for a leaf by a hook on the oracle's own copy of the model),
and the known answer behind the seed blog's finding: a pixel gradient is the patch
convolution's filters weighted by the patch's embedding gradient."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from conftest import clip_tokenizer, make_tiny_clip, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


class Oracle:
    def __init__(self, model, adapter, images, texts, target="logit", versus=None):
        m = copy.deepcopy(model).double()
        m.set_attn_implementation("eager")
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        self.m, self.target, self.versus = m, target, versus
        self.batch = adapter.tokenize(texts)
        self.pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
        self.ph = m.config.vision_config.patch_size

    def y(self, b, p, image_embeds=None, text_embeds=None, pixels=None):
        """The target of pair (b, p) from a full model call, optionally with the embedding
        outputs replaced."""
        m = self.m
        handles = []
        if image_embeds is not None:
            handles.append(m.vision_model.embeddings.register_forward_hook(lambda mod, a, out: image_embeds))
        if text_embeds is not None:
            handles.append(m.text_model.embeddings.register_forward_hook(lambda mod, a, out: text_embeds))
        try:
            px = self.pixels[b : b + 1] if pixels is None else pixels
            out = m(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, pixel_values=px)
        finally:
            for h in handles:
                h.remove()
        logits = out.logits_per_image[0]
        if self.target == "logit":
            return logits[p]
        if self.target == "probability":
            return logits.softmax(-1)[p]
        return logits[p] - logits[self.versus]

    def image_embeds(self, b):
        with torch.no_grad():
            return self.m.vision_model.embeddings(self.pixels[b : b + 1], interpolate_pos_encoding=True)

    def text_embeds(self):
        with torch.no_grad():
            return self.m.text_model.embeddings(input_ids=self.batch.input_ids)

    def embed_variant(self, b, p, variant):
        x = self.image_embeds(b).requires_grad_(True)
        (g,) = torch.autograd.grad(self.y(b, p, image_embeds=x), [x])
        g, x = g[0, 1:], x[0, 1:].detach()
        out = []
        for j in range(g.shape[0]):
            if variant == "grad_norm":
                out.append(np.sqrt(sum(v * v for v in g[j].tolist())))
            else:
                out.append(sum(a * c for a, c in zip(g[j].tolist(), x[j].tolist())))
        return np.array(out)

    def text_variant(self, b, p, variant):
        x = self.text_embeds().requires_grad_(True)
        (g,) = torch.autograd.grad(self.y(b, p, text_embeds=x), [x])
        g, x = g[p], x[p].detach()
        return (g.norm(dim=-1) if variant == "grad_norm" else (g * x).sum(-1)).numpy()

    def pixel_variant(self, b, p):
        px = self.pixels[b : b + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.y(b, p, pixels=px), [px])
        g = g[0]
        _, h, w = g.shape
        ph = self.ph
        out = np.zeros((h // ph, w // ph))
        for i in range(h // ph):
            for j in range(w // ph):
                out[i, j] = g[:, i * ph : (i + 1) * ph, j * ph : (j + 1) * ph].pow(2).sum().sqrt()
        return out, g.pow(2).sum(0).sqrt().numpy()

    def iterative(self, b, p, steps, step_size):
        x0 = self.image_embeds(b)
        rms = x0[0, 1:].norm(dim=-1).pow(2).mean().sqrt()
        x, path = x0.clone(), []
        for _ in range(steps):
            xl = x.clone().requires_grad_(True)
            y = self.y(b, p, image_embeds=xl)
            (g,) = torch.autograd.grad(y, [xl])
            path.append(y.item())
            g[0, 0] = 0.0  # the class token is not descended on
            x = x - step_size * rms * g / g.norm()
        with torch.no_grad():
            path.append(self.y(b, p, image_embeds=x).item())
        return (x - x0)[0, 1:].norm(dim=-1).numpy(), np.array(path)


def explain(model, images, texts, **kw):
    adapter = HFClipAdapter(model, clip_tokenizer(), name="tiny")
    return cliplens.explain(adapter, images, texts, method="sensitivity", **kw), adapter


@pytest.mark.parametrize(
    "variant,target",
    [
        ("grad_norm", "logit"),
        ("grad_x_input", "logit"),
        ("grad_x_input", "probability"),
        ("grad_norm", "contrast"),
    ],
)
def test_embedding_variants_match_oracle(variant, target):
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2)]
    tgt = "contrast:2" if target == "contrast" else target
    ex, adapter = explain(model, images, TEXTS, variant=variant, target=tgt)
    orc = Oracle(model, adapter, images, TEXTS, target=target, versus=2)
    valid = orc.batch.attention_mask.numpy().astype(bool)
    for b in range(2):
        for p in range(3):
            np.testing.assert_allclose(
                ex.image_maps[b, p].ravel(), orc.embed_variant(b, p, variant), rtol=1e-7, atol=1e-14
            )
            np.testing.assert_allclose(
                ex.token_scores[b, p, valid[p]],
                orc.text_variant(b, p, variant)[valid[p]],
                rtol=1e-7,
                atol=1e-14,
            )
    if variant == "grad_x_input":
        assert (ex.image_maps < 0).any()  # signed


def test_pixel_grad_matches_oracle_and_shows_the_convolution():
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1), random_image(2)]
    ex, adapter = explain(model, images, TEXTS, variant="pixel_grad")
    assert ex.token_scores is None
    orc = Oracle(model, adapter, images, TEXTS)
    for b in range(2):
        for p in range(3):
            per_patch, per_pixel = orc.pixel_variant(b, p)
            np.testing.assert_allclose(ex.image_maps[b, p], per_patch, rtol=1e-7)
            np.testing.assert_allclose(ex.extras["pixel_saliency"][b, p], per_pixel, rtol=1e-7, atol=1e-14)
    # Known answer: inside patch j the pixel gradient is W^T g_j (W: the patch convolution,
    # g_j: the embedding gradient at patch j), a fixed filter pattern tiled over the grid.
    x = orc.image_embeds(0).requires_grad_(True)
    (g,) = torch.autograd.grad(orc.y(0, 0, image_embeds=x), [x])
    W = orc.m.vision_model.embeddings.patch_embedding.weight  # (C, 3, ph, ph)
    tiles = torch.einsum("jc,cxuv->jxuv", g[0, 1:], W)  # (N, 3, ph, ph)
    gh = gw = 4
    rebuilt = tiles.reshape(gh, gw, 3, 8, 8).permute(2, 0, 3, 1, 4).reshape(3, 32, 32)
    np.testing.assert_allclose(
        ex.extras["pixel_saliency"][0, 0], rebuilt.pow(2).sum(0).sqrt().numpy(), rtol=1e-7
    )


def test_iterative_matches_oracle():
    model = make_tiny_clip(dtype=torch.float64)
    images = [random_image(1)]
    ex, adapter = explain(model, images, TEXTS[:2], variant="iterative", steps=3, step_size=0.1)
    orc = Oracle(model, adapter, images, TEXTS[:2])
    for p in range(2):
        change, path = orc.iterative(0, p, steps=3, step_size=0.1)
        np.testing.assert_allclose(ex.image_maps[0, p].ravel(), change, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ex.extras["target_path"][0, p], path, rtol=1e-7)
        assert path[-1] < path[0]  # the descent lowered the target


def test_bad_options():
    model = make_tiny_clip()
    for kw in (
        {"variant": "smoothgrad"},
        {"variant": "iterative", "steps": 0},
        {"variant": "iterative", "step_size": -1},
    ):
        with pytest.raises(cliplens.InputError):
            explain(model, [random_image(1)], ["a cat"], **kw)
