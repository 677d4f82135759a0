"""BridgeTower (hf-bridgetower-itm): co-attention cross-modal layers fed by link towers.

The oracle is written from the equations and the adapter's documented extension (link towers
are the identity: the unimodal and cross-modal states of a modality are one relevance stream;
within a cross-modal layer both self-attentions read the layer's state, then both cross
directions read the state after them), on the transformers model itself: a deep copy, one pair
at a time, float64, with forward hooks of the test's own on every text attention module and
the ViT's ``nn.MultiheadAttention`` replaced (on the copy) by a per-head implementation of the
test's own, ``torch.autograd.grad`` at the probabilities; the rules run on full matrices in
plain loops. Nothing of cliplens' engine is used."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cliplens
from cliplens.adapters.hf_bridgetower import HFBridgeTowerITMAdapter
from cliplens.errors import InputError, ModelLoadError
from families import hf_bridgetower_factory, make_tiny_bridgetower, random_image, word_tokenizer
from helpers import model_state

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a red circle", "the big dog and a small cat", "cat"]  # different lengths: padding in a batch
IMAGES = [random_image(0), random_image(1, size=(30, 52))]


@pytest.fixture(scope="module")
def bt64():
    return hf_bridgetower_factory(dtype=torch.float64)


# ---- the oracle --------------------------------------------------------------------------------


def own_mha(mha, kept):
    """A forward for the ViT's nn.MultiheadAttention (sequence first, self-attention, no mask)
    that keeps its per-head probabilities in ``kept``."""

    def forward(query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None, **kw):
        assert attn_mask is None and key_padding_mask is None
        L, B, E = query.shape
        H = mha.num_heads
        d = E // H
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)  # (L, B, 3E)
        q, k, v = (t.reshape(L, B, H, d).permute(1, 2, 0, 3) for t in qkv.chunk(3, dim=-1))
        a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # (B, H, L, L)
        kept.append(a)
        out = (a @ v).permute(2, 0, 1, 3).reshape(L, B, E)
        return mha.out_proj(out), None

    return forward


def attention_and_gradients(adapter, image, text):
    """([(role, A (H, q, k), dy/dA)] in call order, y, T) of ONE pair."""
    model = copy.deepcopy(adapter.model).eval().requires_grad_(True)
    bt = model.bridgetower
    pixels = adapter.prepare_images([image])[0].pixel_values
    batch = adapter.tokenize([text])
    kept, names = [], []

    def hook(role):
        def h(mod, args, out):
            kept.append(out[1])
            names.append(role)

        return h

    handles = [layer.attention.self.register_forward_hook(hook("tt")) for layer in bt.text_model.encoder.layer]
    for tl, il in zip(bt.cross_modal_text_layers, bt.cross_modal_image_layers):
        handles.append(tl.attention.self.register_forward_hook(hook("tt")))
        handles.append(tl.crossattention.self.register_forward_hook(hook("ti")))
        handles.append(il.attention.self.register_forward_hook(hook("ii")))
        handles.append(il.crossattention.self.register_forward_hook(hook("it")))
    for block in bt.vision_model.visual.transformer.resblocks:
        inner = own_mha(block.attn, kept)

        def forward(*args, _inner=inner, **kw):
            names.append("ii")
            return _inner(*args, **kw)

        block.attn.forward = forward
    try:
        itm = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
    finally:
        for h in handles:
            h.remove()
    y = itm[0, 1] - itm[0, 0]
    grads = torch.autograd.grad(y, kept, allow_unused=True)
    events = [(r, a.detach()[0], torch.zeros_like(a[0]) if g is None else g[0]) for r, a, g in zip(names, kept, grads)]
    return events, float(y.detach()), batch.input_ids.shape[1]


def oracle_chefer(adapter, image, text):
    """(image row (n,), token row (T,), y) of one pair: the text [CLS]'s rows of R_ti and R_tt."""
    events, y, T = attention_and_gradients(adapter, image, text)
    n = events[[r for r, _, _ in events].index("ii")][1].shape[-1]
    f64 = torch.float64
    R = {"tt": torch.eye(T, dtype=f64), "ii": torch.eye(n, dtype=f64)}
    R["ti"], R["it"] = torch.zeros(T, n, dtype=f64), torch.zeros(n, T, dtype=f64)
    abar = lambda a, g: (g * a).clamp(min=0).mean(dim=0)
    other = {"t": "i", "i": "t"}

    def self_rule(s, A):  # R_ss += A R_ss, R_sq += A R_sq
        q = other[s]
        R[s + s], R[s + q] = R[s + s] + A @ R[s + s], R[s + q] + A @ R[s + q]

    def rbar(M):
        m = M.shape[0]
        eye = torch.eye(m, dtype=f64)
        out = eye.clone()
        for i in range(m):
            hat = M[i] - eye[i]
            total = hat.sum()
            if float(total) != 0.0:
                out[i] = hat / total + eye[i]
        return out

    i = 0
    while i < len(events):
        role = events[i][0]
        if role in ("tt", "ii") and (i + 1 >= len(events) or events[i + 1][0] not in ("ti",)):
            self_rule(role[0], abar(events[i][1], events[i][2]))  # a unimodal layer (link tower: identity)
            i += 1
            continue
        (r1, a_tt, g_tt), (r2, a_ti, g_ti), (r3, a_ii, g_ii), (r4, a_it, g_it) = events[i : i + 4]
        assert (r1, r2, r3, r4) == ("tt", "ti", "ii", "it")
        self_rule("t", abar(a_tt, g_tt))
        self_rule("i", abar(a_ii, g_ii))
        pre = dict(R)  # both cross directions read the state after the two self-attentions
        for s, q, A in (("t", "i", abar(a_ti, g_ti)), ("i", "t", abar(a_it, g_it))):
            R[s + q] = R[s + q] + rbar(pre[s + s]).T @ A @ rbar(pre[q + q])
            R[s + s] = R[s + s] + A @ pre[q + s]
        i += 4
    return R["ti"][0].numpy(), R["tt"][0].numpy(), y


def rel(have, want) -> float:
    have, want = np.asarray(have, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(have - want).max() / np.abs(want).max())


# ---- chefer against the oracle -------------------------------------------------------------------


def test_chefer_matches_float64_oracle(bt64):
    ex = cliplens.explain(bt64, IMAGES, TEXTS, method="chefer")
    for b, image in enumerate(IMAGES):
        for p, text in enumerate(TEXTS):
            image_row, tokens_row, y = oracle_chefer(bt64, image, text)
            gh, gw = ex.image_maps.shape[-2:]
            assert image_row.shape == (1 + gh * gw,)
            assert np.abs(image_row[1:]).max() > 1e-6  # the patches really reach [CLS]
            assert rel(ex.image_maps[b, p].reshape(-1), image_row[1:]) < 1e-6
            t = len(ex.tokens[p])
            assert rel(ex.token_scores[b, p, :t], tokens_row) < 1e-6
            assert np.isnan(ex.token_scores[b, p, t:]).all()
            assert ex.logits[b, p] == pytest.approx(y, rel=1e-10, abs=1e-12)
            assert ex.probs[b, p] == pytest.approx(1.0 / (1.0 + np.exp(-y)), rel=1e-10)


# ---- the capture -----------------------------------------------------------------------------------


def test_capture_sees_every_attention_call_and_leaves_the_model_as_found(bt64):
    adapter, model = bt64, bt64.model
    assert model.training  # a fresh model: explaining must switch dropout off and back on
    plain_model = copy.deepcopy(model).eval()
    calls = []
    names = ("BridgeTowerSelfAttention", "BridgeTowerCrossAttention", "MultiheadAttention")
    handles = [
        m.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
        for m in plain_model.modules()
        if type(m).__name__ in names
    ]
    pixels = adapter.prepare_images(IMAGES[:1])[0].pixel_values.repeat(len(TEXTS), 1, 1, 1)
    batch = adapter.tokenize(TEXTS)
    try:
        with torch.no_grad():
            plain = plain_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)
    finally:
        for h in handles:
            h.remove()
    before = model_state(model)
    with adapter.explaining():
        run = adapter.run_pairs(pixels, batch.input_ids, batch.attention_mask)
    # 2 unimodal layers per encoder, 2 cross-modal layers of 4 attention calls
    assert len(run.events) == len(calls) == 2 + 2 + 2 * 4
    assert [(e.kind, e.query, e.key) for e in run.events] == [
        ("self", "text", "text"),
        ("self", "image", "image"),
        ("self", "text", "text"),
        ("self", "image", "image"),
        ("cross", "text", "image"),
        ("cross", "image", "text"),
        ("self", "text", "text"),
        ("self", "image", "image"),
        ("self", "text", "text"),
        ("self", "image", "image"),
        ("cross", "text", "image"),
        ("cross", "image", "text"),
    ]
    assert [e.step for e in run.events] == [0, 1, 2, 2, 3, 3, 4, 5, 6, 6, 7, 7]
    assert [e.layer for e in run.events] == [0, 0, 2, 2, 2, 2, 1, 1, 3, 3, 3, 3]
    assert [e.probs.shape[1] for e in run.events] == [4, 2, 4, 4, 4, 4, 4, 2, 4, 4, 4, 4]
    assert all(e.probs.requires_grad for e in run.events)
    torch.testing.assert_close(run.logits.detach(), plain.logits[:, 1] - plain.logits[:, 0], rtol=1e-12, atol=1e-12)
    assert run.grid == (4, 4) and run.readout[0] == "text"
    assert run.streams["image"].size == 17 and (run.streams["image"].cells[:, 0] == -1).all()
    cliplens.explain(adapter, IMAGES, TEXTS, method="chefer")
    assert model_state(model) == before
    with torch.no_grad():
        again = copy.deepcopy(model).eval()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels
        )
    assert torch.equal(plain.logits, again.logits)


def test_the_logit_depends_on_image_and_text(bt64):
    logit = lambda image, text="a red circle": cliplens.similarity(bt64, image, text)[0][0, 0]
    y = logit(IMAGES[0])
    for changed in (logit(IMAGES[1]), logit(IMAGES[0], "the big dog")):
        assert abs(changed - y) > 1e-3


def test_batch_equals_one_by_one_and_values_are_finite(bt64):
    ex = cliplens.explain(bt64, IMAGES, TEXTS, method="chefer")
    chunked = cliplens.explain(bt64, IMAGES, TEXTS, method="chefer", max_pairs=1)
    np.testing.assert_allclose(chunked.image_maps, ex.image_maps, rtol=1e-10, atol=1e-14)
    for b, image in enumerate(IMAGES):
        for p, text in enumerate(TEXTS):
            one = cliplens.explain(bt64, image, text, method="chefer")
            np.testing.assert_allclose(one.image_maps[0, 0], ex.image_maps[b, p], rtol=1e-10, atol=1e-14)
            t = len(ex.tokens[p])
            np.testing.assert_allclose(one.token_scores[0, 0, :t], ex.token_scores[b, p, :t], rtol=1e-10, atol=1e-14)
            assert one.logits[0, 0] == pytest.approx(ex.logits[b, p], rel=1e-12)
    assert np.isfinite(ex.image_maps).all()
    for method in ("raw_attention", "gradcam"):
        assert np.isfinite(cliplens.explain(bt64, IMAGES, TEXTS, method=method).image_maps).all()


# ---- refusals ----------------------------------------------------------------------------------------


def test_refusals(bt64, tmp_path):
    with pytest.raises(InputError, match="cross-attention"):
        cliplens.explain(bt64, IMAGES[0], TEXTS[0], method="rollout")
    with pytest.raises(InputError, match="fusion model"):
        cliplens.explain(bt64, IMAGES[0], TEXTS[0], method="grad_eclip")
    with pytest.raises(ModelLoadError, match="image-text matching head"):
        HFBridgeTowerITMAdapter(make_tiny_bridgetower().bridgetower, word_tokenizer())
    # a checkpoint of another BridgeTower head is refused in one line at load
    model = make_tiny_bridgetower()
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace("BridgeTowerForImageAndTextRetrieval", "BridgeTowerForMaskedLM"))
    with pytest.raises(ModelLoadError) as err:
        cliplens.load_model(str(tmp_path))
    assert "BridgeTowerForMaskedLM" in str(err.value) and "\n" not in str(err.value)


def test_loads_from_a_directory_with_its_family(tmp_path):
    model = make_tiny_bridgetower()
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    adapter = cliplens.load_model(str(tmp_path))
    assert isinstance(adapter, HFBridgeTowerITMAdapter) and adapter.family == "hf-bridgetower-itm"
    assert adapter.preprocess.size == 32 and adapter.preprocess.crop == (32, 32)
    assert adapter.pair_probability == "sigmoid" and adapter.context_length == 19
    from cliplens.adapters import adapt

    assert adapt(model, word_tokenizer()).family == "hf-bridgetower-itm"
