"""``cliplens evaluate --parquet``: OUT/records.parquet holds the records of results.jsonl, one row
per (item, pair, source) with flat metric columns, read back with pyarrow and compared value by
value; without pyarrow the flag is a one-line error before anything runs."""

from __future__ import annotations

import json
import math
import sys

import pytest

from cliplens.cli import main
from cliplens.errors import InputError
from cliplens.eval import harness
from cliplens.eval.export import records_table
from cliplens.worlds.shapes import write_dataset

pq = pytest.importorskip("pyarrow.parquet")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster here


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("export") / "scenes", 3, seed=11, size=64)


def _same(a, b):
    if isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return a == b


def test_parquet_rows_are_the_jsonl_records(scenes, tmp_path):
    out = tmp_path / "out"
    harness.evaluate(
        "shapes", ["chefer", "rollout"], f"shapes:{scenes}", out=out, steps=2, sanity_items=1, parquet=True
    )
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    table = pq.read_table(out / "records.parquet")
    rows = table.to_pylist()
    expected = [
        (rec, p, pair, source, scores)
        for rec in records
        for p, pair in enumerate(rec.get("pairs", []))
        for source, scores in pair["scores"].items()
    ]
    assert len(rows) == len(expected) > 0
    assert {"chefer", "rollout", "random", "centre", "oracle"} == set(table.column("source").to_pylist())
    pa = pytest.importorskip("pyarrow")
    assert pa.types.is_list(table.schema.field("positive").type)
    assert table.schema.field("positive").type.value_type == pa.float64()
    assert table.schema.field("pointing").type == pa.float64()
    for row, (rec, p, pair, source, scores) in zip(rows, expected):
        assert (row["index"], row["id"], row["pair"], row["source"]) == (rec["index"], rec["id"], p, source)
        assert row["unique_inputs"] == rec["unique_inputs"]
        assert (row["label"], row["text"]) == (pair["label"], pair["text"])
        assert row["value"] == pytest.approx(pair["value"])
        for name, value in scores.items():
            assert _same(row[name], value), (name, row[name], value)
        for name in (
            set(row)
            - set(scores)
            - {"index", "id", "unique_inputs", "pair", "label", "text", "value", "source"}
        ):
            assert row[name] is None or name in pair  # a score this source lacks is null
    # a rerun without --parquet extends nothing here but drops the export, which could go stale
    harness.evaluate("shapes", ["chefer", "rollout"], f"shapes:{scenes}", out=out, steps=2, sanity_items=1)
    assert not (out / "records.parquet").exists()


def test_cli_parquet_flag_and_missing_pyarrow(scenes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    args = [
        "evaluate",
        "-d",
        f"shapes:{scenes}",
        "--methods",
        "chefer",
        "--metrics",
        "pointing",
        "--out",
        str(out),
    ]
    assert main([*args, "--parquet", "--limit", "2"]) == 0
    assert "records.parquet" in capsys.readouterr().out
    assert pq.read_table(out / "records.parquet").num_rows > 0
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    other = tmp_path / "none"
    assert main([*args[:-1], str(other), "--parquet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parquet needs pyarrow" in err[0]
    assert not other.exists()
    with pytest.raises(InputError, match="needs pyarrow"):
        records_table([])
    monkeypatch.undo()
    with pytest.raises(InputError, match="give out="):
        harness.evaluate("shapes", ["chefer"], f"shapes:{scenes}", parquet=True)
