"""SigLIP (transformers SiglipModel): sigmoid pairs, attention-pooling head, any input size.

The Chefer oracle is written from the equations in float64, one pair at a time: the model's own
eager forward gives the block attentions, the pooling head is recomputed by hand head by head
(so the pooling probabilities are an independent tensor to differentiate), and the relevance
row starts at mean_h (dy/dA_pool * A_pool)^+ before folding R = prod_l (I + Abar^l).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFSiglip2Adapter, HFSiglipAdapter, load_model
from cliplens.adapters.hf_siglip import NaFlexPreprocess, SquashPreprocess
from cliplens.errors import InputError
from cliplens.methods import REGISTRY
from conftest import clip_tokenizer, make_tiny_siglip, make_tiny_siglip2, random_image

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def adapter_for(model, **kw):
    return HFSiglipAdapter(model, clip_tokenizer(), name="tiny-siglip", **kw)


def manual_head(head, x):
    """The MAP head by hand: x (n, C) after post_layernorm -> (embedding (C,), A_pool (H, 1, n))."""
    mha = head.attention
    n, c = x.shape
    h = mha.num_heads
    d = c // h
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    probe = head.probe[0]  # (1, C)
    q = (probe @ w_q.T + b_q).reshape(1, h, d).transpose(0, 1)  # (H, 1, d)
    k = (x @ w_k.T + b_k).reshape(n, h, d).transpose(0, 1)  # (H, n, d)
    v = (x @ w_v.T + b_v).reshape(n, h, d).transpose(0, 1)
    a_pool = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)  # (H, 1, n)
    heads = [a_pool[i] @ v[i] for i in range(h)]  # each (1, d)
    o = torch.cat(heads, dim=-1) @ mha.out_proj.weight.T + mha.out_proj.bias  # (1, C)
    y = o + head.mlp(head.layernorm(o))
    return y[0], a_pool


def abar(att, grad):
    return torch.clamp(grad * att, min=0).mean(0)


def oracle_chefer(model, adapter, images, texts, target="logit", start_layer=None):
    m = copy.deepcopy(model).double()
    m.set_attn_implementation("eager")
    m.eval()
    batch = adapter.tokenize(texts)
    mask = batch.attention_mask if adapter.text_uses_mask else None
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images]).double()
    L_img, L_txt = len(m.vision_model.encoder.layers), len(m.text_model.encoder.layers)
    s_img = L_img - 1 if start_layer is None else start_layer
    s_txt = L_txt - 1 if start_layer is None else start_layer
    img_maps, tok_scores = [], []
    for b in range(len(images)):
        row_i, row_t = [], []
        for p in range(len(texts)):
            out = m(
                input_ids=batch.input_ids,
                attention_mask=mask,
                pixel_values=pixels[b : b + 1],
                output_attentions=True,
            )
            hidden = out.vision_model_output.last_hidden_state[0]  # after post_layernorm
            img_emb, a_pool = manual_head(m.vision_model.head, hidden)
            torch.testing.assert_close(
                img_emb, out.vision_model_output.pooler_output[0], rtol=1e-10, atol=1e-10
            )
            txt = out.text_model_output.pooler_output  # (P, D)
            cos = (img_emb / img_emb.norm()) @ (txt / txt.norm(dim=-1, keepdim=True)).T
            logits = m.logit_scale.exp() * cos + m.logit_bias
            y = torch.sigmoid(logits[p]) if target == "probability" else logits[p]
            v_att, t_att = out.vision_model_output.attentions, out.text_model_output.attentions
            grads = torch.autograd.grad(y, [a_pool, *v_att, *t_att], allow_unused=True)
            g_pool, gv, gt = grads[0], grads[1 : 1 + L_img], grads[1 + L_img :]
            n = v_att[0].shape[-1]
            R = torch.eye(n, dtype=torch.float64)
            for layer in range(s_img, L_img):
                R = R + abar(v_att[layer][0].detach(), gv[layer][0]) @ R
            r0 = abar(a_pool.detach(), g_pool)[0]  # (n,): the probe row
            row_i.append((r0 @ R).numpy())
            T = t_att[0].shape[-1]
            Rt = torch.eye(T, dtype=torch.float64)
            for layer in range(s_txt, L_txt):
                A = t_att[layer][p].detach()
                G = gt[layer][p] if gt[layer] is not None else torch.zeros_like(A)
                Rt = Rt + abar(A, G) @ Rt
            row_t.append(Rt[T - 1].numpy())  # SigLIP reads the last position out
        img_maps.append(row_i)
        tok_scores.append(row_t)
    return np.array(img_maps), np.array(tok_scores), batch


@pytest.mark.parametrize("start_layer", [None, 0])
@pytest.mark.parametrize("target", ["logit", "probability"])
def test_chefer_matches_float64_oracle(start_layer, target):
    model = make_tiny_siglip(dtype=torch.float64)
    adapter = adapter_for(model)
    images = [random_image(1), random_image(2, size=(40, 64))]
    ex = cliplens.explain(adapter, images, TEXTS, method="chefer", start_layer=start_layer, target=target)
    img_ref, tok_ref, batch = oracle_chefer(
        model, adapter, images, TEXTS, target=target, start_layer=start_layer
    )
    B, P = len(images), len(TEXTS)
    assert ex.image_maps.shape == (B, P, 4, 4)
    np.testing.assert_allclose(ex.image_maps.reshape(B, P, -1), img_ref, rtol=1e-6, atol=1e-10)
    valid = batch.attention_mask.numpy().astype(bool)
    for p in range(P):
        np.testing.assert_allclose(
            ex.token_scores[:, p, valid[p]], tok_ref[:, p, valid[p]], rtol=1e-6, atol=1e-10
        )
        assert np.isnan(ex.token_scores[:, p, ~valid[p]]).all()
    assert np.ptp(ex.image_maps) > 1e-4  # not trivial
    assert not np.allclose(ex.image_maps[:, 0], ex.image_maps[:, 1])


@pytest.mark.parametrize("uses_mask", [True, False])
def test_logits_and_sigmoid_probs_match_model_forward(uses_mask):
    model = make_tiny_siglip()
    adapter = adapter_for(model)
    if not uses_mask:  # a tokenizer that returns no attention mask (SigLIP's original setup)
        adapter.text_uses_mask = False
    images = [random_image(6), random_image(7, size=(50, 30))]
    ex = cliplens.explain(adapter, images, TEXTS, method="chefer", target="probability")
    batch = adapter.tokenize(TEXTS)
    pixels = torch.stack([adapter.preprocess(img)[0] for img in images])
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask if uses_mask else None,
            pixel_values=pixels,
        )
    # float32, the model's default SDPA kernel against the eager path on sharpened attention
    np.testing.assert_allclose(ex.logits, out.logits_per_image.numpy(), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ex.probs, torch.sigmoid(out.logits_per_image).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ex.target_values, ex.probs, rtol=1e-6)
    assert adapter.pair_probability == "sigmoid"
    assert float(adapter.logit_bias()) == pytest.approx(-2.0)


def test_text_is_padded_to_the_context_and_read_at_the_last_position():
    adapter = adapter_for(make_tiny_siglip())
    batch = adapter.tokenize(["a cat", "a photo of a small dog"])
    assert batch.input_ids.shape == (2, adapter.context_length)
    with adapter.explaining(), torch.no_grad():
        run = adapter.run_text(batch.input_ids, batch.attention_mask)
    assert run.layout.readout.tolist() == [adapter.context_length - 1] * 2
    assert run.layout.content[0].sum() == 2  # "a", "cat": no start/end markers, no padding
    assert not run.layout.has_readout_token or run.layout.readout.min() >= 0


@pytest.mark.parametrize("size", [(448, 448), (336, 448)])
def test_any_input_size_matches_model_with_interpolated_positions(size):
    # the reference is the model's own forward on the same (eager) kernel: transformers' eager
    # softmax runs in float32 even for float64 models, which alone moves 784-token outputs by 1e-5
    model = make_tiny_siglip(image_size=64, patch_size=16, dtype=torch.float64)
    adapter = adapter_for(model)
    h, w = size
    pixels = torch.randn(2, 3, h, w, dtype=torch.float64)
    with adapter.explaining(), torch.no_grad():
        run = adapter.run_image(pixels)
    reference = copy.deepcopy(model).eval()
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        ref = reference.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(run.embeds, ref, rtol=1e-9, atol=1e-10)
    assert run.layout.grid == (h // 16, w // 16)
    assert run.pool_attention.shape == (2, 4, 1, (h // 16) * (w // 16))
    torch.testing.assert_close(run.pool_attention.sum(-1), torch.ones(2, 4, 1, dtype=torch.float64))


@pytest.mark.parametrize("original", [(448, 448), (448, 336)])
def test_full_resize_keeps_the_aspect_ratio_and_maps_back(original):
    model = make_tiny_siglip(image_size=64, patch_size=16)
    adapter = adapter_for(model)
    image = random_image(3, size=original)
    ex = cliplens.explain(adapter, [image], ["a cat"], method="chefer", resize="full")
    w, h = original
    gh, gw = ex.image_maps.shape[-2:]
    assert (gh, gw) == ((64 * h // min(w, h)) // 16, (64 * w // min(w, h)) // 16)
    back = ex.geometries[0].grid_to_original(ex.image_maps[0, 0])
    assert back.shape == (h, w) and np.isfinite(back).all()  # nothing cropped away
    # the model's own resize squashes the image to the model size: every pixel is seen too
    ex_model = cliplens.explain(adapter, [image], ["a cat"], method="chefer")
    assert ex_model.image_maps.shape[-2:] == (4, 4)
    assert np.isfinite(ex_model.geometries[0].grid_to_original(ex_model.image_maps[0, 0])).all()


def _state(model):
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )
    return {
        "attn": [
            c._attn_implementation
            for c in (model.config, model.config.text_config, model.config.vision_config)
        ],
        "grad": [p.requires_grad for p in model.parameters()],
        "train": [m.training for m in model.modules()],
        "hooks": hooks,
        "patched": [name for name, m in model.named_modules() if "forward" in m.__dict__],
    }


def test_model_unchanged_after_explain_and_after_a_failure():
    model = make_tiny_siglip()
    model.train()
    adapter = adapter_for(model)
    before = _state(model)
    model.eval()
    pixels = torch.stack([adapter.preprocess(random_image(9))[0]])
    batch = adapter.tokenize(["a cat"])
    with torch.no_grad():
        ref = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels
        ).logits_per_image
    model.train()
    cliplens.explain(adapter, [random_image(1)], ["a cat", "a dog"], method="chefer")
    assert _state(model) == before

    class Boom(Exception):
        pass

    class BadTarget(cliplens.Target):
        name = "bad"

        def __call__(self, ctx):
            raise Boom("target failed")

    with pytest.raises(Boom):
        cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer", target=BadTarget())
    assert _state(model) == before
    model.eval()
    with torch.no_grad():
        after = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels
        ).logits_per_image
    assert torch.equal(ref, after)


def test_readout_with_attention_reads_through_the_pooling_head():
    model = make_tiny_siglip()
    adapter = adapter_for(model)
    pixels = torch.randn(2, 3, 32, 32)
    with adapter.explaining(), torch.no_grad():
        run = adapter.run_image(pixels)
        embeds, pool = adapter.readout_with_attention("image", run.block_outputs[-1], run.layout)
        assert adapter.readout("image", run.block_outputs[-1], run.layout).shape == embeds.shape
    torch.testing.assert_close(embeds, run.embeds)
    torch.testing.assert_close(pool, run.pool_attention)
    assert not run.layout.has_readout_token


def test_head_is_the_text_readout_and_refused_for_the_pooled_image_tower():
    adapter = adapter_for(make_tiny_siglip())
    batch = adapter.tokenize(TEXTS)
    with adapter.explaining(), torch.no_grad():
        run = adapter.run_text(batch.input_ids, batch.attention_mask)
        last = run.block_outputs[-1]
        rows = torch.arange(last.shape[0])
        torch.testing.assert_close(adapter.head("text", last[rows, run.layout.readout]), run.embeds)
        with pytest.raises(NotImplementedError, match="attention-pooling head"):
            adapter.head("image", torch.zeros(1, last.shape[-1]))


def test_every_registered_method_supports_siglip_or_refuses_clearly():
    adapter = adapter_for(make_tiny_siglip())
    images, texts = [random_image(4)], ["a red cat", "dog"]
    for name in REGISTRY:
        try:
            ex = cliplens.explain(adapter, images, texts, method=name)
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        if ex.image_maps is not None:
            assert np.asarray(ex.image_maps).shape[:2] == (1, 2)
            assert np.isfinite(np.asarray(ex.image_maps)).all(), name


def test_load_model_dispatches_siglip_checkpoints(tmp_path):
    model = make_tiny_siglip()
    path = tmp_path / "tiny-siglip"
    model.save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"height": 32, "width": 32},
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
                "resample": 3,
            }
        )
    )
    adapter = load_model(str(path))
    assert isinstance(adapter, HFSiglipAdapter)
    assert isinstance(adapter.preprocess, SquashPreprocess)
    assert adapter.family == "hf-siglip"
    ex = cliplens.explain(adapter, [random_image(5)], ["a cat"], method="chefer")
    assert ex.meta["family"] == "hf-siglip"
    assert cliplens.adapters.adapt(model, clip_tokenizer()).family == "hf-siglip"


# ---- SigLIP 2 (NaFlex) ----------------------------------------------------------------------------


def test_naflex_size_and_patch_order_follow_the_processor():
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        convert_image_to_patches,
        get_image_size_for_max_num_patches,
    )

    from cliplens.adapters.hf_siglip import size_for_max_patches

    for h, w in [(480, 640), (640, 480), (224, 224), (100, 1000), (17, 23)]:
        assert size_for_max_patches(h, w, 16, 256) == get_image_size_for_max_num_patches(h, w, 16, 256)
    adapter = HFSiglip2Adapter(make_tiny_siglip2(), clip_tokenizer())
    pixels = torch.randn(1, 3, 16, 24)
    captured = {}

    def grab(module, args, kwargs):
        captured["patches"] = kwargs["pixel_values"]

    handle = adapter.model.vision_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with adapter.explaining(), torch.no_grad():
            adapter.run_image(pixels)
    finally:
        handle.remove()
    expected = convert_image_to_patches(pixels[0].numpy(), 8)
    np.testing.assert_array_equal(captured["patches"][0].numpy(), expected)


@pytest.mark.parametrize("size", [(32, 32), (448, 448), (336, 448)])
def test_siglip2_matches_model_at_any_size(size):
    model = make_tiny_siglip2(patch_size=16, dtype=torch.float64)
    adapter = HFSiglip2Adapter(model, clip_tokenizer())
    h, w = size
    pixels = torch.randn(2, 3, h, w, dtype=torch.float64)
    with adapter.explaining(), torch.no_grad():
        run = adapter.run_image(pixels)
    gh, gw = h // 16, w // 16
    patches = pixels.reshape(2, 3, gh, 16, gw, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, gh * gw, -1)
    reference = copy.deepcopy(model).eval()
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        ref = reference.get_image_features(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, gh * gw, dtype=torch.long),
            spatial_shapes=torch.tensor([[gh, gw]] * 2),
        ).pooler_output
    torch.testing.assert_close(run.embeds, ref, rtol=1e-9, atol=1e-10)
    assert run.pool_attention.shape == (2, 4, 1, gh * gw) and run.layout.grid == (gh, gw)


def test_siglip2_chefer_starts_from_the_pooling_head_and_matches_the_logits():
    model = make_tiny_siglip2(dtype=torch.float64)
    adapter = HFSiglip2Adapter(model, clip_tokenizer())
    image = random_image(3, size=(48, 40))
    ex = cliplens.explain(adapter, [image], TEXTS, method="chefer", towers=("image",))
    pixels = adapter.preprocess(image)[0][None].double()
    batch = adapter.tokenize(TEXTS)
    with adapter.explaining():
        with torch.enable_grad():
            img = adapter.run_image(pixels)
        with torch.no_grad():
            txt = adapter.run_text(batch.input_ids, batch.attention_mask).embeds
        for p in range(len(TEXTS)):
            cos = torch.nn.functional.cosine_similarity(img.embeds[0], txt[p], dim=0)
            y = adapter.logit_scale() * cos + adapter.logit_bias()
            assert y.item() == pytest.approx(ex.logits[0, p], rel=1e-9)
            g_pool, g_last = torch.autograd.grad(
                y, [img.pool_attention, img.attentions[-1]], retain_graph=True
            )
            r = abar(img.pool_attention[0].detach(), g_pool[0])[0]
            r = r + r @ abar(img.attentions[-1][0].detach(), g_last[0])
            np.testing.assert_allclose(ex.image_maps[0, p].reshape(-1), r.numpy(), rtol=1e-8, atol=1e-12)


def test_siglip2_checkpoint_loads_and_every_method_runs_or_refuses(tmp_path):
    model = make_tiny_siglip2()
    path = tmp_path / "tiny-siglip2"
    model.save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"max_num_patches": 16, "patch_size": 8}))
    adapter = load_model(str(path))
    assert isinstance(adapter, HFSiglip2Adapter) and adapter.family == "hf-siglip2"
    assert isinstance(adapter.preprocess, NaFlexPreprocess) and adapter.preprocess.max_patches == 16
    assert cliplens.adapters.adapt(model, clip_tokenizer()).family == "hf-siglip2"
    for name in REGISTRY:
        try:
            ex = cliplens.explain(
                adapter, [random_image(4, size=(60, 40))], ["a red cat", "dog"], method=name
            )
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        if ex.image_maps is not None:
            assert np.asarray(ex.image_maps).shape[:2] == (1, 2)
            assert np.isfinite(np.asarray(ex.image_maps)).all(), name
