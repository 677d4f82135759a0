"""Contract tests: every registered method x every adapter family (conftest.ADAPTER_FACTORIES).

For each pair: shapes, finite values, a batch of 2 images x 3 prompts equals the 6 calls one
by one, determinism, and the model left exactly as found (no hooks, same flags and modes,
bit-identical outputs), also after an exception injected in the forward pass, in the backward
pass or in the target.

Which (method, family) pairs are supported is read from the method's capability flags
(``Method.requires`` against ``ModelAdapter.capabilities``), not kept by hand: where a method
declares itself unsupported, explain must fail with a one-line InputError, which is checked
instead. Methods flagged ``complete`` must return completeness deltas at rounding level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cliplens
from cliplens.methods import REGISTRY
from conftest import ADAPTER_FACTORIES, random_image
from families import FUSION_FACTORIES
from helpers import model_state

METHODS = [name for name in REGISTRY if not name.startswith("_")]

TEXTS = ["a red triangle", "a photo of a small dog", "cat"]
IMAGES = [random_image(1), random_image(2, size=(40, 64))]


class Boom(Exception):
    pass


#: dual encoders and fusion models (image and text scored together)
EVERY_FAMILY = ADAPTER_FACTORIES + FUSION_FACTORIES


@pytest.fixture(scope="module", params=EVERY_FAMILY, ids=[name for name, _ in EVERY_FAMILY])
def family(request):
    name, factory = request.param
    return name, factory(seed=0)


def _outputs(adapter) -> list[torch.Tensor]:
    """Both towers' embeddings (adapter runs only, no method); a fusion model's pair logits."""
    batch = adapter.tokenize(TEXTS)
    group = adapter.prepare_images(IMAGES[:1])[0]
    pixels = group.pixel_values
    if adapter.fusion:
        with adapter.explaining():
            return [adapter.score_table(group, batch).clone()]
    with adapter.explaining(), torch.no_grad():
        img = adapter.run_image(pixels).embeds.clone()
        txt = adapter.run_text(batch.input_ids, batch.attention_mask).embeds.clone()
    return [img, txt]


def _unsupported(method: str, adapter) -> str | None:
    meth = REGISTRY[method]()
    return meth.unsupported(adapter, meth.towers, meth.parse_options({}))


def _skip_unsupported(method: str, family_name: str, adapter):
    if _unsupported(method, adapter):
        with pytest.raises(cliplens.InputError):
            cliplens.explain(adapter, IMAGES, TEXTS, method=method)
        pytest.skip(f"{method} is documented as unsupported on {family_name}")


def _check_finite(x: np.ndarray | None, what: str) -> None:
    if x is None:
        return
    x = np.asarray(x, dtype=float)
    assert np.isfinite(x[~np.isnan(x)]).all(), f"{what} has infinite values"


@pytest.mark.parametrize("method", METHODS)
def test_shapes_and_finite(method, family):
    name, adapter = family
    _skip_unsupported(method, name, adapter)
    ex = cliplens.explain(adapter, IMAGES, TEXTS, method=method)
    meth = REGISTRY[method]
    B, P = len(IMAGES), len(TEXTS)
    assert ex.shape == (B, P)
    for key in ("logits", "probs", "target_values"):
        assert getattr(ex, key).shape == (B, P)
        assert np.isfinite(getattr(ex, key)).all()
    if "image" in meth.towers:
        # one array (B, P, Gh, Gw), or per image (P, Gh_b, Gw_b) when the grids differ
        assert len(ex.image_maps) == B
        ph, pw = adapter.patch_size
        for b in range(B):
            w, h = ex.geometries[b].input_size
            maps = np.asarray(ex.image_maps[b])
            assert maps.shape == (P, h // ph, w // pw)
            assert np.isfinite(maps).all()
    else:
        assert ex.image_maps is None
    if "text" in meth.towers and ex.token_scores is not None:
        assert ex.token_scores.shape[:2] == (B, P)
        valid = np.zeros(ex.token_scores.shape[1:], dtype=bool)
        for p, toks in enumerate(ex.tokens):
            valid[p, : len(toks)] = True
        assert np.isfinite(ex.token_scores[:, valid]).all()
        assert np.isnan(ex.token_scores[:, ~valid]).all()
    if "text" not in meth.towers:
        assert ex.token_scores is None
    for key, value in ex.extras.items():
        # one (B, ...) array, or per image when the images' grids differ (as image_maps)
        assert len(value) == B, key
        for v in value:
            _check_finite(v, f"extras[{key!r}]")
    if meth.complete:
        deltas = [k for k in ex.extras if k.startswith(("delta_", "text_delta_"))]
        assert deltas, "a complete method reports how far its parts' sum is from the whole"
        for key in deltas:
            assert np.nanmax(np.asarray(ex.extras[key])) < 1e-4, key


def test_capability_flags_are_what_explain_does():
    """The flags are not decoration: a method that requires what a tower lacks is refused by
    the template with its reason, and the families that lack it are the expected ones."""
    refused = {
        (method, name)
        for name, factory in EVERY_FAMILY
        for method in METHODS
        if _unsupported(method, factory(seed=0))
    }
    expected = {
        (m, f) for m in ("interactions", "grad_eclip") for f in ("hf-siglip", "hf-siglip2")
    }
    # BLIP's ITC mode: its text tower's blocks are post-norm (BERT), with no exact linear split;
    # these methods need one on both towers by default (towers=("image",) runs decomposition)
    expected |= {(m, "hf-blip-itc") for m in ("decomposition", "interactions", "grad_eclip")}
    # fusion models: chefer's bi-modal rules, raw attention and LAVIS's cross-attention Grad-CAM
    # (rollout has no cross-attention rule); the dual-encoder methods need separate towers
    expected |= {(m, "hf-blip-itm") for m in METHODS if m not in {"chefer", "raw_attention", "gradcam"}}
    # a single-stream fusion model (ViLT): rollout yes, cross-attention Grad-CAM no
    expected |= {(m, "hf-vilt-itm") for m in METHODS if m not in {"chefer", "raw_attention", "rollout"}}
    # BLIP-2: only its Q-Former's query tokens cross-attend (no text rows for Grad-CAM), and
    # rollout has no cross-attention rule
    expected |= {(m, "hf-blip2-itm") for m in METHODS if m not in {"chefer", "raw_attention"}}
    # BridgeTower: co-attention like BLIP's cross-attention (rollout has no cross-attention rule)
    expected |= {(m, "hf-bridgetower-itm") for m in METHODS if m not in {"chefer", "raw_attention", "gradcam"}}
    assert refused == expected


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_one_by_one(method, family):
    name, adapter = family
    _skip_unsupported(method, name, adapter)
    # relative tolerance of a map against its own scale, in float32. Products of two float32
    # Jacobians of unit vectors carry ~0.3% noise on the sharpened tiny models (batch and single
    # differ by padding width); in float64 that method matches its loop oracle to 1e-8
    # (tests/test_methods_interactions.py).
    rel = 1e-2 if method == "jacobian_interactions" else 1e-5
    ex = cliplens.explain(adapter, IMAGES, TEXTS, method=method)
    for b, img in enumerate(IMAGES):
        for p, text in enumerate(TEXTS):
            one = cliplens.explain(adapter, [img], [text], method=method)
            assert one.logits[0, 0] == pytest.approx(ex.logits[b, p], rel=1e-5, abs=1e-6)
            assert one.target_values[0, 0] == pytest.approx(ex.target_values[b, p], rel=1e-5, abs=1e-6)
            if ex.image_maps is not None:
                batched = np.asarray(ex.image_maps[b][p])
                scale = np.abs(batched).max() + 1e-12
                np.testing.assert_allclose(
                    np.asarray(one.image_maps[0][0]), batched, rtol=10 * rel, atol=rel * scale
                )
            if ex.token_scores is not None:
                t = len(one.tokens[0])
                scale = np.nanmax(np.abs(ex.token_scores[b, p])) + 1e-12
                np.testing.assert_allclose(
                    one.token_scores[0, 0, :t], ex.token_scores[b, p, :t], rtol=10 * rel, atol=rel * scale
                )


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method, family):
    name, adapter = family
    _skip_unsupported(method, name, adapter)
    a = cliplens.explain(adapter, IMAGES[:1], TEXTS[:2], method=method)
    b = cliplens.explain(adapter, IMAGES[:1], TEXTS[:2], method=method)
    for x, y in (
        (a.image_maps, b.image_maps),
        (a.token_scores, b.token_scores),
        (a.target_values, b.target_values),
    ):
        if x is not None:
            for xb, yb in zip(x, y):
                np.testing.assert_array_equal(xb, yb)
    assert a.extras.keys() == b.extras.keys()
    for key in a.extras:
        for xa, xb in zip(a.extras[key], b.extras[key]):
            np.testing.assert_array_equal(xa, xb)


@pytest.fixture
def prepared(family):
    """The family's model in train mode with mixed requires_grad flags (a user's model as it
    may come), its state and outputs; restored to that afterwards for the next test."""
    name, adapter = family
    model = adapter.model
    modes = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    before_out = _outputs(adapter)
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    try:
        yield name, adapter, model_state(model), before_out
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _unchanged(adapter, before_state, before_out):
    assert model_state(adapter.model) == before_state
    modes = {m: m.training for m in adapter.model.modules()}
    adapter.model.eval()
    after = _outputs(adapter)
    for m, mode in modes.items():
        m.training = mode
    for x, y in zip(before_out, after):
        assert torch.equal(x, y)  # bit-identical


@pytest.mark.parametrize("method", METHODS)
def test_model_unchanged_after_explain(method, prepared):
    name, adapter, before_state, before_out = prepared
    _skip_unsupported(method, name, adapter)
    cliplens.explain(adapter, IMAGES, TEXTS[:2], method=method)
    _unchanged(adapter, before_state, before_out)


def _last_image_block(adapter) -> torch.nn.Module:
    """The module whose output is the last captured image block output: found by running the
    tower once and matching tensors (no module paths in the tests). A fusion model's last image
    block, by the adapter contract."""
    if adapter.fusion:
        return adapter.blocks("image")[-1]
    pixels = adapter.prepare_images(IMAGES[:1])[0].pixel_values
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []  # references keep every output alive

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor):
            seen.append((module, out))

    handles = [m.register_forward_hook(hook) for m in adapter.model.modules()]
    try:
        with adapter.explaining(), torch.no_grad():
            run = adapter.run_image(pixels)
    finally:
        for h in handles:
            h.remove()
    return next(module for module, out in seen if out is run.block_outputs[-1])


@pytest.mark.parametrize("where", ["forward", "backward", "target"])
@pytest.mark.parametrize("method", METHODS)
def test_model_restored_after_injected_exception(method, where, prepared):
    name, adapter, before_state, before_out = prepared
    _skip_unsupported(method, name, adapter)
    handle = None
    target = "logit"
    if where == "target":

        class BadTarget(cliplens.Target):
            name = "bad"

            def __call__(self, ctx):
                raise Boom("target failed")

        target = BadTarget()
        expected: tuple[type[Exception], ...] = (
            Boom,
            cliplens.InputError,
        )  # a method may refuse the target first
    else:
        block = _last_image_block(adapter)
        if where == "forward":  # entering the block: a tower may stop inside it (the readout row)

            def enter(module, args):
                raise Boom("forward failed")

        else:

            def explode(grad):
                raise Boom("backward failed")

            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                if out.requires_grad:
                    out.register_hook(explode)

        if where == "forward":
            handle = block.register_forward_pre_hook(enter)
        else:
            handle = block.register_forward_hook(hook)
        before_state = {**before_state, "hooks": before_state["hooks"] + 1}
        expected = (Boom,)
    try:
        try:
            cliplens.explain(adapter, IMAGES[:1], TEXTS[:2], method=method, target=target)
            raised = False
        except expected:
            raised = True
        if where != "backward":  # methods without a backward pass finish normally there
            assert raised
        assert model_state(adapter.model) == before_state
    finally:
        if handle is not None:
            handle.remove()
    before_state = {**before_state, "hooks": before_state["hooks"] - (handle is not None)}
    _unchanged(adapter, before_state, before_out)


@pytest.fixture(scope="module")
def shapes_scenes(tmp_path_factory):
    from cliplens.worlds.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("contract") / "shapes", 1, seed=3, size=64)


def test_evaluate_runs_on_every_family(family, shapes_scenes):
    """``cliplens evaluate`` with its default metrics (sanity check included) on one item of each
    family; it once failed on SigLIP 2, whose image blocks the sanity check did not know."""
    from cliplens.eval import harness

    name, adapter = family
    res = harness.evaluate(adapter, ["chefer"], f"shapes:{shapes_scenes}", limit=1, sanity_items=1)
    row = next(r for r in res.rows if r["source"] == "chefer")
    assert row["n_pairs"] >= 1
    assert np.isfinite(row["sanity_change"])
