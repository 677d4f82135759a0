"""The result store: resume, refusal of a changed configuration, restart, shard files (one writer
each) merged by read_results, shards of different configurations refused; and an evaluation's
records written as two shards summarise to the same results as the run itself."""

from __future__ import annotations

import dataclasses
import json

import pytest

import test_eval_harness
from cliplens.errors import InputError
from cliplens.eval import harness
from cliplens.eval.config import EvalConfig
from cliplens.eval.store import ResultStore, read_results, shard_files
from cliplens.eval.summary import summarise
from cliplens.worlds.shapes import write_dataset

# the tiny CLIP and one torch thread of the harness tests (fixtures, reused rather than copied)
adapter = test_eval_harness.adapter
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster here

CONFIG = EvalConfig(
    model="m", model_checksum="1:2:3", methods=("chefer",), dataset="shapes:/data", prompt="a {}"
)


def _record(index: int, item_id: str | None = None) -> dict:
    return {"index": index, "id": item_id or f"item{index}", "skipped": "no labelled object"}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_keeps_finished_records(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    store.append(_record(0))
    store.append(_record(1))
    again = ResultStore(tmp_path, dataclasses.replace(CONFIG, limit=10, out="elsewhere"))  # run-only knobs
    assert sorted(again.records) == [0, 1] and again.records[1] == _record(1)
    again.append(_record(2))
    assert [r["index"] for r in _lines(tmp_path / "results.jsonl")] == [0, 1, 2]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {"digest": CONFIG.digest(), "config": CONFIG.to_dict()}
    memory = ResultStore(None, CONFIG)
    memory.append(_record(0))
    assert memory.records == {0: _record(0)} and memory.out is None


def test_changed_config_is_refused_and_restart_discards(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    store.append(_record(0))
    (tmp_path / "results.md").write_text("old report")
    with pytest.raises(InputError, match=r"different configuration \(changed: removal, seed\)") as e:
        ResultStore(tmp_path, dataclasses.replace(CONFIG, seed=1, removal="zero"))
    assert "\n" not in str(e.value)
    fresh = ResultStore(
        tmp_path, dataclasses.replace(CONFIG, seed=1), restart=True, derived=("results.md", "missing.png")
    )
    assert fresh.records == {} and not (tmp_path / "results.jsonl").exists()
    assert not (tmp_path / "results.md").exists()
    (tmp_path / "config.json").unlink()
    fresh.append(_record(0))
    with pytest.raises(InputError, match="results.jsonl without config.json"):
        ResultStore(tmp_path, CONFIG)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        ResultStore(tmp_path, CONFIG)


def test_corrupt_line_is_refused_and_an_unfinished_last_line_dropped(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    for i in range(3):
        store.append(_record(i))
    path = tmp_path / "results.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 5])  # the last write was cut off
    with pytest.warns(UserWarning, match="unfinished"):
        assert sorted(ResultStore(tmp_path, CONFIG).records) == [0, 1]
    assert len(path.read_text().splitlines()) == 2  # the file was repaired
    path.write_text("garbage\n" + path.read_text())
    with pytest.raises(InputError, match="line 1 is corrupt"):
        ResultStore(tmp_path, CONFIG)


def test_shards_write_their_own_files_and_merge(tmp_path):
    assert shard_files(None) == ("config.json", "results.jsonl")
    assert shard_files("2-of-4") == ("config.2-of-4.json", "results.2-of-4.jsonl")
    with pytest.raises(InputError, match="shard name"):
        shard_files("../x")
    a = ResultStore(tmp_path, CONFIG, shard="a")
    b = ResultStore(tmp_path, CONFIG, shard="b")
    for i in (0, 2, 4):
        a.append(_record(i))
    for i in (1, 3):
        b.append(_record(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.a.json",
        "config.b.json",
        "results.a.jsonl",
        "results.b.jsonl",
    ]
    assert sorted(ResultStore(tmp_path, CONFIG, shard="a").records) == [0, 2, 4]  # each shard resumes alone
    merged = read_results(tmp_path)
    assert [r["index"] for r in merged.records] == [0, 1, 2, 3, 4]
    assert merged.digest == CONFIG.digest() and merged.config == CONFIG.to_dict()
    assert merged.shards == ("a", "b")
    assert EvalConfig.from_dict(merged.config) == CONFIG

    # a shard of another configuration in the same folder: refused, with both digests named
    other = dataclasses.replace(CONFIG, steps=3)
    ResultStore(tmp_path, other, shard="c").append(_record(5))
    with pytest.raises(InputError, match="different configurations") as e:
        read_results(tmp_path)
    assert CONFIG.digest() in str(e.value) and other.digest() in str(e.value)
    ResultStore(tmp_path, CONFIG, shard="c", restart=True).append(_record(1, "not item1"))
    with pytest.raises(InputError, match="item 1 is 'item1' in one shard and 'not item1' in another"):
        read_results(tmp_path)
    with pytest.raises(InputError, match="no evaluation results"):
        read_results(tmp_path / "nothing")


def test_an_evaluation_split_into_shards_summarises_to_the_same_results(tmp_path, adapter):
    data = write_dataset(tmp_path / "scenes", 3, seed=11, size=64)
    whole = harness.evaluate(
        adapter,
        ["chefer"],
        f"shapes:{data}",
        out=tmp_path / "whole",
        metrics="pointing,perturbation",
        steps=2,
    )
    stored = read_results(tmp_path / "whole")
    assert stored.shards == (None,) and len(stored.records) == 3
    config = EvalConfig.from_dict(stored.config)
    assert config.digest() == stored.digest
    shards = {name: ResultStore(tmp_path / "sharded", config, shard=name) for name in ("even", "odd")}
    for rec in stored.records:
        shards["odd" if rec["index"] % 2 else "even"].append(rec)
    merged = read_results(tmp_path / "sharded")
    again = summarise(EvalConfig.from_dict(merged.config), merged.records)
    assert again.to_dict() == whole.to_dict()
