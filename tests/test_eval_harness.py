"""The evaluation harness: perturbation at the model input on a model whose answer is known,
baselines through the metric code, the zero-shot classifier target against a hand computation,
the sanity check's randomisation, resuming after an interruption, and the CLI end to end."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cliplens.errors import InputError
from cliplens.eval import harness
from cliplens.eval.classifier import ZeroShotClassifier, resolve_templates
from cliplens.eval.metrics import deletion_curve, perturbation_curve, random_map
from cliplens.eval.perturbation import CurveBatch, PromptScorer, mask_to_grid, target_scores
from cliplens.eval.report import Column, Panel, line_chart, text_table
from cliplens.eval.sanity import CascadingRandomization, image_blocks
from cliplens.eval.templates import IMAGENET_TEMPLATES
from cliplens.images import Geometry
from cliplens.targets import PairLogit, Target
from cliplens.worlds.shapes import write_dataset
from conftest import clip_tokenizer, make_tiny_clip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster here


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "shapes", 5, seed=11, size=64)


@pytest.fixture(scope="module")
def adapter():
    from cliplens.adapters import HFClipAdapter

    return HFClipAdapter(make_tiny_clip(), clip_tokenizer(), name="tiny")


# ----------------------------------------------------------------------------- perturbation


class RegionStub:
    """A 'model' whose embedding is (fraction of the region's pixels still non-zero, 1): with
    ``zero`` removal the target below is exactly the fraction of the region left."""

    pair_probability = "softmax"
    fusion = False

    def __init__(self, region: np.ndarray):
        self.region = torch.from_numpy(region)
        self.calls = 0

    def explaining(self):
        return contextlib.nullcontext()

    def embedding_reads(self, tower: str):
        return None  # nothing to keep: run_image ignores it

    def run_image(self, pixels: torch.Tensor, *, reads=None):
        self.calls += 1
        kept = (pixels[:, 0][:, self.region] != 0).double().mean(dim=1)
        return SimpleNamespace(embeds=torch.stack([kept, torch.ones_like(kept)], dim=1))

    def logit_scale(self):
        return torch.tensor(1.0)

    def logit_bias(self):
        return None


class FirstCoordinate(Target):
    name = "first"

    def __call__(self, ctx):
        return ctx.img[..., 0]


def test_perturbation_known_answer_region_first_is_lowest():
    # 8x8 input, 2x2 patches -> 4x4 grid; the region is the top-left 2x2 patches (4 of 16)
    grid_region = np.zeros((4, 4), bool)
    grid_region[:2, :2] = True
    region = np.repeat(np.repeat(grid_region, 2, 0), 2, 1)
    stub = RegionStub(region)
    pixels = torch.ones(3, 8, 8)
    maps = {
        "region": grid_region.astype(float) + 0.01 * np.arange(16).reshape(4, 4),
        "random": random_map((4, 4), seed=3),
        "anti": (~grid_region).astype(float),
    }
    batch = CurveBatch(pixels, (2, 2), "zero")
    for name, m in maps.items():
        for order in ("positive", "negative"):
            batch.add((name, order), perturbation_curve, m, 0, order=order)
        batch.add((name, "deletion"), deletion_curve, m, 0, n_steps=4)
    curves = batch.run(PromptScorer(stub, FirstCoordinate(), text_embeds=torch.zeros(1, 2)))
    assert stub.calls == 1  # every step of every curve in one forward
    assert len(batch.masks) < sum(len(r.steps) for r in batch.requests)  # shared inputs run once

    # removed counts floor(f * 16) for f = 0, .1, ..., .9: 0 1 3 4 6 8 9 11 12 14
    np.testing.assert_allclose(curves["region", "positive"].scores, [1, 0.75, 0.25, 0, 0, 0, 0, 0, 0, 0])
    # negative: the 12 other patches go first; at 14 removed, 2 of the 4 region patches are gone
    np.testing.assert_allclose(curves["region", "negative"].scores, [1] * 9 + [0.5])
    np.testing.assert_allclose(curves["region", "deletion"].scores, [1, 0, 0, 0, 0])
    np.testing.assert_allclose(curves["anti", "deletion"].scores, [1, 1, 1, 1, 0])
    pos = {k: curves[k, "positive"].auc for k in maps}
    neg = {k: curves[k, "negative"].auc for k in maps}
    assert pos["region"] < pos["random"] < pos["anti"]
    assert neg["region"] > neg["random"] > neg["anti"]
    assert curves["region", "deletion"].auc < curves["anti", "deletion"].auc


def test_removal_modes_fill_only_the_removed_patches():
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.normal(size=(3, 8, 8))).float()
    for mode in ("mean", "blur", "zero"):
        batch = CurveBatch(pixels, (4, 4), mode)
        mask = np.array([[True, False], [False, False]])
        batch._index(mask)
        out = batch.perturbed_inputs()[0]
        torch.testing.assert_close(out[:, 4:, :], pixels[:, 4:, :])
        torch.testing.assert_close(out[:, :4, 4:], pixels[:, :4, 4:])
        assert not torch.allclose(out[:, :4, :4], pixels[:, :4, :4])
        if mode == "zero":
            assert float(out[:, :4, :4].abs().max()) == 0.0
        if mode == "mean":
            torch.testing.assert_close(out[:, 0, 0], pixels.double().mean(dim=(1, 2)).float())
    with pytest.raises(ValueError):
        CurveBatch(pixels, (4, 4), "noise")


def test_mask_to_grid_follows_resize_and_crop():
    # a 40x20 (w x h) original resized by 0.8 to 32x16, then the centre 16x16 crop (left 8)
    geom = Geometry(40, 20, 0.8, 0.8, (8.0, 0.0), (16, 16))
    mask = np.zeros((20, 40), bool)
    mask[:, 10:20] = True  # original columns 10..19 -> input columns 0..7 (the left half)
    grid = mask_to_grid(mask, geom, (2, 2))
    np.testing.assert_allclose(grid, [[1.0, 0.0], [1.0, 0.0]])
    # identity geometry: exact patch coverage fractions
    ident = Geometry(8, 8, 1.0, 1.0, (0.0, 0.0), (8, 8))
    m = np.zeros((8, 8), bool)
    m[:2, :4] = True
    np.testing.assert_allclose(mask_to_grid(m, ident, (2, 2)), [[0.5, 0.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------- classifier


def _text_features(model, tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer(text, return_tensors="pt")
    out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return getattr(out, "pooler_output", out)[0].double()


def test_classifier_target_is_the_mean_template_zero_shot_probability(adapter):
    from cliplens import explain

    classes = ["red circle", "blue square", "green star"]
    templates = ["a {}", "a photo of a {}.", "the {} in a video game."]
    clf = ZeroShotClassifier.build(adapter, classes, templates)
    model, tok = adapter.model, adapter.tokenizer
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    with torch.no_grad():
        weights = []
        for c in classes:
            e = torch.stack([_text_features(model, tok, t.format(c)) for t in templates])
            e = e / e.norm(dim=-1, keepdim=True)
            mean = e.mean(0)
            weights.append(mean / mean.norm())
        W = torch.stack(weights)
        pixels = adapter.prepare_images([image])[0].pixel_values
        img = model.get_image_features(pixel_values=pixels)
        img = getattr(img, "pooler_output", img)[0].double()
        logits = model.logit_scale.exp().double() * (img / img.norm()) @ W.T
        probs = logits.softmax(-1)

    torch.testing.assert_close(clf.embeddings.double(), W, atol=1e-6, rtol=1e-5)
    explained = ["blue square", "red circle"]
    ex = explain(
        adapter, [image], explained, method="chefer", target=clf.target(explained), towers=("image",)
    )
    np.testing.assert_allclose(ex.target_values[0], probs[[1, 0]].numpy(), rtol=1e-5, atol=1e-7)
    assert ex.image_maps is not None and np.isfinite(ex.image_maps).all()
    # "why c rather than c'": the logit difference
    con = explain(
        adapter,
        [image],
        explained,
        method="chefer",
        target=clf.contrast(explained, ["green star", "blue square"]),
        towers=("image",),
    )
    want = [logits[1] - logits[2], logits[0] - logits[1]]
    np.testing.assert_allclose(con.target_values[0], [float(w) for w in want], rtol=1e-5, atol=1e-6)
    # the perturbation scorer evaluates the very same expression on unperturbed input
    from cliplens.eval.classifier import encode_images, encode_texts

    scores = target_scores(
        adapter, encode_images(adapter, pixels), encode_texts(adapter, explained), clf.target(explained)
    )
    np.testing.assert_allclose(scores[0], ex.target_values[0], rtol=1e-5, atol=1e-7)
    # a text tower asked for anyway gets an all-zero gradient rather than an error
    both = explain(adapter, [image], explained, method="chefer", target=clf.target(explained))
    np.testing.assert_allclose(both.grid_map(0, 0), ex.grid_map(0, 0), rtol=1e-5, atol=1e-7)


def test_pair_scorer_matches_explained_logit(adapter):
    from cliplens import explain
    from cliplens.eval.classifier import encode_images, encode_texts

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    texts = ["a red circle", "a blue star"]
    ex = explain(adapter, [image], texts, method="chefer")
    pixels = adapter.prepare_images([image])[0].pixel_values
    got = target_scores(adapter, encode_images(adapter, pixels), encode_texts(adapter, texts), PairLogit())
    np.testing.assert_allclose(got[0], ex.target_values[0], rtol=1e-5, atol=1e-6)


def test_templates_are_clips_eighty():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert resolve_templates(None) == IMAGENET_TEMPLATES
    assert resolve_templates("a {} shape") == ("a {} shape",)
    with pytest.raises(InputError):
        resolve_templates(["no placeholder"])
    with pytest.raises(InputError):
        resolve_templates("unknown-set")


# ----------------------------------------------------------------------------- sanity check


def test_cascading_randomisation_top_down_and_restored(adapter):
    model = adapter.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = CascadingRandomization(adapter, seed=0)
    blocks = image_blocks(rand.adapter)
    trained = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    L = len(blocks)
    seen = []
    for d, rand_adapter in rand.depths():
        changed = [
            not all(torch.equal(v, b.state_dict()[k]) for k, v in t.items()) for b, t in zip(blocks, trained)
        ]
        assert changed == [False] * (L - d) + [True] * d  # exactly the top d blocks
        assert rand_adapter.model is not model
        seen.append(d)
    assert seen == list(range(1, L + 1))
    for b, t in zip(blocks, trained):  # the copy is restored after the iteration
        for k, v in t.items():
            assert torch.equal(v, b.state_dict()[k])
    for k, v in model.state_dict().items():  # the original was never touched
        assert torch.equal(v, before[k])
    # also restored when the consumer stops with an exception
    with pytest.raises(RuntimeError):
        for d, _ in rand.depths():
            if d == 2:
                raise RuntimeError("stop")
    for b, t in zip(blocks, trained):
        for k, v in t.items():
            assert torch.equal(v, b.state_dict()[k])


# ----------------------------------------------------------------------------- harness


def _rows(results):
    return {r["source"]: r for r in results.rows}


def test_baselines_on_shapes_oracle_beats_random(adapter, shapes_dir):
    res = harness.evaluate(
        adapter, ["chefer"], f"shapes:{shapes_dir}", metrics="segmentation,pointing,sanity", sanity_items=2
    )
    rows = _rows(res)
    assert list(rows) == ["chefer", "random", "centre", "oracle"]
    oracle, rnd = rows["oracle"], rows["random"]
    for key in ("pointing", "pointing_class_mean", "miou", "pixel_accuracy", "map", "fg_ap"):
        assert oracle[key] == pytest.approx(1.0)
        assert oracle[key] > rnd[key]
    # a random map ranks pixels at chance: its AP is about the foreground share
    lines = [json.loads(x) for x in (shapes_dir / "index.jsonl").read_text().splitlines()]
    fg = np.mean([o["area"] / (rec["width"] * rec["height"]) for rec in lines for o in rec["objects"]])
    assert abs(rnd["fg_ap"] - fg) < 0.12  # the foreground AP (renamed from "map": issue 20)
    assert 0.3 < rnd["pixel_accuracy"] < 0.7
    # baselines ignore the model: the sanity check sees no change; the method's map changes
    assert rows["random"]["sanity_change"] == pytest.approx(0.0)
    assert rows["chefer"]["sanity_change"] > 0.2
    assert res.best()["miou"] == "chefer"  # best() ranks methods only


def test_resume_after_interruption_gives_the_same_table(adapter, shapes_dir, tmp_path, monkeypatch):
    kwargs = {"limit": 4, "steps": 4, "sanity_items": 1, "seed": 7}
    spec = f"shapes:{shapes_dir}"
    fresh = harness.evaluate(adapter, ["chefer"], spec, out=tmp_path / "fresh", **kwargs)

    calls = []
    original = harness._Runner.evaluate_item

    def flaky(self, index, item):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(index)
        return original(self, index, item)

    out = tmp_path / "resumed"
    monkeypatch.setattr(harness._Runner, "evaluate_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(adapter, ["chefer"], spec, out=out, **kwargs)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert not (out / "results.md").exists()

    calls.clear()
    monkeypatch.setattr(
        harness._Runner, "evaluate_item", lambda self, i, it: calls.append(i) or original(self, i, it)
    )
    resumed = harness.evaluate(adapter, ["chefer"], spec, out=out, **kwargs)
    assert calls == [2, 3]  # finished items are skipped
    assert resumed.csv() == fresh.csv()
    assert resumed.table() == fresh.table()
    assert (out / "results.csv").read_text() == (tmp_path / "fresh" / "results.csv").read_text()

    # an unfinished last line (killed while writing) is dropped and that item redone
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    calls.clear()
    with pytest.warns(UserWarning, match="unfinished"):
        again = harness.evaluate(adapter, ["chefer"], spec, out=out, **kwargs)
    assert calls == [3] and again.csv() == fresh.csv()

    # a changed configuration is refused, with what changed; restart starts fresh
    with pytest.raises(InputError, match="removal"):
        harness.evaluate(adapter, ["chefer"], spec, out=out, removal="zero", **kwargs)
    calls.clear()
    harness.evaluate(adapter, ["chefer"], spec, out=out, removal="zero", restart=True, **kwargs)
    assert calls == [0, 1, 2, 3]


def test_class_target_on_shapes(adapter, shapes_dir):
    res = harness.evaluate(
        adapter,
        ["chefer"],
        f"shapes:{shapes_dir}",
        limit=2,
        target="class-contrast",
        templates=["a {}"],
        metrics="perturbation,pointing",
        steps=2,
    )
    assert res.config["classes"][0] == "red circle" and len(res.config["classes"]) == 30
    assert res.accuracy is not None
    assert np.isfinite(res.row("chefer")["positive_auc"])
    with pytest.raises(InputError, match="class names"):
        harness.evaluate(adapter, ["chefer"], f"shapes:{shapes_dir}", target="class", classes=[])


def test_point_labels_give_p_miou_and_no_oracle(adapter, tmp_path):
    from test_eval_datasets import _write_openimages

    _write_openimages(tmp_path / "oi")
    res = harness.evaluate(
        adapter, ["chefer"], f"openimages-points:{tmp_path / 'oi'}", metrics="pmiou,perturbation"
    )
    rows = _rows(res)
    assert list(rows) == ["chefer", "random", "centre"]  # no masks, no oracle
    assert all(0.0 <= r["pmiou"] <= 1.0 for r in rows.values())
    assert "miou" not in rows["chefer"] and np.isfinite(rows["chefer"]["positive_auc"])
    assert res.config["prompt"] == "a photo of a {}."


def test_a_method_that_refuses_the_target_is_reported_not_fatal(adapter, shapes_dir, monkeypatch):
    from cliplens.methods import REGISTRY, Method

    class Refuses(Method):
        name = "_refuses"
        towers = ("image",)

        def compute(self, *args, **kwargs):
            raise InputError("this method cannot explain that target")

    monkeypatch.setitem(REGISTRY, "_refuses", Refuses)
    res = harness.evaluate(
        adapter,
        ["chefer", "_refuses"],
        f"shapes:{shapes_dir}",
        limit=2,
        metrics="pointing,sanity",
        sanity_items=1,
    )
    assert res.row("_refuses")["n_pairs"] == 0 and res.row("chefer")["n_pairs"] > 0
    assert res.refused["_refuses"] == {"items": 2, "reason": "this method cannot explain that target"}
    assert "`_refuses` did not explain 2 item(s)" in res.report_markdown()


def test_bad_arguments_are_input_errors(adapter, shapes_dir):
    spec = f"shapes:{shapes_dir}"
    with pytest.raises(InputError, match="unknown method"):
        harness.evaluate(adapter, ["nope"], spec)
    with pytest.raises(InputError, match="baseline"):
        harness.evaluate(adapter, ["random"], spec)
    with pytest.raises(InputError, match="metric"):
        harness.evaluate(adapter, ["chefer"], spec, metrics="speed")
    with pytest.raises(InputError, match="removal"):
        harness.evaluate(adapter, ["chefer"], spec, removal="noise")


def test_report_table_and_chart(tmp_path):
    cols = [Column("source", "source"), Column("x", "x", better="up")]
    table = text_table(cols, [{"source": "a", "x": 0.5}, {"source": "long-name", "x": float("nan")}])
    lines = table.splitlines()
    assert lines[0].startswith("source") and "x ↑" in lines[0]
    assert len({len(line) for line in lines[:2]}) == 1 and lines[3].endswith("–")
    img = line_chart(
        [Panel("p", "x", "y", {"m": ([0, 1], [0, 1]), "random": ([0, 1], [1, 0])})],
        tmp_path / "c.png",
        dashed=["random"],
    )
    assert Image.open(tmp_path / "c.png").size == img.size and img.width > 400


# ----------------------------------------------------------------------------- command line


def _run(capsys, *argv):
    from cliplens.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_evaluate_end_to_end(tmp_path, capsys, tiny_checkpoint):
    data = tmp_path / "scenes"
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--methods",
        "chefer",
        "--dataset",
        f"shapes:{data}",
        "--make-shapes",
        "3",
        "--out",
        str(out),
        "--steps",
        "2",
        "--sanity-items",
        "1",
    ]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    assert (data / "dataset.json").is_file()
    assert "pointing" in stdout and "oracle" in stdout
    for name in ("results.md", "results.csv", "results.jsonl", "summary.json", "config.json"):
        assert (out / name).is_file(), name
    for name in ("perturbation.png", "deletion_insertion.png", "sanity.png"):
        assert Image.open(out / name).format == "PNG"
    md = (out / "results.md").read_text()
    assert "cliplens evaluate --model" in md and "| chefer |" in md
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["source", "kind", "n_pairs"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    csv_before = (out / "results.csv").read_text()
    code, stdout, err = _run(capsys, *argv)  # rerun: everything is resumed, same numbers
    assert code == 0, err
    assert (out / "results.csv").read_text() == csv_before
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "dataset, fragment",
    [
        ("nonsense", "KIND:PATH"),
        ("pascal:/tmp/x", "unknown dataset kind"),
        ("shapes:/nonexistent/cliplens-shapes", "--make-shapes"),
    ],
)
def test_cli_bad_dataset_is_one_line(capsys, dataset, fragment):
    code, _, err = _run(capsys, "evaluate", "--model", "/nonexistent/model", "--dataset", dataset)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("cliplens: error: "), err
    assert fragment in lines[0]


def test_cli_bad_method_is_one_line(capsys, shapes_dir):
    code, _, err = _run(capsys, "evaluate", "--dataset", f"shapes:{shapes_dir}", "--methods", "chefer,nope")
    assert code == 2 and "unknown method 'nope'" in err and len(err.strip().splitlines()) == 1


def test_on_item_reports_each_item_and_can_stop_the_run(adapter, shapes_dir, tmp_path):
    """``on_item(done, total, partial)`` after every item; ``partial()`` summarises the items so
    far; an exception it raises stops the run between items and the store keeps those items."""
    spec = f"shapes:{shapes_dir}"
    calls = []

    def record(done, total, partial):
        calls.append((done, total, partial().n_items))

    res = harness.evaluate(adapter, ["chefer"], spec, limit=3, metrics="pointing", on_item=record)
    assert calls == [(1, 3, 1), (2, 3, 2), (3, 3, 3)] and res.n_items == 3

    class Stop(Exception):
        pass

    def stop_after_two(done, total, partial):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        harness.evaluate(
            adapter, ["chefer"], spec, limit=4, metrics="pointing", out=tmp_path, on_item=stop_after_two
        )
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len([ln for ln in lines if ln.strip()]) >= 2
