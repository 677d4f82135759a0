"""BLIP's image-text contrastive mode as a dual encoder (``hf-blip-itc``): the adapter's scores
are transformers' own ITC score, what it captures is what the model computes, the image tower's
linear pieces are exact, and the mode is loaded by its spec prefix only. (Every method against
its float64 oracle and the whole contract run on it through tests/families.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import adapt, load_model
from cliplens.adapters.base import FanOut
from cliplens.adapters.hf_blip import HFBlipITMAdapter
from cliplens.adapters.hf_blip_itc import HFBlipITCAdapter
from families import hf_blip_itc_factory, make_tiny_blip_itc, random_image, word_tokenizer

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]
IMAGES = [random_image(1), random_image(2, size=(40, 64))]


@pytest.fixture(scope="module")
def itc64():
    return hf_blip_itc_factory(seed=0, dtype=torch.float64)


def _inputs(adapter):
    batch = adapter.tokenize(TEXTS)
    (group,) = adapter.prepare_images(IMAGES)
    return group.pixel_values, batch


def test_pair_logits_are_the_models_own_itc_score(itc64):
    model = itc64.model
    assert not hasattr(model, "logit_scale")  # BlipForImageTextRetrieval has no temperature
    assert float(itc64.logit_scale()) == 1.0
    pixels, batch = _inputs(itc64)
    ex = cliplens.explain(itc64, IMAGES, TEXTS, method="raw_attention")
    with torch.no_grad():
        for b in range(len(IMAGES)):
            itm = model(
                input_ids=batch.input_ids,
                pixel_values=pixels[b : b + 1].expand(len(TEXTS), -1, -1, -1),
                attention_mask=batch.attention_mask,
                use_itm_head=False,
            ).itm_score  # (P, P): every row is image b
            want = itm[0].numpy() * float(itc64.logit_scale())
            np.testing.assert_allclose(ex.logits[b], want, rtol=0, atol=1e-6)
            np.testing.assert_allclose(ex.probs[b], np.exp(want) / np.exp(want).sum(), rtol=0, atol=1e-6)
    assert np.ptp(ex.logits, axis=1).min() > 1e-3  # the tiny model's prompts do score differently


def test_captures_are_what_the_model_computes(itc64):
    """Attentions and block outputs against transformers' own recorded outputs (not our hooks);
    the head maps the last block's readout token onto the embedding."""
    model = itc64.model
    pixels, batch = _inputs(itc64)
    with itc64.explaining(), torch.no_grad():
        img = itc64.run_image(pixels)
        txt = itc64.run_text(batch.input_ids, batch.attention_mask)
        vis = model.vision_model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        tex = model.text_encoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_attentions=True,
            output_hidden_states=True,
        )
        for run, ref in ((img, vis), (txt, tex)):
            assert len(run.attentions) == len(ref.attentions) == len(run.block_outputs)
            for mine, theirs in zip(run.attentions, ref.attentions):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
            for i, out in enumerate(run.block_outputs):
                torch.testing.assert_close(out, ref.hidden_states[i + 1], rtol=0, atol=1e-12)
            torch.testing.assert_close(run.input_embeds, ref.hidden_states[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(img.embeds, itc64.head("image", img.block_outputs[-1][:, 0]), rtol=0, atol=1e-12)
        torch.testing.assert_close(txt.embeds, itc64.head("text", txt.block_outputs[-1][:, 0]), rtol=0, atol=1e-12)
    # the text tower is bidirectional over the real tokens, and [CLS] is its readout
    probs = txt.attentions[0]
    valid = batch.attention_mask.bool()
    assert (probs.masked_select(~valid[:, None, None, :].expand_as(probs)) == 0).all()
    assert probs[0, :, 1, 2:4].min() > 0  # a token attends to later tokens
    assert (txt.layout.readout == 0).all()
    assert torch.equal(txt.layout.content, batch.content)


def test_fan_out_rows_are_the_repeated_runs(itc64):
    pixels, batch = _inputs(itc64)
    with itc64.explaining(), torch.no_grad():
        full = itc64.run_text(batch.input_ids, batch.attention_mask).embeds
        fanned = itc64.run_text(batch.input_ids, batch.attention_mask, fan_out=FanOut(1, 2, tile=True))
        img = itc64.run_image(pixels).embeds
        fanned_img = itc64.run_image(pixels, fan_out=FanOut(1, 3))
    torch.testing.assert_close(fanned.embeds, full.repeat(2, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(fanned_img.embeds, img.repeat_interleave(3, 0), rtol=0, atol=1e-12)
    assert fanned.graph_input.requires_grad and fanned.embeds.shape[0] == 2 * len(TEXTS)


def test_image_tower_linear_pieces_are_exact(itc64):
    pixels, _ = _inputs(itc64)
    with itc64.explaining(), torch.no_grad():
        run = itc64.run_image(pixels)
        for i, x in enumerate(run.block_inputs):
            q, k = itc64.attention_qk("image", i, x)
            d = q.shape[-1]
            torch.testing.assert_close((q @ k.transpose(-1, -2) / d**0.5).softmax(-1), run.attentions[i])
            heads = itc64.attention_value_heads("image", i, x)
            z = x + torch.einsum("bhij,bhjc->bic", run.attentions[i], heads) + itc64.attention_out_bias("image", i)
            torch.testing.assert_close(z + itc64.mlp_output("image", i, z), run.block_outputs[i], rtol=0, atol=1e-10)
        parts = itc64.readout_parts("image")
        zc = run.block_outputs[-1][:, 0]
        normed = torch.nn.functional.layer_norm(zc, zc.shape[-1:], parts.norm_weight, parts.norm_bias, parts.eps)
        torch.testing.assert_close(normed @ parts.proj_weight.T + parts.proj_bias, run.embeds, rtol=0, atol=1e-12)
    # so the exact decomposition runs on the image tower alone (the text tower is post-norm)
    ex = cliplens.explain(itc64, IMAGES, TEXTS, method="decomposition", towers=("image",))
    for key in ("delta_embedding", "delta_similarity"):
        assert np.nanmax(np.asarray(ex.extras[key])) < 1e-10, key
    with pytest.raises(cliplens.InputError, match="text tower"):
        cliplens.explain(itc64, IMAGES, TEXTS, method="decomposition")


def test_grad_eclip_runs_on_the_image_tower_alone(itc64):
    """(tests/oracles.py's grad_eclip oracle always rebuilds the text tower too, which has no
    linear split here: the image-only run is checked for shape and sense, not against it.)"""
    ex = cliplens.explain(itc64, IMAGES, TEXTS, method="grad_eclip", towers=["image"])
    maps = np.asarray(ex.image_maps[0])
    assert maps.shape == (len(TEXTS), 4, 4) and np.isfinite(maps).all() and (maps >= 0).all()
    assert np.ptp(maps) > 0 and not np.allclose(maps[0], maps[2])
    assert ex.token_scores is None


def test_loaded_by_its_prefix_only(tmp_path):
    model = make_tiny_blip_itc()
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    itc = load_model(f"blip-itc:{tmp_path}")
    assert isinstance(itc, HFBlipITCAdapter) and itc.family == "hf-blip-itc"
    assert itc.name == f"blip-itc:{tmp_path}"
    # a checkpoint directory or a model object without the prefix stays the ITM (fusion) adapter
    assert isinstance(load_model(str(tmp_path)), HFBlipITMAdapter)
    assert isinstance(adapt(model, word_tokenizer()), HFBlipITMAdapter)
    ex = cliplens.explain(itc, IMAGES[:1], TEXTS[:2], method="chefer")
    assert ex.logits.shape == (1, 2)


def test_other_blip_heads_are_refused_in_one_line(tmp_path):
    make_tiny_blip_itc().save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BlipForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(cliplens.ModelLoadError) as err:
        load_model(f"blip-itc:{tmp_path}")
    assert "\n" not in str(err.value) and "BlipForConditionalGeneration" in str(err.value)
