"""BLIP-2 image-text matching (hf-blip2-itm): a ViT, then a Q-Former over learned query tokens
concatenated with the prompt, whose query tokens alone cross-attend to the image; the ITM head's
logits are averaged over the query tokens.

The oracles below are written from the equations on the transformers model itself (a deep copy
with gradients on, forward hooks of the test's own and ``retain_grad`` on the probabilities each
attention module returns, one pair at a time, float64, full matrices), never through cliplens'
engine or the adapter's hooks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import adapt
from cliplens.adapters.base import Checkpoint
from cliplens.adapters.hf_blip import HFBlipITMAdapter
from cliplens.adapters.hf_blip2 import HFBlip2ITMAdapter
from cliplens.errors import InputError, ModelLoadError
from families import hf_blip2_factory, make_tiny_blip2, random_image, word_tokenizer
from helpers import assert_batch_equals_one_by_one, hook_count, model_state, rel

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "the big dog and a small cat"]  # different lengths: padding in a batch
NQ = 4  # the tiny model's query tokens


def images():
    return [random_image(0), random_image(1, size=(40, 56))]


@pytest.fixture(scope="module", params=[1, 2], ids=["cross-every-layer", "cross-every-2nd-layer"])
def blip2_64(request):
    return hf_blip2_factory(dtype=torch.float64, cross_attention_frequency=request.param)


# ---- the oracle: the model itself, one pair at a time ----------------------------------------------


def attention_and_gradients(model, pixels, ids):
    """(logit, itm, [(kind, A (H, q, k), dlogit/dA)]) of ONE pair in execution order, kind one of
    "image", "qformer", "cross"; through the model's own forward (eager attention) on a deep copy
    with gradients on. ``ids``: the prompt's ids alone (no padding); the query placeholders a
    config with image_token_index expects are prepended here."""
    model = copy.deepcopy(model).requires_grad_(True).eval()
    model.config.text_config._attn_implementation_internal = "eager"  # no language model: nothing runs it
    model.set_attn_implementation("eager")
    kept = []

    def keep(kind):
        def hook(module, args, output):
            output[1].retain_grad()
            kept.append((kind, output[1]))

        return hook

    for layer in model.vision_model.encoder.layers:
        layer.self_attn.register_forward_hook(keep("image"))
    for layer in model.qformer.encoder.layer:
        layer.attention.attention.register_forward_hook(keep("qformer"))
        if layer.has_cross_attention:
            layer.crossattention.attention.register_forward_hook(keep("cross"))
    size = model.config.vision_config.image_size
    if tuple(pixels.shape[-2:]) != (size, size):  # the ViT's own position-embedding interpolation
        model.vision_model.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "interpolate_pos_encoding": True}), with_kwargs=True
        )
    if model.config.image_token_index is not None:
        ids = torch.cat([torch.full((1, NQ), model.config.image_token_index), ids], dim=1)
    itm = model(
        pixel_values=pixels,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        use_image_text_matching_head=True,
    ).logits_per_image
    logit = itm[0, 1] - itm[0, 0]
    logit.backward()
    return logit.detach(), itm.detach()[0], [(kind, a.detach()[0], a.grad[0]) for kind, a in kept]


def abar(a, g):
    """mean over heads of (dy/dA * A)^+."""
    return (g * a).clamp(min=0).mean(dim=0)


def rbar(R):
    """Rbar = (R - I) / rowsum(R - I) + I, row by row (a row of R - I summing to 0: e_i)."""
    n = R.shape[0]
    out = torch.eye(n, dtype=R.dtype)
    for i in range(n):
        hat = R[i] - out[i]
        total = float(hat.sum())
        if total != 0.0:
            out[i] = hat / total + out[i]
    return out


def oracle(method, model, pixels, ids):
    """(image row over the image tokens (n_img,), text row over the prompt's tokens (T,)) of
    ``method`` for one pair: the mean over the query tokens' rows, as the model averages them."""
    _, _, events = attention_and_gradients(model, pixels, ids)
    T = ids.shape[1]
    n_img, n_q = events[0][1].shape[-1], NQ + T
    if method == "raw_attention":  # the last cross layer's and the last self-attention's rows
        cross = [a for kind, a, _ in events if kind == "cross"][-1].mean(dim=0)  # (NQ, n_img)
        own = [a for kind, a, _ in events if kind == "qformer"][-1].mean(dim=0)  # (n_q, n_q)
        return cross.mean(dim=0), own[:NQ].mean(dim=0)[NQ:]
    assert method == "chefer"
    f64 = {"dtype": torch.float64}
    R_ii, R_qq = torch.eye(n_img, **f64), torch.eye(n_q, **f64)
    R_qi, R_iq = torch.zeros(n_q, n_img, **f64), torch.zeros(n_img, n_q, **f64)
    for kind, a, g in events:
        A = abar(a, g)
        if kind == "image":  # self-attention on the image tokens
            R_ii, R_iq = R_ii + A @ R_ii, R_iq + A @ R_iq
        elif kind == "qformer":  # self-attention over [queries, text]
            R_qq, R_qi = R_qq + A @ R_qq, R_qi + A @ R_qi
        else:  # the query tokens cross-attend to the image; the text rows do not attend
            assert A.shape == (NQ, n_img)
            A_full = torch.zeros(n_q, n_img, **f64)
            for i in range(NQ):
                A_full[i] = A[i]
            R_qi, R_qq = R_qi + rbar(R_qq).T @ A_full @ rbar(R_ii), R_qq + A_full @ R_iq
    return R_qi[:NQ].mean(dim=0), R_qq[:NQ].mean(dim=0)[NQ:]


@pytest.mark.parametrize("method", ["chefer", "raw_attention"])
def test_oracle(method, blip2_64):
    adapter = blip2_64
    imgs = images()
    e = cliplens.explain(adapter, imgs, PROMPTS, method=method)
    (batch,) = adapter.prepare_images(imgs)  # squashed: one size
    assert e.image_maps.shape == (2, 2, 4, 4)
    if method == "chefer":
        assert np.all(e.extras["degenerate_rows"] == 0)
    for b in range(2):
        for p, prompt in enumerate(PROMPTS):
            ids = adapter.tokenize([prompt]).input_ids  # alone: no padding in the oracle's run
            T = ids.shape[1]
            image_row, text_row = oracle(method, adapter.model, batch.pixel_values[b : b + 1], ids)
            assert np.abs(image_row[1:].numpy()).max() > 1e-8  # the image really reaches the readout
            assert rel(e.image_maps[b, p], image_row[1:].reshape(4, 4).numpy()) < 1e-6
            assert rel(e.token_scores[b, p, :T], text_row.numpy()) < 1e-6
            assert np.isnan(e.token_scores[b, p, T:]).all()  # the batch's padding


def test_oracle_at_another_input_size():
    """resize="full": a 6 x 4 grid (shortest edge 32, the other to whole patches), the ViT's
    position embeddings interpolated as its own flag does."""
    adapter = hf_blip2_factory(dtype=torch.float64)
    image = random_image(1, size=(40, 56))  # 40 wide, 56 high
    e = cliplens.explain(adapter, image, PROMPTS[1], method="chefer", resize="full")
    (batch,) = adapter.prepare_images([image], resize="full")
    assert tuple(batch.pixel_values.shape[-2:]) == (48, 32) and e.image_maps.shape == (1, 1, 6, 4)
    ids = adapter.tokenize([PROMPTS[1]]).input_ids
    image_row, text_row = oracle("chefer", adapter.model, batch.pixel_values, ids)
    assert rel(e.image_maps[0, 0], image_row[1:].reshape(6, 4).numpy()) < 1e-6
    assert rel(e.token_scores[0, 0], text_row.numpy()) < 1e-6
    logit, _, _ = attention_and_gradients(adapter.model, batch.pixel_values, ids)
    assert e.logits[0, 0] == pytest.approx(float(logit), rel=1e-10)


def test_oracle_logits_and_probability(blip2_64):
    adapter = blip2_64
    e = cliplens.explain(adapter, images(), PROMPTS, method="raw_attention")
    (batch,) = adapter.prepare_images(images())
    for b in range(2):
        for p, prompt in enumerate(PROMPTS):
            logit, itm, _ = attention_and_gradients(
                adapter.model, batch.pixel_values[b : b + 1], adapter.tokenize([prompt]).input_ids
            )
            assert e.logits[b, p] == pytest.approx(float(logit), rel=1e-10)
            assert e.probs[b, p] == pytest.approx(float(itm.softmax(-1)[1]), rel=1e-10)
    # the logit depends on the image and on the prompt
    assert np.ptp(e.logits, axis=0).min() > 1e-3 and np.ptp(e.logits, axis=1).min() > 1e-3


def test_query_placeholders_when_the_config_names_an_image_token():
    """A config with image_token_index expects the processor's query placeholders in front of the
    ids (the model cuts them off); the adapter adds them: same numbers as without."""
    plain = hf_blip2_factory(dtype=torch.float64)
    marked = hf_blip2_factory(dtype=torch.float64, image_token_index=len(word_tokenizer().vocab))
    assert marked.model.config.image_token_index is not None
    for method in ("chefer", "raw_attention"):
        a = cliplens.explain(plain, images(), PROMPTS, method=method)
        b = cliplens.explain(marked, images(), PROMPTS, method=method)
        np.testing.assert_allclose(b.logits, a.logits, rtol=1e-12, atol=0)
        assert rel(b.image_maps, a.image_maps) < 1e-12 and rel(b.token_scores, a.token_scores) < 1e-12
    (batch,) = marked.prepare_images(images()[:1])
    ids = marked.tokenize(PROMPTS[:1]).input_ids
    image_row, _ = oracle("chefer", marked.model, batch.pixel_values, ids)
    e = cliplens.explain(marked, images()[:1], PROMPTS[:1], method="chefer")
    assert rel(e.image_maps[0, 0], image_row[1:].reshape(4, 4).numpy()) < 1e-6


# ---- the capture ---------------------------------------------------------------------------------


def n_attention_modules(model) -> int:
    names = ("Blip2Attention", "Blip2QFormerMultiHeadAttention")
    return sum(1 for m in model.modules() if type(m).__name__ in names)


@pytest.mark.parametrize("frequency", [1, 2])
def test_stream_layout_and_events(frequency):
    adapter = hf_blip2_factory(cross_attention_frequency=frequency)
    model = adapter.model
    (batch,) = adapter.prepare_images(images())
    texts = adapter.tokenize(PROMPTS)
    T = texts.input_ids.shape[1]
    pixels = batch.pixel_values.repeat_interleave(2, dim=0)
    ids, mask = texts.input_ids.repeat(2, 1), texts.attention_mask.repeat(2, 1)
    with adapter.explaining():
        run = adapter.run_pairs(pixels, ids, mask)
        own = model(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True
        )
    torch.testing.assert_close(
        run.logits.detach(), own.logits_per_image[:, 1] - own.logits_per_image[:, 0], rtol=0, atol=0
    )
    # every attention module is an event, in execution order
    cross_layers = [i for i in range(2) if i % frequency == 0]
    assert len(run.events) == n_attention_modules(model) == 2 + 2 + len(cross_layers)
    want = [("self", "image", "image", "image", 0, None), ("self", "image", "image", "image", 1, None)]
    for i in range(2):
        want.append(("self", "qformer", "qformer", "qformer", i, None))
        if i in cross_layers:
            want.append(("cross", "qformer", "image", "qformer", i, slice(0, NQ)))
    assert [(e.kind, e.query, e.key, e.stack, e.layer, e.rows) for e in run.events] == want
    assert [e.step for e in run.events] == list(range(len(want)))
    shapes = {
        "self-image": (4, 4, 17, 17),
        "self-qformer": (4, 4, NQ + T, NQ + T),
        "cross-qformer": (4, 4, NQ, 17),
    }
    for e in run.events:
        assert tuple(e.probs.shape) == shapes[f"{e.kind}-{e.query}"]
    # the probabilities are the tensors in the graph: the logit's gradient reaches every
    # Q-Former event and the ViT's per-pair output; the ViT's (shared) events hang off its output
    assert [e.shared for e in run.events] == ["image" if e.stack == "image" else None for e in run.events]
    (part,) = run.shared
    pair_events = [e.probs for e in run.events if not e.shared]
    grads = torch.autograd.grad(run.logits.sum(), pair_events + part.leaves)
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    grads = torch.autograd.grad(part.outputs[0].sum(), [e.probs for e in run.events if e.shared])
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    # streams and readout
    image, qformer = run.streams["image"], run.streams["qformer"]
    assert run.grid == (4, 4) and image.size == 17
    assert (image.cells[:, 0] == -1).all() and (image.cells[:, 1:] == torch.arange(16)).all()
    assert qformer.size == NQ + T and (qformer.cells == -1).all()
    assert (qformer.positions[:, :NQ] == -1).all() and (qformer.positions[:, NQ:] == torch.arange(T)).all()
    assert qformer.valid[:, :NQ].all() and torch.equal(qformer.valid[:, NQ:], mask.bool())
    stream, weights = run.readout
    assert stream == "qformer"
    assert torch.equal(weights, torch.cat([torch.full((4, NQ), 1 / NQ), torch.zeros(4, T)], dim=1))


def test_capture_leaves_the_model_as_it_was():
    adapter = hf_blip2_factory()
    model = adapter.model
    model.train()
    model.itm_head.requires_grad_(False)
    (batch,) = adapter.prepare_images(images()[:1])
    texts = adapter.tokenize(PROMPTS)
    pixels = batch.pixel_values.repeat(2, 1, 1, 1)

    def own_output():
        training = model.training
        model.eval()  # the Q-Former's dropout
        with torch.no_grad():
            out = model(
                pixel_values=pixels,
                input_ids=texts.input_ids,
                attention_mask=texts.attention_mask,
                use_image_text_matching_head=True,
            ).logits_per_image
        model.train(training)
        return out

    before_output = own_output()
    before = model_state(model)
    assert before["hooks"] == 0 and "eager" not in before["attn"]
    with adapter.explaining():
        adapter.run_pairs(pixels, texts.input_ids, texts.attention_mask)
        assert hook_count(model) == 0  # run_pairs' hooks are gone once it returns
    for method in ("chefer", "raw_attention"):
        cliplens.explain(adapter, images(), PROMPTS, method=method)
        cliplens.explain(adapter, images(), PROMPTS, method=method, resize="full")
    assert model_state(model) == before
    assert torch.equal(own_output(), before_output)


def test_capture_undone_when_the_model_raises():
    adapter = hf_blip2_factory()
    before = model_state(adapter.model)

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = adapter.model.qformer.encoder.layer[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cliplens.explain(adapter, images(), PROMPTS, method="chefer", resize="full")
    finally:
        handle.remove()
    assert model_state(adapter.model) == before


# ---- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["chefer", "raw_attention"])
def test_batch_equals_one_by_one(method):
    assert_batch_equals_one_by_one(hf_blip2_factory(dtype=torch.float64), images(), PROMPTS, method)


def test_score_table_matches_explain():
    adapter = hf_blip2_factory(dtype=torch.float64)
    (batch,) = adapter.prepare_images(images())
    with adapter.explaining():
        table = adapter.score_table(batch, adapter.tokenize(PROMPTS))
    e = cliplens.explain(adapter, images(), PROMPTS, method="raw_attention")
    np.testing.assert_allclose(table.numpy(), e.logits, rtol=1e-12)
    assert e.meta["probability"] == "sigmoid"


# ---- what BLIP-2 refuses -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "rollout", "legrad", "grad_eclip", "decomposition"])
def test_refused_methods(method):
    adapter = hf_blip2_factory()
    with pytest.raises(InputError) as info:
        cliplens.explain(adapter, images(), PROMPTS, method=method)
    message = str(info.value)
    assert "\n" not in message
    if method == "gradcam":  # LAVIS's Grad-CAM averages the text tokens' cross-attention rows
        assert "no text token cross-attends to the image" in message


def test_gradcam_flag_is_blip2s_alone():
    assert HFBlip2ITMAdapter.text_cross_attention is False
    assert HFBlipITMAdapter.text_cross_attention is True  # BLIP's text tokens do cross-attend


def test_chefer_start_layer_refused():
    with pytest.raises(InputError, match="start_layer") as info:
        cliplens.explain(hf_blip2_factory(), images(), PROMPTS, method="chefer", start_layer=1)
    assert "\n" not in str(info.value)


def test_qformer_without_a_text_path_refused():
    from transformers import Blip2ForImageTextRetrieval

    config = make_tiny_blip2().config
    config.qformer_config.use_qformer_text_input = False
    with pytest.raises(ModelLoadError, match="use_qformer_text_input") as info:
        HFBlip2ITMAdapter(Blip2ForImageTextRetrieval(config), word_tokenizer())
    assert "\n" not in str(info.value)


# ---- loading -------------------------------------------------------------------------------------


def test_load_checkpoint_directory(tmp_path):
    model = make_tiny_blip2()
    path = tmp_path / "tiny-blip2"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 48, "width": 48}, "image_mean": [0.4] * 3, "image_std": [0.3] * 3})
    )
    adapter = cliplens.load_model(str(path))
    assert isinstance(adapter, HFBlip2ITMAdapter) and adapter.family == "hf-blip2-itm"
    pre = adapter.preprocess
    assert (pre.crop, pre.mean, pre.std) == ((48, 48), (0.4,) * 3, (0.3,) * 3)
    assert adapter.num_layers == {"image": 2, "text": 2} and adapter.context_length == 16
    e = cliplens.explain(adapter, images(), PROMPTS, method="chefer")
    assert e.image_maps.shape == (2, 2, 6, 6) and np.isfinite(e.logits).all()
    # the same weights as the model saved: the same logits on the same pixels
    reference = hf_blip2_factory()
    (batch,) = adapter.prepare_images(images()[:1])
    texts = adapter.tokenize(PROMPTS)
    with adapter.explaining(), reference.explaining():
        torch.testing.assert_close(adapter.score_table(batch, texts), reference.score_table(batch, texts))


def test_half_precision_checkpoint(tmp_path):
    """dtype=float16 loads the ViT and the head in float16 and keeps the Q-Former and the query
    tokens in float32 (transformers' _keep_in_fp32_modules): the mixed run still explains."""
    path = tmp_path / "tiny-blip2"
    make_tiny_blip2().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    half = cliplens.load_model(str(path), dtype=torch.float16)
    assert half.model.vision_model.embeddings.class_embedding.dtype == torch.float16
    assert half.model.qformer.layernorm.weight.dtype == torch.float32
    full = cliplens.load_model(str(path))
    e16 = cliplens.explain(half, images(), PROMPTS, method="chefer")
    e32 = cliplens.explain(full, images(), PROMPTS, method="chefer")
    assert (
        np.isfinite(e16.image_maps).all() and np.isfinite(e16.token_scores[~np.isnan(e32.token_scores)]).all()
    )
    np.testing.assert_allclose(e16.logits, e32.logits, atol=0.02)
    assert rel(e16.image_maps, e32.image_maps) < 0.02


@pytest.mark.parametrize("head", ["Blip2ForConditionalGeneration", "Blip2Model", None])
def test_load_refuses_other_heads(tmp_path, head):
    config = make_tiny_blip2().config
    config.architectures = [head] if head else None
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        HFBlip2ITMAdapter.load(Checkpoint(str(tmp_path), "some-blip2"))
    message = str(info.value)
    assert "\n" not in message and (head or "no named head") in message
    assert "Blip2ForImageTextRetrieval" in message and "Salesforce/blip2-itm-vit-g" in message


def test_adapt_model_object():
    from cliplens.adapters.families import family_of_model, family_of_type

    model = make_tiny_blip2()
    family = family_of_model(model)
    assert family is not None and family.name == "hf-blip2-itm"
    assert family_of_type("blip-2") is family and family_of_type("blip").name == "hf-blip-itm"
    adapter = adapt(model, word_tokenizer(), name="obj")
    assert isinstance(adapter, HFBlip2ITMAdapter) and adapter.name == "obj"


# ---- preprocessing -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 48), (30, 70), (32, 32)])
def test_preprocess_is_blip2s_processor(size):
    """BLIP-2's processor is BlipImageProcessor: squash to {height, width}, OpenAI mean and std,
    bicubic; the adapter's default recipe gives its pixels at the model's size."""
    blip_pil = pytest.importorskip("transformers.models.blip.image_processing_pil_blip")
    img = random_image(3, size=size)
    adapter = hf_blip2_factory()
    pixels, _ = adapter.preprocess(img)
    reference = blip_pil.BlipImageProcessorPil(size={"height": 32, "width": 32})(img, return_tensors="pt")
    assert pixels.shape == reference["pixel_values"].shape[1:] == (3, 32, 32)
    torch.testing.assert_close(pixels, reference["pixel_values"][0], rtol=0, atol=1e-5)
