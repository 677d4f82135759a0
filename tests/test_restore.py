"""explain() leaves the model exactly as it found it, also when a call fails half-way."""

from __future__ import annotations

import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from cliplens.methods import relevance as relevance_mod
from conftest import clip_tokenizer, make_tiny_clip, random_image


def _hooks(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n


def _state(model):
    return {
        "attn": [c._attn_implementation for c in (model.config, model.config.text_config, model.config.vision_config)],
        "grad": [p.requires_grad for p in model.parameters()],
        "train": [m.training for m in model.modules()],
        "hooks": _hooks(model),
        "param_grads": [p.grad is None for p in model.parameters()],
    }


def _outputs(model, adapter):
    batch = adapter.tokenize(["a cat", "two dogs"])
    pixels = torch.stack([adapter.preprocess(random_image(9))[0]])
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)
    return out.logits_per_image.clone(), out.image_embeds.clone(), out.text_embeds.clone()


@pytest.fixture
def model_and_adapter():
    model = make_tiny_clip()
    model.train()  # a user's model left in train mode
    model.vision_model.encoder.layers[0].mlp.fc1.weight.requires_grad_(False)  # mixed flags
    return model, HFClipAdapter(model, clip_tokenizer())


def test_model_unchanged_after_explain(model_and_adapter):
    model, adapter = model_and_adapter
    before_state = _state(model)
    model.eval()
    before_out = _outputs(model, adapter)
    model.train()
    cliplens.explain(adapter, [random_image(1)], ["a cat", "a dog"], method="chefer")
    assert _state(model) == before_state
    model.eval()
    after_out = _outputs(model, adapter)
    for a, b in zip(before_out, after_out):
        assert torch.equal(a, b)  # bit-identical


def test_train_mode_model_explained_in_eval_mode(model_and_adapter):
    model, adapter = model_and_adapter
    ex_train = cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer")
    model.eval()
    ex_eval = cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer")
    assert (ex_train.image_maps == ex_eval.image_maps).all()


class Boom(Exception):
    pass


def test_restored_when_target_raises(model_and_adapter):
    model, adapter = model_and_adapter
    before = _state(model)

    class BadTarget(cliplens.Target):
        name = "bad"

        def __call__(self, ctx):
            raise Boom("target failed")

    with pytest.raises(Boom):
        cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer", target=BadTarget())
    assert _state(model) == before


def test_restored_when_backward_hook_raises(model_and_adapter, monkeypatch):
    model, adapter = model_and_adapter
    before = _state(model)

    def exploding(attn, grad):
        raise Boom("mid-backward")

    monkeypatch.setattr(relevance_mod, "gradient_weighted", exploding)
    with pytest.raises(Boom):
        cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer")
    assert _state(model) == before


def test_restored_when_forward_raises(model_and_adapter):
    model, adapter = model_and_adapter
    before = _state(model)
    layer = model.text_model.encoder.layers[1]

    def bad_hook(module, args, output):
        raise Boom("forward failed")

    handle = layer.register_forward_hook(bad_hook)
    try:
        with pytest.raises(Boom):
            cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer")
    finally:
        handle.remove()
    assert _state(model) == before


def test_eager_model_stays_eager():
    from transformers import CLIPModel

    from conftest import tiny_clip_config

    model = CLIPModel(tiny_clip_config())
    model.set_attn_implementation("eager")
    adapter = HFClipAdapter(model, clip_tokenizer())
    cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer")
    assert model.config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
