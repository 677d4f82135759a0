"""ViLT image-text retrieval (hf-vilt-itm): one joint self-attention stack, shuffled patches.

The oracles below are written from the equations on the transformers model itself (forward
hooks and ``retain_grad`` on one pair at a time, float64), never through cliplens' engine; the
patch order of an oracle run is made the identity by replacing ``torch.multinomial``, so its
patch tokens are in row-major grid order and its maps need no un-permuting."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters.base import Checkpoint
from cliplens.adapters.hf_vilt import HFViltITMAdapter, vilt_preprocess_from_config
from cliplens.errors import InputError, ModelLoadError
from families import hf_vilt_factory, make_tiny_vilt, random_image, word_tokenizer
from helpers import assert_batch_equals_one_by_one, rel

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "the big dog and a small cat"]  # different lengths: padding in a batch


def images():
    return [random_image(0), random_image(1)]


def identity_multinomial(input, num_samples, replacement=False, **kwargs):
    """torch.multinomial as ViLT calls it to order the patches (all kept, no replacement), with
    the identity order instead of a random one."""
    assert not replacement and int(num_samples) == input.shape[-1]
    return torch.arange(int(num_samples))


# ---- the oracle: the model itself, one pair at a time ----------------------------------------------


def attention_and_gradients(model, pixels, ids):
    """(logit, [A_l], [dlogit/dA_l]) of one pair, A_l (H, n, n), through the model's own forward
    with forward hooks that keep each layer's probabilities and ``retain_grad`` on them."""
    model = copy.deepcopy(model).requires_grad_(True).eval()
    kept = []

    def keep(module, args, output):
        output[1].retain_grad()
        kept.append(output[1])

    for layer in model.vilt.encoder.layer:
        layer.attention.attention.register_forward_hook(keep)
    mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long)
    logit = model(input_ids=ids, pixel_values=pixels, pixel_mask=mask, output_attentions=True).logits[0, 0]
    logit.backward()
    return logit.detach(), [a.detach()[0] for a in kept], [a.grad[0] for a in kept]


def oracle_rows(method, model, pixels, ids, monkeypatch):
    """The readout token's row (n,) of ``method`` for one pair, patches in grid order."""
    with monkeypatch.context() as m:
        m.setattr(torch, "multinomial", identity_multinomial)
        _, attn, grads = attention_and_gradients(model, pixels, ids)
    n = attn[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    if method == "chefer":  # R = I; R += Abar R, Abar = mean_h (dy/dA * A)^+, layer by layer
        R = eye.clone()
        for A, G in zip(attn, grads):
            R = R + (G * A).clamp(min=0).mean(dim=0) @ R
        return R[0]
    if method == "rollout":  # rownormalise(mean_h A + I), later layers on the left
        M = eye.clone()
        for A in attn:
            Ahat = A.mean(dim=0) + eye
            M = (Ahat / Ahat.sum(dim=-1, keepdim=True)) @ M
        return M[0]
    assert method == "raw_attention"  # the last layer's head-mean attention
    return attn[-1].mean(dim=0)[0]


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
@pytest.mark.parametrize("resize", ["model", "full"])  # full: a 4 x 5 grid (row-major cells)
def test_oracle(method, resize, monkeypatch):
    adapter = hf_vilt_factory(dtype=torch.float64)
    imgs = images()
    e = cliplens.explain(adapter, imgs, PROMPTS, method=method, resize=resize)
    (batch,) = adapter.prepare_images(imgs, resize=resize)
    gh, gw = (s // 8 for s in batch.pixel_values.shape[-2:])
    assert e.image_maps.shape == (2, 2, gh, gw)
    if resize == "full":
        assert (gh, gw) == (4, 5)
    for b in range(2):
        for p, prompt in enumerate(PROMPTS):
            ids = adapter.tokenize([prompt]).input_ids  # alone: no padding in the oracle's run
            T = ids.shape[1]
            row = oracle_rows(method, adapter.model, batch.pixel_values[b : b + 1], ids, monkeypatch)
            assert rel(e.image_maps[b, p], row[T + 1 :].reshape(gh, gw).numpy()) < 1e-6
            assert rel(e.token_scores[b, p, :T], row[:T].numpy()) < 1e-6
            assert np.isnan(e.token_scores[b, p, T:]).all()  # the batch's padding


def test_oracle_logits(monkeypatch):
    adapter = hf_vilt_factory(dtype=torch.float64)
    e = cliplens.explain(adapter, images(), PROMPTS, method="raw_attention")
    (batch,) = adapter.prepare_images(images())
    for b in range(2):
        for p, prompt in enumerate(PROMPTS):
            logit, _, _ = attention_and_gradients(
                adapter.model, batch.pixel_values[b : b + 1], adapter.tokenize([prompt]).input_ids
            )
            assert e.logits[b, p] == pytest.approx(float(logit), rel=1e-10)
            assert e.probs[b, p] == pytest.approx(float(torch.sigmoid(logit)), rel=1e-10)


# ---- the shuffled patch order ----------------------------------------------------------------------


def drawn_cells(adapter, seed):
    (batch,) = adapter.prepare_images(images())
    texts = adapter.tokenize(PROMPTS)
    torch.manual_seed(seed)
    with adapter.explaining(), torch.no_grad():
        run = adapter.run_pairs(batch.pixel_values, texts.input_ids, texts.attention_mask)
    return run


def test_stream_layout():
    adapter = hf_vilt_factory()
    run = drawn_cells(adapter, 0)
    texts = adapter.tokenize(PROMPTS)
    T = texts.input_ids.shape[1]
    (stream,) = run.streams.values()
    assert stream.name == "joint" and run.grid == (4, 4)
    assert stream.size == T + 1 + 16
    assert (stream.cells[:, : T + 1] == -1).all()
    for row in stream.cells[:, T + 1 :]:
        assert sorted(row.tolist()) == list(range(16))  # every cell shown once
    assert (stream.positions[:, :T] == torch.arange(T)).all() and (stream.positions[:, T:] == -1).all()
    assert torch.equal(stream.valid[:, :T], texts.attention_mask.bool()) and stream.valid[:, T:].all()
    assert run.readout[0] == "joint" and (run.readout[1][:, 0] == 1).all() and (run.readout[1].sum(1) == 1).all()
    assert [(e.kind, e.query, e.key, e.stack, e.layer, e.step) for e in run.events] == [
        ("self", "joint", "joint", "joint", i, i) for i in range(2)
    ]


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
def test_maps_do_not_depend_on_the_patch_order(method, monkeypatch):
    adapter = hf_vilt_factory()
    first, second = drawn_cells(adapter, 1), drawn_cells(adapter, 2)
    assert not torch.equal(first.streams["joint"].cells, second.streams["joint"].cells)  # orders differ
    maps = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        maps.append(cliplens.explain(adapter, images(), PROMPTS, method=method))
    with monkeypatch.context() as m:
        m.setattr(torch, "multinomial", identity_multinomial)
        identity = cliplens.explain(adapter, images(), PROMPTS, method=method)
    for e in maps:
        assert rel(e.image_maps, identity.image_maps) < 1e-6
        assert rel(e.token_scores, identity.token_scores) < 1e-6
        assert rel(e.logits, identity.logits) < 1e-6


def test_the_callers_random_stream_is_left_alone():
    adapter = hf_vilt_factory()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    cliplens.explain(adapter, images(), PROMPTS, method="chefer")
    assert torch.equal(torch.rand(3), expected)


def test_every_patch_kept_whatever_max_image_length():
    adapter = hf_vilt_factory()
    reference = cliplens.explain(adapter, images(), PROMPTS, method="chefer")
    adapter.model.config.max_image_length = 5  # ViLT would keep 5 random patches of 16
    e = cliplens.explain(adapter, images(), PROMPTS, method="chefer")
    assert adapter.model.config.max_image_length == 5
    assert not np.isnan(e.image_maps).any()
    assert rel(e.image_maps, reference.image_maps) < 1e-6


# ---- capture completeness ------------------------------------------------------------------------


def hook_count(model) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, name)) for m in model.modules() for name in names)


def test_capture_leaves_the_model_as_it_was():
    adapter = hf_vilt_factory()
    model = adapter.model
    model.config.max_image_length = 7
    model.train()
    model.vilt.pooler.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    attn = model.config._attn_implementation
    (batch,) = adapter.prepare_images(images())
    texts = adapter.tokenize(PROMPTS)

    def own_output():
        torch.manual_seed(0)  # the same patch draw (7 of 16 patches, shuffled) for both calls
        with torch.no_grad():
            return model(
                input_ids=texts.input_ids,
                attention_mask=texts.attention_mask,
                pixel_values=batch.pixel_values,
            ).logits

    before = own_output()
    assert hook_count(model) == 0
    with adapter.explaining():
        run = adapter.run_pairs(batch.pixel_values, texts.input_ids, texts.attention_mask)
        assert hook_count(model) == 0  # run_pairs' hooks are gone once it returns
    assert len(run.events) == len(adapter.blocks("image")) == model.config.num_hidden_layers
    assert all(e.probs.requires_grad for e in run.events)
    for method in ("chefer", "rollout", "raw_attention"):
        cliplens.explain(adapter, images(), PROMPTS, method=method)
    assert hook_count(model) == 0
    assert not any("visual_embed" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    assert model.config.max_image_length == 7
    assert model.config._attn_implementation == attn
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(own_output(), before)


def test_capture_undone_when_the_model_raises():
    adapter = hf_vilt_factory()
    layer = adapter.model.vilt.encoder.layer[1]

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = layer.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cliplens.explain(adapter, images(), PROMPTS, method="chefer")
    finally:
        handle.remove()
    assert hook_count(adapter.model) == 0
    assert "visual_embed" not in adapter.model.vilt.embeddings.__dict__


# ---- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
def test_batch_equals_one_by_one(method):
    assert_batch_equals_one_by_one(hf_vilt_factory(dtype=torch.float64), images(), PROMPTS, method)


def test_score_table_matches_explain():
    adapter = hf_vilt_factory(dtype=torch.float64)
    (batch,) = adapter.prepare_images(images())
    table = adapter.score_table(batch, adapter.tokenize(PROMPTS))
    e = cliplens.explain(adapter, images(), PROMPTS, method="raw_attention")
    np.testing.assert_allclose(table.numpy(), e.logits, rtol=1e-12)
    assert e.meta["probability"] == "sigmoid"


# ---- what ViLT refuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "legrad", "grad_eclip"])
def test_refused_methods(method):
    adapter = hf_vilt_factory()
    with pytest.raises(InputError) as info:
        cliplens.explain(adapter, images(), PROMPTS, method=method)
    message = str(info.value)
    assert "\n" not in message
    assert ("cross-attention" if method == "gradcam" else "fusion model") in message


def test_chefer_start_layer_refused():
    with pytest.raises(InputError, match="start_layer"):
        cliplens.explain(hf_vilt_factory(), images(), PROMPTS, method="chefer", start_layer=1)


def test_other_vilt_models_refused():
    from transformers import ViltConfig, ViltForQuestionAnswering

    config = ViltConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    with pytest.raises(ModelLoadError, match="rank_output"):
        HFViltITMAdapter(ViltForQuestionAnswering(config), word_tokenizer())


# ---- loading -------------------------------------------------------------------------------------


def test_load_checkpoint_directory(tmp_path):
    model = make_tiny_vilt()
    path = tmp_path / "tiny-vilt"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 48},
                "size_divisor": 16,
                "image_mean": [0.4] * 3,
                "image_std": [0.3] * 3,
            }
        )
    )
    adapter = cliplens.load_model(str(path))
    assert isinstance(adapter, HFViltITMAdapter) and adapter.family == "hf-vilt-itm"
    pre = adapter.preprocess
    assert (pre.size, pre.size_divisor, pre.mean, pre.std) == (48, 16, (0.4,) * 3, (0.3,) * 3)
    (batch,) = adapter.prepare_images([random_image(0, size=(96, 48))])  # 96 wide, 48 high
    # 48 x 96 capped at int(1333 / 800 * 48) = 79 on the long side: 39.5 x 79, then to whole 16s
    assert tuple(batch.pixel_values.shape[-2:]) == (32, 64)
    e = cliplens.explain(adapter, [random_image(0)], PROMPTS, method="chefer")
    assert np.isfinite(e.logits).all()


@pytest.mark.parametrize(
    "head", ["ViltForQuestionAnswering", "ViltForImagesAndTextClassification", "ViltForMaskedLM"]
)
def test_load_refuses_other_heads(tmp_path, head):
    from transformers import ViltConfig

    config = ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    config.architectures = [head]
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        HFViltITMAdapter.load(Checkpoint(str(tmp_path), "some-vilt"))
    message = str(info.value)
    assert "\n" not in message and head in message
    assert "ViltForImageAndTextRetrieval" in message and "dandelin/vilt-b32-finetuned-coco" in message


def test_adapt_model_object():
    from cliplens.adapters.families import family_of_model

    model = make_tiny_vilt()
    family = family_of_model(model)
    assert family is not None and family.name == "hf-vilt-itm"
    adapter = family.adapt(model, word_tokenizer(), name="obj")
    assert adapter.num_layers == {"image": 2, "text": 2} and adapter.context_length == 16


# ---- preprocessing -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 200), (333, 517), (384, 384)])
def test_preprocess_is_vilts_processor(size):
    """``resize="model"`` gives ViltImageProcessor's pixels for one image (no padding)."""
    vilt_pil = pytest.importorskip("transformers.models.vilt.image_processing_pil_vilt")
    img = random_image(3, size=size)
    pixels, geometry = vilt_preprocess_from_config(None, 384, 32)(img)
    reference = vilt_pil.ViltImageProcessorPil()(img, return_tensors="pt")
    assert bool(reference["pixel_mask"].all())
    assert pixels.shape == reference["pixel_values"].shape[1:]
    torch.testing.assert_close(pixels, reference["pixel_values"][0], rtol=0, atol=1e-6)
    assert geometry.input_size == (pixels.shape[2], pixels.shape[1]) and geometry.crop == (0.0, 0.0)
