"""The trainer of the shipped shapes model (scripts/train_shapes.py): its reduced-token image
forward, its patch labels and its loss against direct computations, and a few-step run that
writes a model `load_model` reads."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cliplens.worlds import shapes

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "src" / "cliplens" / "assets" / "shapes-clip"


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("train_shapes", ROOT / "scripts" / "train_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_clip(ts):
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(ts.build_config(32, 8, vision_width=32, layers=2)).double().eval()
    model.set_attn_implementation("eager")
    ts.reinit_vision_tower(model)  # resets in place, keeping float64
    return model


def test_vision_forward_with_every_token_is_clip_vision_model(ts, tiny_clip):
    px = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    want = tiny_clip.vision_model(pixel_values=px)
    last, pooled = ts.vision_forward(tiny_clip.vision_model, px)
    torch.testing.assert_close(last, want.last_hidden_state, rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=1e-12)


def test_vision_forward_hidden_states_are_clip_vision_models(ts, tiny_clip):
    """The per-block outputs that the earlier-block patch heads read are the ones
    `CLIPVisionModel` reports (entry 0: the encoder input; entry k: the output of block k)."""
    px = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = tiny_clip.vision_model(pixel_values=px, output_hidden_states=True)
    last, pooled, hidden = ts.vision_forward(tiny_clip.vision_model, px, with_hidden=True)
    assert len(hidden) == len(want.hidden_states) == 3
    for got, ref in zip(hidden, want.hidden_states):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(last, want.last_hidden_state, rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=1e-12)


def test_render_pool_draws_the_same_scenes_in_parallel(ts):
    serial = ts.render_pool(6, 64, 8, 5, np.random.default_rng(0))
    forked = ts.render_pool(6, 64, 8, 5, np.random.default_rng(0), workers=2)
    images, labels, grids, touched = forked
    for a, b in zip(serial, forked):
        assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b)
    # ... and they are the world's scenes of dataset seed 5, with the counts the rng drew.
    counts = np.random.default_rng(0).choice(4, size=6, p=ts.N_OBJECTS_P) + 1
    label_index = {label: i for i, label in enumerate(shapes.all_labels())}
    for i in range(6):
        scene = shapes.make_scene(shapes.scene_seed(5, i), n_objects=int(counts[i]), size=64)
        assert np.array_equal(images[i], np.asarray(scene.image))
        assert labels[i] == scene.labels
        assert np.array_equal(grids[i], ts.patch_labels(scene, 8, label_index))
        union = np.any([o.mask for o in scene.objects], axis=0)
        assert np.array_equal(touched[i], union.reshape(8, 8, 8, 8).any((1, 3)))


def test_release_steps_follow_the_draw_rate(ts):
    # scenes 10..39 in chunks of 8 (the last one 6), 4 scenes drawn per step
    assert ts.release_steps(10, 40, 8, 4.0) == [2, 4, 6, 8]
    assert ts.release_steps(10, 41, 10, 3.0) == [4, 7, 10, 11]
    assert ts.release_steps(40, 40, 8, 4.0) == []


def test_pool_drawer_draws_the_scenes_render_pool_draws(ts):
    rng = np.random.default_rng(0)
    want_images, want_labels, want_grids, want_touched = ts.render_pool(7, 64, 8, 5, np.random.default_rng(0))
    counts = ts.pool_counts(rng, 7)
    out = ts.pool_arrays(7, 64, 8, shared=True)
    labels = ts.draw_into(out, 0, 2, counts, 5, 64, 8, 64, workers=2)
    drawer = ts.PoolDrawer(out, 2, 7, 3, counts, 5, 64, 8, 64)
    first, second = drawer.next_chunk(), drawer.next_chunk()  # scenes 2-4, then 5-6
    drawer.close()
    assert len(first) == 3 and len(second) == 2
    assert labels + first + second == want_labels
    for got, want in zip(out, (want_images, want_grids, want_touched)):
        assert np.array_equal(got, want)


def test_vision_forward_keeps_the_chosen_tokens(ts, tiny_clip):
    """Positions are added before tokens are dropped, so the class token does not depend on
    the order of `keep`, each kept token's output follows it, and keeping every patch in any
    order gives the full forward pass."""
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    n = 16  # 4 x 4 grid
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(2)])
    tol = {"rtol": 0, "atol": 1e-6}  # eager attention takes its softmax in float32
    full_last, full_pooled = ts.vision_forward(tiny_clip.vision_model, px)
    last, pooled = ts.vision_forward(tiny_clip.vision_model, px, perm)
    torch.testing.assert_close(pooled, full_pooled, **tol)
    torch.testing.assert_close(last[:, 1:], full_last[:, 1:].gather(1, perm[..., None].expand(-1, -1, 32)), **tol)

    keep = perm[:, :6]
    sub_last, sub_pooled = ts.vision_forward(tiny_clip.vision_model, px, keep)
    shuffled = keep[:, torch.tensor([5, 3, 0, 1, 4, 2])]
    sub_last2, sub_pooled2 = ts.vision_forward(tiny_clip.vision_model, px, shuffled)
    torch.testing.assert_close(sub_pooled2, sub_pooled, **tol)
    assert sub_last.shape == (2, 7, 32)
    # Dropping tokens changes what the class token sees.
    assert (sub_pooled - full_pooled).abs().max() > 1e-3


def test_patch_labels_name_the_object_covering_each_patch(ts):
    label_index = {label: i for i, label in enumerate(shapes.all_labels())}
    for seed in range(5):
        scene = shapes.make_scene(seed, n_objects=3, size=64)
        got = ts.patch_labels(scene, 8, label_index)
        for r in range(8):
            for c in range(8):
                cover = [o.mask[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].mean() for o in scene.objects]
                best = int(np.argmax(cover))
                want = label_index[scene.objects[best].label] + 1 if cover[best] >= ts.PATCH_COVER else 0
                assert got[r, c] == want, (seed, r, c)


def test_multi_positive_loss_matches_its_definition(ts):
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 1.2, -0.7, 2.2]], dtype=torch.float64)
    pos = torch.tensor([[True, False, True, False], [False, True, False, False]])
    rows = []
    for s, p in zip(logits.tolist(), pos.tolist()):
        neg = sum(math.exp(v) for v, q in zip(s, p) if not q)
        per = [-math.log(math.exp(v) / (math.exp(v) + neg)) for v, q in zip(s, p) if q]
        rows.append(sum(per) / len(per))
    want = sum(rows) / len(rows)
    assert ts.multi_positive_loss(logits, pos).item() == pytest.approx(want, rel=1e-12)


def test_orthogonalise_keeps_the_singular_vectors_and_evens_out_the_singular_values(ts):
    """Newton-Schulz is an odd matrix polynomial, p(X) = U p(S) V^T for X = U S V^T: the
    singular vectors stay exactly, and five steps map every singular value of a
    Frobenius-normalised matrix into about [0.7, 1.2] (here spread over a factor of 100)."""
    g = torch.Generator().manual_seed(3)
    for rows, cols in ((4, 4), (6, 10)):
        u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64, generator=g))
        v, _ = torch.linalg.qr(torch.randn(cols, rows, dtype=torch.float64, generator=g))
        s = torch.logspace(0, -2, rows, dtype=torch.float64)
        x = u @ torch.diag(s) @ v.T
        o = ts.orthogonalise(torch.stack([x, 5 * x]))  # the scale of the input does not matter
        torch.testing.assert_close(o[1], o[0], rtol=0, atol=1e-6)  # up to the 1e-7 guard on the norm
        inner = u.T @ o[0] @ v  # diagonal: U and V are o's singular vectors
        torch.testing.assert_close(inner, torch.diag(torch.diagonal(inner)), rtol=0, atol=1e-12)
        d = torch.diagonal(inner)
        assert d.min() > 0.6 and d.max() < 1.25, d


def test_muon_step_is_nesterov_momentum_then_orthogonalised_and_scaled(ts):
    g = torch.Generator().manual_seed(4)
    wide = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64, generator=g))
    tall = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64, generator=g))
    start = [wide.detach().clone(), tall.detach().clone()]
    opt = ts.Muon([wide, tall], lr=0.1, momentum=0.9)
    grads = [[torch.randn(3, 5, dtype=torch.float64, generator=g), torch.randn(5, 3, dtype=torch.float64, generator=g)]
             for _ in range(2)]
    want = [p.clone() for p in start]
    buf = [torch.zeros_like(p) for p in start]
    for step_grads in grads:
        for i, (p, gr) in enumerate(zip((wide, tall), step_grads)):
            p.grad = gr.clone()
            buf[i] = 0.9 * buf[i] + gr
            update = gr + 0.9 * buf[i]
            if i == 0:
                want[i] = want[i] - 0.1 * ts.orthogonalise(update[None])[0]
            else:  # a tall matrix is orthogonalised as its transpose and scaled by sqrt(rows / cols)
                want[i] = want[i] - 0.1 * math.sqrt(5 / 3) * ts.orthogonalise(update.T[None])[0].T
        opt.step()
    torch.testing.assert_close(wide.detach(), want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(tall.detach(), want[1], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_a_few_training_steps_write_a_model_load_model_reads(ts, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET / name, out / name)
    monkeypatch.setattr(sys, "argv", ["train_shapes.py", "--out", str(out), "--mid-blocks", "2,5"])
    with pytest.raises(SystemExit):  # block 5 is the last one: its tokens already get the patch head
        ts.main()
    for bad in ("100", "32"):  # not a multiple of the 8-patch grid side; smaller than the input
        monkeypatch.setattr(sys, "argv", ["train_shapes.py", "--out", str(out), "--draw-size", bad])
        with pytest.raises(SystemExit):
            ts.main()
    argv = ["train_shapes.py", "--out", str(out), "--steps", "4", "--batch", "8", "--pool", "24",
            "--keep-patches", "20", "--full-tail", "0.5", "--warmup", "2", "--eval-every", "2", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    ts.main()

    info = json.loads((out / "training_info.json").read_text())
    assert info["args"]["steps"] == 4 and info["args"]["keep_patches"] == 20 and info["args"]["mid_blocks"] == "4"
    assert info["args"]["draw_size"] == 128
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    from cliplens import load_model

    adapter = load_model(str(out))
    assert adapter.patch_size in (8, (8, 8))
    # The token embedding is a plain dense one again ...
    assert adapter.model.text_model.embeddings.token_embedding.sparse is False
    # ... and the saved weights are the trained ones: the script seeds torch before building
    # the model, so the same seed rebuilds its initialisation.
    from transformers import CLIPModel

    torch.manual_seed(0)
    init = CLIPModel(ts.build_config(64, 8))
    ts.reinit_vision_tower(init)
    for name in ("visual_projection.weight", "text_projection.weight"):
        before = init.state_dict()[name].half().float()
        after = adapter.model.state_dict()[name].float()
        assert (after - before).abs().max() > 1e-3, name
    # A vocabulary row no caption uses keeps its initial value (sparse Adam leaves it alone).
    used = {i for ids in adapter.tokenizer(shapes.all_captions() + ["a red circle and a blue star"])["input_ids"]
            for i in ids}
    assert 1000 not in used
    emb = "text_model.embeddings.token_embedding.weight"
    torch.testing.assert_close(adapter.model.state_dict()[emb][1000].float(), init.state_dict()[emb][1000].half().float())


def test_a_growing_pool_run_is_reproducible_and_reads_back_from_the_cache(ts, tmp_path, monkeypatch):
    """Scenes drawn beside the training join the pool on fixed steps, so a run that draws them
    and one that reads them from the cache train the same weights."""
    weights = []
    for run in ("draws", "reads the cache"):
        out = tmp_path / run
        out.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ASSET / name, out / name)
        argv = ["train_shapes.py", "--out", str(out), "--steps", "8", "--batch", "8", "--pool", "40",
                "--pool-start", "16", "--pool-chunk", "8", "--draw-rate", "4", "--warmup", "2", "--eval-every", "8",
                "--draw-size", "64", "--threads", "2", "--cache-dir", str(tmp_path / "cache")]
        monkeypatch.setattr(sys, "argv", argv)
        ts.main()
        weights.append((out / "model.safetensors").read_bytes())
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert weights[0] == weights[1]
    # a pool that starts smaller than a batch is refused
    monkeypatch.setattr(sys, "argv", argv[:10] + ["4"] + argv[11:])
    with pytest.raises(SystemExit):
        ts.main()


def test_a_run_that_ends_before_the_pool_is_whole_stops_the_drawing(ts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET / name, out / name)
    # A drawing process that would take two minutes: the run must stop it, not wait for it.
    monkeypatch.setattr(ts, "_draw_chunks", lambda *args: time.sleep(120))
    monkeypatch.setattr(sys, "argv", ["train_shapes.py", "--out", str(out), "--steps", "3", "--batch", "8",
                                      "--pool", "20000", "--pool-start", "16", "--pool-chunk", "8", "--draw-rate",
                                      "1", "--warmup", "1", "--eval-every", "3", "--draw-size", "64", "--threads", "2"])
    t0 = time.time()
    ts.main()
    assert time.time() - t0 < 60
    assert "ended before the pool was whole (16 of 20000 scenes joined)" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
