"""open_clip ViT CLIP models: the capture path reproduces the model, Chefer against a float64
oracle written from the equations, any input size, loading by name offline, refusals.

Needs the open_clip extra (open-clip-torch and a matching torchvision): ``pytest -m open_clip``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cliplens
from cliplens.errors import InputError, ModelLoadError
from cliplens.methods import REGISTRY
from conftest import make_tiny_open_clip, random_image

pytestmark = pytest.mark.open_clip
open_clip = pytest.importorskip("open_clip")

from cliplens.adapters.open_clip import OpenClipAdapter  # noqa: E402 (after the importorskip)

TEXTS = ["a red triangle", "a photo of a small dog !", "cat"]

VARIANTS = {
    "openai-quickgelu": dict(),
    "gelu": dict(quick_gelu=False),
    "layer-scale": dict(ls_init_value=0.5),
    "custom-blocks": dict(
        qk_norm=True, scale_heads=True, scale_attn=True, scale_attn_inner=True, scale_fc=True
    ),
    "attention-pool": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4),
    "final-ln-after-pool": dict(final_ln_after_pool=True),
}


def tiny(variant="openai-quickgelu", dtype=torch.float32, seed=0, **kw):
    options = dict(VARIANTS[variant])
    quick = options.pop("quick_gelu", True)
    return make_tiny_open_clip(seed=seed, dtype=dtype, quick_gelu=quick, **options, **kw).eval()


def oc_tokens(texts, context=16):
    return open_clip.tokenize(texts, context_length=context)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_capture_path_reproduces_the_model(variant):
    model = tiny(variant, dtype=torch.float64)
    adapter = OpenClipAdapter(model)
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    batch = adapter.tokenize(TEXTS)
    with torch.no_grad():
        ref_img = model.encode_image(pixels)
        ref_txt = model.encode_text(oc_tokens(TEXTS))
        with adapter.explaining():
            img = adapter.run_image(pixels)
            txt = adapter.run_text(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(img.embeds, ref_img, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(txt.embeds, ref_txt, rtol=1e-10, atol=1e-10)
    L = len(model.visual.transformer.resblocks)
    assert len(img.attentions) == len(img.block_inputs) == len(img.block_outputs) == L
    assert img.attentions[0].shape == (3, 4, 17, 17)
    for att in img.attentions + txt.attentions:
        torch.testing.assert_close(att.sum(-1), torch.ones_like(att.sum(-1)))
    # causal text tower: nothing attends to a later token
    assert torch.all(torch.triu(txt.attentions[0], diagonal=1) == 0)
    if variant == "attention-pool":
        assert img.pool_attention.shape == (3, 4, 1, 17) and not img.layout.has_readout_token
    else:
        assert img.pool_attention is None and img.layout.readout.tolist() == [0, 0, 0]
    # readout of the last block's output is the embedding
    with torch.no_grad(), adapter.explaining():
        torch.testing.assert_close(adapter.readout("image", img.block_outputs[-1], img.layout), img.embeds)
        torch.testing.assert_close(adapter.readout("text", txt.block_outputs[-1], txt.layout), txt.embeds)


@pytest.mark.parametrize("variant", ["openai-quickgelu", "attention-pool"])
def test_head_is_the_token_readout_or_refused_for_an_attention_pooled_tower(variant):
    adapter = OpenClipAdapter(tiny(variant, dtype=torch.float64))
    batch = adapter.tokenize(TEXTS)
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), adapter.explaining():
        img = adapter.run_image(pixels)
        txt = adapter.run_text(batch.input_ids, batch.attention_mask)
    last = txt.block_outputs[-1]
    pooled = last[torch.arange(last.shape[0]), txt.layout.readout]
    torch.testing.assert_close(adapter.head("text", pooled), txt.embeds, rtol=1e-10, atol=1e-10)
    if variant == "attention-pool":
        with pytest.raises(NotImplementedError, match="attentional pooler"):
            adapter.head("image", img.block_outputs[-1][:, 0])
    else:
        torch.testing.assert_close(adapter.head("image", img.block_outputs[-1][:, 0]), img.embeds)


def test_tokens_follow_open_clip_and_the_causal_batch_is_cut():
    adapter = OpenClipAdapter(tiny())
    batch = adapter.tokenize(TEXTS)
    full = oc_tokens(TEXTS)
    width = batch.input_ids.shape[1]
    assert torch.equal(batch.input_ids, full[:, :width])
    assert (full[:, width:] == 0).all()  # only padding was cut
    eot = full.argmax(-1)
    assert batch.attention_mask.sum(-1).tolist() == (eot + 1).tolist()  # "!" has id 0, still counted
    assert batch.content.sum(-1).tolist() == (eot - 1).tolist()
    assert batch.tokens[1][-2:] == ["!", "<end_of_text>"]
    long = adapter.tokenize(["word " * 40])
    assert long.truncated == [True] and long.input_ids.shape[1] == 16


def test_truncation_is_asked_of_the_tokenizer_at_the_exact_boundary():
    adapter = OpenClipAdapter(tiny())
    limit = adapter.context_length  # start + limit - 2 words + end
    fits, cut = " ".join(["cat"] * (limit - 2)), " ".join(["cat"] * (limit - 1))
    assert adapter.tokenize([fits, cut, "a cat"]).truncated == [False, True, False]
    # open_clip's HFTokenizer has no encode(): every text used to be reported as not truncated
    from conftest import ASSET_TOKENIZER

    wrapped = open_clip.tokenizer.HFTokenizer(str(ASSET_TOKENIZER), context_length=limit)
    batch = OpenClipAdapter(tiny(), tokenizer=wrapped).tokenize([fits, cut, "a cat"])
    assert batch.truncated == [False, True, False]
    assert batch.tokens[2][:3] == ["<|startoftext|>", "a", "cat"]  # decoded by the tokenizer it wraps


def test_a_tokenizer_bug_is_raised_not_shown_as_token_ids():
    class Broken:
        def __call__(self, texts, context_length=None):
            return open_clip.tokenize(texts, context_length=context_length)

        def decode(self, ids):
            raise TypeError("a bug in the tokenizer")

    adapter = OpenClipAdapter(tiny(), tokenizer=Broken())
    with pytest.raises(TypeError, match="a bug in the tokenizer"):
        adapter.tokenize(["a cat"])


# ---- Chefer against a float64 oracle ------------------------------------------------------------


def _ln(mod, x):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _block(blk, x, mask, quick):
    """One residual block by hand, per head; returns (output, A (H, n, n))."""
    n, c = x.shape
    h = blk.attn.num_heads
    d = c // h
    qkv = _ln(blk.ln_1, x) @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
    q, k, v = (t.reshape(n, h, d).transpose(0, 1) for t in qkv.chunk(3, dim=-1))
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    A = torch.softmax(scores, dim=-1)
    o = (A @ v).transpose(0, 1).reshape(n, c) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    x = x + o
    m = _ln(blk.ln_2, x) @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
    m = m * torch.sigmoid(1.702 * m) if quick else F.gelu(m)
    return x + m @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias, A


def oracle_towers(model, pixels, ids, quick=True):
    """Image embedding and text embedding of ONE image and ONE prompt, with every A."""
    v = model.visual
    p = v.conv1.weight.shape[-1]
    x = F.conv2d(pixels[None], v.conv1.weight, stride=p)[0]  # (C, gh, gw)
    x = torch.cat([v.class_embedding[None], x.flatten(1).T]) + v.positional_embedding
    x = _ln(v.ln_pre, x)
    att_i = []
    for blk in v.transformer.resblocks:
        x, A = _block(blk, x, None, quick)
        att_i.append(A)
    img = _ln(v.ln_post, x[0]) @ v.proj
    T = ids.shape[0]
    t = model.token_embedding.weight[ids] + model.positional_embedding[:T]
    causal = torch.full((T, T), float("-inf"), dtype=t.dtype).triu(1)
    att_t = []
    for blk in model.transformer.resblocks:
        t, A = _block(blk, t, causal, quick)
        att_t.append(A)
    eot = int(ids.argmax())
    txt = _ln(model.ln_final, t[eot]) @ model.text_projection
    return img, txt, att_i, att_t, eot


def abar(A, G):
    return torch.clamp(G * A, min=0).mean(0)


@pytest.mark.parametrize("start_layer", [None, 0])
def test_chefer_matches_float64_oracle(start_layer):
    model = tiny(dtype=torch.float64)
    adapter = OpenClipAdapter(model)
    images = [random_image(1), random_image(2, size=(40, 64))]
    ex = cliplens.explain(adapter, images, TEXTS, method="chefer", start_layer=start_layer)
    m = copy.deepcopy(model)
    ids = oc_tokens(TEXTS)
    with torch.no_grad():
        ref_logits = (
            m.logit_scale.exp()
            * F.normalize(
                m.encode_image(torch.stack([adapter.preprocess(i)[0] for i in images]).double()), dim=-1
            )
            @ F.normalize(m.encode_text(ids), dim=-1).T
        )
    np.testing.assert_allclose(ex.logits, ref_logits.numpy(), rtol=1e-9)
    for b, image in enumerate(images):
        pixels = adapter.preprocess(image)[0].double()
        for p in range(len(TEXTS)):
            img, txt, att_i, att_t, eot = oracle_towers(m, pixels, ids[p])
            y = m.logit_scale.exp() * F.cosine_similarity(img, txt, dim=0)
            assert y.item() == pytest.approx(ex.logits[b, p], rel=1e-9)
            grads = torch.autograd.grad(y, att_i + att_t)
            gi, gt = grads[: len(att_i)], grads[len(att_i) :]
            s_i = len(att_i) - 1 if start_layer is None else start_layer
            s_t = len(att_t) - 1 if start_layer is None else start_layer
            R = torch.eye(att_i[0].shape[-1], dtype=torch.float64)
            for layer in range(s_i, len(att_i)):
                R = R + abar(att_i[layer].detach(), gi[layer]) @ R
            np.testing.assert_allclose(
                ex.image_maps[b, p].reshape(-1), R[0, 1:].numpy(), rtol=1e-7, atol=1e-12
            )
            Rt = torch.eye(att_t[0].shape[-1], dtype=torch.float64)
            for layer in range(s_t, len(att_t)):
                Rt = Rt + abar(att_t[layer].detach(), gt[layer]) @ Rt
            n_valid = eot + 1
            np.testing.assert_allclose(
                ex.token_scores[b, p, :n_valid], Rt[eot, :n_valid].numpy(), rtol=1e-7, atol=1e-12
            )
    assert np.ptp(ex.image_maps) > 1e-3


def test_chefer_on_an_attention_pooled_tower_starts_from_the_pooling_head():
    model = tiny("attention-pool", dtype=torch.float64)
    adapter = OpenClipAdapter(model)
    ex = cliplens.explain(adapter, [random_image(3)], TEXTS[:2], method="chefer", towers=("image",))
    # by hand: r = mean_h (dy/dA_pool * A_pool)^+ folded through the last block
    pixels = torch.stack([adapter.preprocess(random_image(3))[0]]).double()
    batch = adapter.tokenize(TEXTS[:2])
    with adapter.explaining():
        with torch.enable_grad():
            img = adapter.run_image(pixels)
        with torch.no_grad():
            txt = adapter.run_text(batch.input_ids, batch.attention_mask).embeds
        for p in range(2):
            y = adapter.logit_scale() * F.cosine_similarity(img.embeds[0], txt[p], dim=0)
            g_pool, g_last = torch.autograd.grad(
                y, [img.pool_attention, img.attentions[-1]], retain_graph=True
            )
            r = abar(img.pool_attention[0].detach(), g_pool[0])[0]
            r = r + r @ abar(img.attentions[-1][0].detach(), g_last[0])
            np.testing.assert_allclose(ex.image_maps[0, p].reshape(-1), r[1:].numpy(), rtol=1e-8, atol=1e-12)


# ---- any input size ------------------------------------------------------------------------------


def _resized_model(model, h, w):
    """The same weights in a model built for an h x w input, positions resampled by hand."""
    from conftest import tiny_open_clip_cfg

    embed_dim, vcfg, tcfg = tiny_open_clip_cfg(image_size=(h, w))
    big = open_clip.CLIP(embed_dim, vcfg, tcfg, quick_gelu=True).to(model.logit_scale.dtype).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "visual.positional_embedding"}
    pos = model.visual.positional_embedding
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    grid = pos[1:].T.reshape(1, -1, g, g)
    grid = F.interpolate(grid, size=(h // 8, w // 8), mode="bicubic", align_corners=False)[0]
    state["visual.positional_embedding"] = torch.cat([pos[:1], grid.flatten(1).T])
    big.load_state_dict(state)
    return big


@pytest.mark.parametrize("size", [(448, 448), (336, 448)])
def test_any_input_size_uses_interpolated_positions(size):
    h, w = size
    model = tiny(dtype=torch.float64)
    adapter = OpenClipAdapter(model)
    pixels = torch.randn(1, 3, h, w, dtype=torch.float64)
    with torch.no_grad(), adapter.explaining():
        run = adapter.run_image(pixels)
    with torch.no_grad():
        ref = _resized_model(model, h, w).encode_image(pixels)
    torch.testing.assert_close(run.embeds, ref, rtol=1e-9, atol=1e-10)
    assert run.layout.grid == (h // 8, w // 8)
    assert model.visual.positional_embedding.shape == (17, 32)  # the model itself is untouched


def test_full_resize_explains_the_whole_image():
    adapter = OpenClipAdapter(tiny())
    image = random_image(4, size=(448, 336))
    ex = cliplens.explain(adapter, [image], ["a cat"], method="chefer", resize="full")
    assert ex.image_maps.shape[-2:] == (4, 5)
    back = ex.geometries[0].grid_to_original(ex.image_maps[0, 0])
    assert back.shape == (336, 448) and np.isfinite(back).all()


# ---- the model is left as it was ------------------------------------------------------------------


def _state(model):
    return {
        "grad": [p.requires_grad for p in model.parameters()],
        "train": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "patched": [name for name, m in model.named_modules() if "forward" in m.__dict__],
    }


@pytest.mark.parametrize("variant", ["openai-quickgelu", "custom-blocks", "attention-pool"])
def test_model_unchanged_after_explain_and_after_a_failure(variant):
    mha_forward = torch.nn.MultiheadAttention.forward
    model = tiny(variant)
    model.train()
    model.visual.ln_pre.weight.requires_grad_(False)
    adapter = OpenClipAdapter(model)
    before = _state(model)
    pixels = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(pixels), model.encode_text(oc_tokens(["a cat"]))
    model.train()
    cliplens.explain(adapter, [random_image(1)], ["a cat", "a dog"], method="chefer")
    assert _state(model) == before

    class Boom(Exception):
        pass

    def bad_hook(module, args):
        raise Boom("forward failed")

    # entering the last text block (a tower may stop inside it: the readout row)
    handle = model.transformer.resblocks[-1].register_forward_pre_hook(bad_hook)
    try:
        with pytest.raises(Boom):
            cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer")
    finally:
        handle.remove()
    assert _state(model) == before
    assert torch.nn.MultiheadAttention.forward is mha_forward  # never a class patch
    model.eval()
    with torch.no_grad():
        after = model.encode_image(pixels), model.encode_text(oc_tokens(["a cat"]))
    assert all(torch.equal(a, b) for a, b in zip(ref, after))


# ---- every method, dispatch, loading, refusals ----------------------------------------------------


@pytest.mark.parametrize("variant", ["openai-quickgelu", "attention-pool"])
def test_every_registered_method_supports_open_clip_or_refuses_clearly(variant):
    adapter = OpenClipAdapter(tiny(variant))
    for name in REGISTRY:
        try:
            ex = cliplens.explain(adapter, [random_image(4)], ["a red cat", "dog"], method=name)
        except InputError as exc:
            assert variant == "attention-pool", f"{name} refused a class-token open_clip model: {exc}"
            assert str(exc) and "\n" not in str(exc)
            continue
        if ex.image_maps is not None:
            assert np.asarray(ex.image_maps).shape == (1, 2, 4, 4)
            assert np.isfinite(np.asarray(ex.image_maps)).all(), name


def test_model_objects_dispatch_to_the_adapter():
    model = tiny()
    adapter = cliplens.load_model(model)
    assert isinstance(adapter, OpenClipAdapter) and adapter.family == "open_clip"
    ex = cliplens.explain(model, [random_image(2)], ["a cat"])
    assert ex.meta["family"] == "open_clip" and ex.image_maps.shape == (1, 1, 4, 4)


def test_sigmoid_models_use_the_bias():
    model = tiny()
    with torch.no_grad():
        model.logit_bias = torch.nn.Parameter(torch.tensor([-3.0]))
    adapter = OpenClipAdapter(model)
    assert adapter.pair_probability == "sigmoid"
    ex = cliplens.explain(adapter, [random_image(2)], TEXTS, target="probability")
    pixels = torch.stack([adapter.preprocess(random_image(2))[0]])
    with torch.no_grad():
        logits, _ = model.get_logits(pixels, oc_tokens(TEXTS))
    np.testing.assert_allclose(ex.logits, logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ex.probs, torch.sigmoid(logits).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("open_clip:ViT-B-16/openai", "not in the local cache"),
        ("open_clip:hf-hub:someone/nothing-here", "not in the local cache"),
        ("open_clip:ViT-B-16", "name the weights"),
        ("open_clip:No-Such-Model/openai", "unknown open_clip model"),
        ("open_clip:ViT-B-16/no-such-tag", "neither a pretrained tag nor a checkpoint file"),
    ],
)
def test_load_by_name_fails_offline_in_one_line(spec, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=message) as info:
        cliplens.load_model(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "EOFError"), (b"not a checkpoint", "could not load"), (None, "loading state_dict")],
    ids=["empty", "garbage", "other-model"],
)
def test_a_bad_checkpoint_file_fails_in_one_line(content, message, tmp_path):
    path = tmp_path / "weights.pt"
    if content is None:
        torch.save({"not.this.model": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        cliplens.load_model(f"open_clip:RN50/{path}")
    assert "\n" not in str(info.value)


def test_unsupported_towers_are_refused_by_name():
    from conftest import tiny_open_clip_cfg

    embed_dim, vcfg, tcfg = tiny_open_clip_cfg()
    resnet = open_clip.CLIP(embed_dim, dict(layers=(1, 1, 1, 1), width=16, image_size=64), tcfg)
    with pytest.raises(ModelLoadError, match="not a ViT"):
        OpenClipAdapter(resnet)
    mean_pooled = open_clip.CLIP(embed_dim, {**vcfg, "pool_type": "avg"}, tcfg)
    with pytest.raises(ModelLoadError, match="pool_type='avg'"):
        OpenClipAdapter(mean_pooled)
    pytest.importorskip("timm")
    timm_tower = open_clip.CLIP(
        embed_dim,
        dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, image_size=32),
        tcfg,
    )
    with pytest.raises(ModelLoadError, match="timm image tower"):
        OpenClipAdapter(timm_tower)
