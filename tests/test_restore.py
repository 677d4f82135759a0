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
    with pytest.raises(Boom):  # every block: their gradients are folded block by block mid-backward
        cliplens.explain(adapter, [random_image(1)], ["a cat"], method="chefer", start_layer=0)
    assert _state(model) == before


def test_restored_when_forward_raises(model_and_adapter):
    model, adapter = model_and_adapter
    before = _state(model)
    layer = model.text_model.encoder.layers[1]  # the last: entering it (a tower may stop inside)

    def bad_hook(module, args):
        raise Boom("forward failed")

    handle = layer.register_forward_pre_hook(bad_hook)
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


# ---- the capture protocol itself (adapters/capture.py) ------------------------------------------


def test_capture_undoes_every_change_also_when_the_block_raises():
    from cliplens.adapters.capture import Capture

    model = make_tiny_clip()
    model.train()
    model.text_model.final_layer_norm.weight.requires_grad_(False)
    before = _state(model)
    layer = model.vision_model.encoder.layers[0]
    seen = []
    with pytest.raises(Boom):
        with Capture() as capture:
            capture.freeze(model)
            capture.eager_attention(model)
            capture.forward_hook(layer, lambda m, a, o: seen.append("post"))
            capture.forward_pre_hook(layer, lambda m, a: seen.append("pre"))
            capture.patch_forward(layer.mlp, lambda x: x)
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            assert "forward" in layer.mlp.__dict__
            raise Boom("inside the block")
    assert _state(model) == before
    assert "forward" not in layer.mlp.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_capture_runs_every_undo_last_first_and_raises_the_first_failure():
    from cliplens.adapters.capture import Capture

    order = []

    def failing():
        order.append("failing")
        raise Boom("undo failed")

    with pytest.raises(Boom, match="undo failed"):
        with Capture() as capture:
            capture.on_exit(lambda: order.append("first"))
            capture.on_exit(failing)
            capture.on_exit(lambda: order.append("last"))
    assert order == ["last", "failing", "first"]


def test_capture_patch_keeps_an_instance_forward_and_never_touches_the_class():
    from cliplens.adapters.capture import Capture

    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    other = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    class_forward = torch.nn.MultiheadAttention.forward
    own = mha.forward  # a bound method: stands for a forward the user set on this instance
    mha.forward = own
    x = torch.randn(2, 5, 8)
    probs = []
    with Capture() as capture:
        capture.mha_probabilities([mha], lambda i, p: probs.append(p))
        out = mha(x, x, x, need_weights=False)[0]
        assert "forward" not in other.__dict__
    assert mha.__dict__["forward"] is own
    assert torch.nn.MultiheadAttention.forward is class_forward
    assert probs[0].shape == (2, 2, 5, 5)
    torch.testing.assert_close(out, mha(x, x, x, need_weights=False)[0])
