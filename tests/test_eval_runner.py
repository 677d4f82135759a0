"""The runner is a function of (adapter, config, index, item): the same record every time, with
one runner or a fresh one, and the record the harness stores. And an evaluation gives the numbers
of tests/golden/eval-shapes.json, written by the harness before it was split into
config/runner/store/summary/report/cli (chefer and rollout, default metrics, 3 shapes scenes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import test_eval_harness
from cliplens.eval import harness
from cliplens.eval.config import EvalConfig
from cliplens.eval.datasets import open_dataset
from cliplens.eval.runner import ItemRunner, evaluate_item
from cliplens.worlds.shapes import write_dataset

# the tiny CLIP and one torch thread of the harness tests (fixtures, reused rather than copied)
adapter = test_eval_harness.adapter
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster here

GOLDEN = Path(__file__).resolve().parent / "golden" / "eval-shapes.json"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "shapes", 3, seed=11, size=64)


def _text(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def test_runner_gives_the_same_record_twice(adapter, scenes, tmp_path):
    spec = f"shapes:{scenes}"
    ds = open_dataset(spec)
    config = EvalConfig(methods="chefer,rollout", dataset=spec, steps=3, sanity_items=2).completed(
        adapter, ds
    )
    items = list(ds)
    runner = ItemRunner(adapter, config)
    first = [runner.evaluate_item(i, item) for i, item in enumerate(items[:2])]
    assert all("sanity" in sc for rec in first for p in rec["pairs"] for sc in p["scores"].values())
    again = [runner.evaluate_item(i, item) for i, item in enumerate(items[:2])]  # randomiser restored
    assert [_text(r) for r in again] == [_text(r) for r in first]
    assert _text(evaluate_item(adapter, config, 1, items[1])) == _text(first[1])  # a fresh runner
    # the harness stores exactly what the runner returns
    res = harness.evaluate(
        adapter, ["chefer", "rollout"], spec, out=tmp_path, steps=3, sanity_items=2, limit=2
    )
    stored = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [_text(r) for r in stored] == [_text(r) for r in first]
    assert res.config == config.to_dict()


def _assert_same(got, want, where: str = "") -> None:
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), where
        if math.isnan(want):
            assert math.isnan(got), where
        else:
            # float32 tiny model: allow BLAS rounding differences between machines
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for k, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{k}]")
    else:
        assert got == want, where


def test_evaluation_numbers_are_those_before_the_split(adapter, scenes):
    want = json.loads(GOLDEN.read_text())
    res = harness.evaluate(adapter, ["chefer", "rollout"], f"shapes:{scenes}")
    got = json.loads(json.dumps(res.to_dict()))  # tuples as lists, as in the file
    assert got["config"]["dataset"] == f"shapes:{scenes.resolve()}"
    got["config"]["dataset"] = "shapes:<DATA>"
    _assert_same(got, want)


def test_ignore_pixels_are_left_out_of_every_localisation_metric(adapter):
    """ImageNet-S marks unlabelled pixels (id 1000) as ``extra["ignore"]``: they are neither
    background nor the map's peak (issue 20: they used to count as background)."""
    import numpy as np
    from PIL import Image

    from cliplens.eval import metrics as M
    from cliplens.eval.runner import localisation_scores

    img = Image.new("RGB", (32, 32))
    geom = adapter.prepare_images([img], resize="model")[0].geometries[0]
    gh = gw = 32 // adapter.patch_size[0]
    grid = np.zeros((1, gh, gw))
    grid[0, 0, 0] = 5.0  # the peak sits in the top-left corner
    mask = np.zeros((32, 32), bool)
    mask[16:, 16:] = True
    ignore = np.zeros((32, 32), bool)
    ignore[:12, :12] = True  # the peak's region is unlabelled
    config = EvalConfig(methods="chefer", metrics="segmentation,pointing", pointing_tolerance=0)
    got = localisation_scores(config, {"m": grid}, ["x"], {"x": mask}, {}, geom, ignore=ignore)[("m", 0)]
    on_orig = geom.grid_to_original(grid[0])
    want = M.segmentation_counts(np.where(ignore, np.nan, on_orig), mask)
    assert got["seg"][1] == want.labeled == int((np.isfinite(on_orig) & ~ignore).sum())
    assert got["seg"][0] == want.correct
    without = localisation_scores(config, {"m": grid}, ["x"], {"x": mask}, {}, geom)[("m", 0)]
    assert without["seg"][1] == int(np.isfinite(on_orig).sum()) > got["seg"][1]
    # the peak inside the ignored region is not where the map points
    assert got["pointing"] == int(M.pointing_game(np.where(ignore, np.nan, on_orig), mask))
