"""The same weights in two libraries give the same explanation.

A tiny OpenAI-layout CLIP is built in open_clip, converted to a transformers ``CLIPModel`` by a
weight mapping written here (in_proj split into q/k/v, norm names, class and position
embeddings, projections transposed, QuickGELU -> ``hidden_act="quick_gelu"``), and explained
through both adapters. Logits and every registered method's maps must agree (methods added
later are covered: the test iterates the registry). Needs the open_clip extra.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from cliplens.methods import REGISTRY
from conftest import clip_tokenizer, make_tiny_open_clip, random_image, tiny_open_clip_cfg

pytestmark = pytest.mark.open_clip
open_clip = pytest.importorskip("open_clip")

from cliplens.adapters.open_clip import OpenClipAdapter  # noqa: E402 (after the importorskip)

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


def hf_config_for(embed_dim: int, vision_cfg: dict, text_cfg: dict, quick_gelu: bool):
    from transformers import CLIPConfig

    act = "quick_gelu" if quick_gelu else "gelu"
    v_width, t_width = vision_cfg["width"], text_cfg["width"]
    return CLIPConfig(
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=int(v_width * vision_cfg["mlp_ratio"]),
            num_hidden_layers=vision_cfg["layers"],
            num_attention_heads=v_width // vision_cfg["head_width"],
            image_size=vision_cfg["image_size"],
            patch_size=vision_cfg["patch_size"],
            hidden_act=act,
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            hidden_size=t_width,
            intermediate_size=int(t_width * text_cfg["mlp_ratio"]),
            num_hidden_layers=text_cfg["layers"],
            num_attention_heads=text_cfg["heads"],
            max_position_embeddings=text_cfg["context_length"],
            vocab_size=text_cfg["vocab_size"],
            hidden_act=act,
            layer_norm_eps=1e-5,
            eos_token_id=2,  # the legacy setting: the end-of-text token is the arg-max id, as in open_clip
        ),
        projection_dim=embed_dim,
    )


def open_clip_to_hf(state: dict) -> dict:
    """open_clip CLIP state dict (OpenAI layout) -> transformers CLIPModel state dict."""
    out = {}

    def block(src: str, dst: str):
        for name in ("ln_1", "ln_2"):
            hf = "layer_norm1" if name == "ln_1" else "layer_norm2"
            out[f"{dst}.{hf}.weight"] = state[f"{src}.{name}.weight"]
            out[f"{dst}.{hf}.bias"] = state[f"{src}.{name}.bias"]
        for part, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            state[f"{src}.attn.in_proj_weight"].chunk(3),
            state[f"{src}.attn.in_proj_bias"].chunk(3),
        ):
            out[f"{dst}.self_attn.{part}.weight"] = w
            out[f"{dst}.self_attn.{part}.bias"] = b
        for oc, hf in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[f"{dst}.{hf}.weight"] = state[f"{src}.{oc}.weight"]
            out[f"{dst}.{hf}.bias"] = state[f"{src}.{oc}.bias"]

    v = "vision_model"
    out[f"{v}.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out[f"{v}.embeddings.class_embedding"] = state["visual.class_embedding"]
    out[f"{v}.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for oc, hf in (("visual.ln_pre", f"{v}.pre_layrnorm"), ("visual.ln_post", f"{v}.post_layernorm")):
        out[f"{hf}.weight"], out[f"{hf}.bias"] = state[f"{oc}.weight"], state[f"{oc}.bias"]
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in state:
        block(f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}")
        i += 1
    out["visual_projection.weight"] = state["visual.proj"].T
    t = "text_model"
    out[f"{t}.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out[f"{t}.embeddings.position_embedding.weight"] = state["positional_embedding"]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in state:
        block(f"transformer.resblocks.{i}", f"{t}.encoder.layers.{i}")
        i += 1
    out[f"{t}.final_layer_norm.weight"] = state["ln_final.weight"]
    out[f"{t}.final_layer_norm.bias"] = state["ln_final.bias"]
    out["text_projection.weight"] = state["text_projection"].T
    out["logit_scale"] = state["logit_scale"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def pair(dtype=torch.float64, quick_gelu=True, **kw):
    """The same tiny CLIP as an open_clip adapter and as a transformers adapter."""
    from transformers import CLIPModel

    oc = make_tiny_open_clip(dtype=dtype, quick_gelu=quick_gelu, **kw).eval()
    embed_dim, vision_cfg, text_cfg = tiny_open_clip_cfg(**kw)
    hf = CLIPModel(hf_config_for(embed_dim, vision_cfg, text_cfg, quick_gelu)).to(dtype).eval()
    missing, unexpected = hf.load_state_dict(open_clip_to_hf(oc.state_dict()), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return OpenClipAdapter(oc, name="oc"), HFClipAdapter(hf, clip_tokenizer(), name="hf")


# Both models run in float64, but transformers' eager attention takes its softmax in float32 (then
# casts back): that alone moves numbers by about 1e-7 relative, hence 1e-5 and not 1e-10.


def close(a, b, what, rtol=1e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert np.array_equal(np.isnan(a), np.isnan(b)), what
    finite = ~np.isnan(a)
    scale = max(float(np.abs(b[finite]).max()) if finite.any() else 0.0, 1e-30)
    np.testing.assert_allclose(a[finite], b[finite], rtol=rtol, atol=rtol * scale, err_msg=what)


def test_conversion_reproduces_the_model():
    oc, hf = pair()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    batch_oc, batch_hf = oc.tokenize(TEXTS), hf.tokenize(TEXTS)
    assert torch.equal(
        batch_oc.input_ids[batch_oc.attention_mask.bool()], batch_hf.input_ids[batch_hf.attention_mask.bool()]
    )
    with torch.no_grad(), oc.explaining(), hf.explaining():
        for a, b in (
            (oc.run_image(pixels).embeds, hf.run_image(pixels).embeds),
            (
                oc.run_text(batch_oc.input_ids, batch_oc.attention_mask).embeds,
                hf.run_text(batch_hf.input_ids, batch_hf.attention_mask).embeds,
            ),
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quick_gelu", [True, False])
@pytest.mark.parametrize("resize", ["model", "full"])
@pytest.mark.parametrize("method", list(REGISTRY))
def test_same_weights_same_explanation(method, resize, quick_gelu):
    oc, hf = pair(quick_gelu=quick_gelu)
    images = [random_image(1, size=(48, 40)), random_image(2, size=(64, 48))]
    ex_oc = cliplens.explain(oc, images, TEXTS, method=method, resize=resize)
    ex_hf = cliplens.explain(hf, images, TEXTS, method=method, resize=resize)
    close(ex_oc.logits, ex_hf.logits, "logits")
    close(ex_oc.probs, ex_hf.probs, "probs")
    close(ex_oc.target_values, ex_hf.target_values, "target values")
    assert (ex_oc.image_maps is None) == (ex_hf.image_maps is None)
    if ex_hf.image_maps is not None:
        maps_oc = ex_oc.image_maps if isinstance(ex_oc.image_maps, list) else list(ex_oc.image_maps)
        maps_hf = ex_hf.image_maps if isinstance(ex_hf.image_maps, list) else list(ex_hf.image_maps)
        for b, (m_oc, m_hf) in enumerate(zip(maps_oc, maps_hf)):
            close(m_oc, m_hf, f"{method} image map {b}")
            if resize == "full":
                assert m_hf.shape[-2:] == (4, 5)  # the aspect ratio kept: interpolated positions
    assert (ex_oc.token_scores is None) == (ex_hf.token_scores is None)
    if ex_hf.token_scores is not None:
        close(ex_oc.token_scores, ex_hf.token_scores, f"{method} token scores")
    assert set(ex_oc.extras) == set(ex_hf.extras), method
    for key in ex_hf.extras:
        if key.split("_", 1)[-1].startswith("delta") or key.startswith("delta"):
            # completeness residuals are rounding noise in both: equal only in being tiny
            assert np.nanmax(np.abs(ex_oc.extras[key])) < 1e-5 and np.nanmax(np.abs(ex_hf.extras[key])) < 1e-5
            continue
        close(ex_oc.extras[key], ex_hf.extras[key], f"{method} extras[{key}]")


@pytest.mark.parametrize("size", [(448, 448), (336, 448)])
def test_same_embeddings_at_other_input_sizes(size):
    """open_clip positions are resampled for the call exactly as transformers' CLIP does it."""
    oc, hf = pair(image_size=64, patch_size=16)
    pixels = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad(), oc.explaining(), hf.explaining():
        a, b = oc.run_image(pixels), hf.run_image(pixels)
    torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-6)
    assert a.layout.grid == b.layout.grid == (size[0] // 16, size[1] // 16)
    for att_a, att_b in zip(a.attentions, b.attentions):  # 784 tokens: float32-softmax noise grows
        torch.testing.assert_close(att_a, att_b, rtol=1e-4, atol=5e-5)
