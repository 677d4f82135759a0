"""explain-dataset: the Parquet records equal cliplens.explain on the same pairs, a killed job
resumes with every item exactly once, a changed job is refused, and the Ray engine (tests marked
``ray``, on a local cluster the test starts) gives the same records as the local one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import cliplens
from cliplens.cli import main
from cliplens.errors import InputError
from cliplens.scale import ScaleJob, explain_dataset, read_records

TEXTS = ("a red circle", "a blue square")
METHODS = ("chefer", "legrad")
N_ITEMS = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from cliplens.worlds.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("scale") / "world", N_ITEMS, seed=1, size=64)


@pytest.fixture(scope="module")
def job(world):
    return ScaleJob(model="shapes", dataset=f"shapes:{world}", texts=TEXTS, methods=METHODS)


@pytest.fixture(scope="module")
def local_records(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    explain_dataset(job, out, batch_size=2, device="cpu", progress=False)
    return read_records(out)


def _by_key(table) -> dict:
    rows = table.to_pylist()
    keyed = {(r["item_id"], r["method"], r["prompt_index"]): r for r in rows}
    assert len(keyed) == len(rows), "a record is written twice"
    return keyed


def test_local_records_equal_explain(job, world, local_records):
    from cliplens.eval.datasets import open_dataset

    items = list(open_dataset(job.dataset))
    rows = _by_key(local_records)
    assert len(rows) == N_ITEMS * len(TEXTS) * len(METHODS)
    assert set(local_records.schema.names) >= {"grid_map", "grid_h", "token_scores", "logit", "method"}
    adapter = cliplens.load_model("shapes")
    for method in METHODS:
        ex = cliplens.explain(adapter, [it.image for it in items], list(TEXTS), method=method)
        for b, it in enumerate(items):
            for p, text in enumerate(TEXTS):
                r = rows[(it.id, method, p)]
                assert r["prompt"] == text and r["item_index"] == b
                grid = np.reshape(np.asarray(r["grid_map"], np.float32), (r["grid_h"], r["grid_w"]))
                np.testing.assert_allclose(grid, ex.grid_map(b, p), rtol=1e-4, atol=1e-5)
                n = len(ex.tokens[p])
                assert r["tokens"] == list(ex.tokens[p])
                np.testing.assert_allclose(r["token_scores"], ex.token_scores[b, p, :n], rtol=1e-4, atol=1e-5)
                assert r["logit"] == pytest.approx(ex.logits[b, p], rel=1e-5, abs=1e-6)
                assert r["probability"] == pytest.approx(ex.probs[b, p], rel=1e-5, abs=1e-6)
                assert r["target"] == pytest.approx(ex.target_values[b, p], rel=1e-5, abs=1e-6)


def test_interrupted_job_resumes_with_every_item_once(job, local_records, tmp_path):
    out = tmp_path / "out"

    def die(done):
        if done >= 2:
            raise KeyboardInterrupt  # as a kill between parts

    with pytest.raises(KeyboardInterrupt):
        explain_dataset(job, out, batch_size=2, device="cpu", progress=False, on_part=die)
    assert len(read_records(out)) == 2 * len(TEXTS) * len(METHODS)
    # a kill after the renames but before the commit marker leaves an uncommitted file behind
    orphan = out / "data" / "method=chefer" / "part-000009.parquet"
    orphan.write_bytes((out / "data" / "method=chefer" / "part-000000.parquet").read_bytes())
    (out / "data" / "method=legrad" / ".part-000010.parquet.tmp").write_bytes(b"half")
    summary = explain_dataset(job, out, batch_size=2, device="cpu", progress=False)
    assert not orphan.exists()
    assert (summary.items_new, summary.items_done) == (N_ITEMS - 2, N_ITEMS)
    again = _by_key(read_records(out))
    assert again.keys() == _by_key(local_records).keys()
    # a third run has nothing left to do
    assert explain_dataset(job, out, batch_size=2, device="cpu", progress=False).items_new == 0
    assert len(read_records(out)) == len(local_records)


def test_changed_job_is_refused_unless_restart(job, tmp_path):
    out = tmp_path / "out"
    small = ScaleJob(model="shapes", dataset=job.dataset, texts=TEXTS[:1], methods=("chefer",), limit=1)
    explain_dataset(small, out, device="cpu", progress=False)
    other = ScaleJob(model="shapes", dataset=job.dataset, texts=TEXTS, methods=("chefer",), limit=1)
    with pytest.raises(InputError, match="changed: texts"):
        explain_dataset(other, out, device="cpu", progress=False)
    explain_dataset(other, out, device="cpu", progress=False, restart=True)
    assert len(read_records(out)) == len(TEXTS)


def test_a_second_run_on_the_folder_is_refused_before_touching_it(job, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".explain-dataset.lock").write_text("1")  # a live process (pid 1) holds the folder
    uncommitted = out / "data" / "method=chefer" / "part-000003.parquet"
    uncommitted.parent.mkdir(parents=True)
    uncommitted.write_bytes(b"being written")
    (out / "_job.json").write_text(json.dumps({"digest": job.digest(), "job": job.to_dict()}))
    with pytest.raises(InputError, match="another cliplens run"):
        explain_dataset(job, out, device="cpu", progress=False)
    assert uncommitted.exists()  # the other run's files are left alone


def test_cli_plain_folder_and_one_line_errors(world, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    args = [
        "explain-dataset",
        "--model",
        "shapes",
        "--dataset",
        str(world / "images"),
        "--texts-file",
        str(labels),
    ]
    assert main([*args, "--methods", "chefer,nope", "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not out.exists()  # refused before the folder (or a model) was touched
    assert main([*args, "--methods", "rollout", "--out", str(out), "--limit", "2", "--device", "cpu"]) == 0
    table = read_records(out)
    assert table.num_rows == 4 and set(table.column("method").to_pylist()) == {"rollout"}
    assert all(i.endswith(".png") for i in table.column("item_id").to_pylist())


def test_core_import_needs_neither_ray_nor_pyarrow():
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import cliplens, cliplens.cli
        cliplens.cli.build_parser()
        cliplens.explain("shapes", np.zeros((32, 32, 3), np.uint8), ["a red circle"])
        print(json.dumps(sorted(m for m in ("ray", "pyarrow") if m in sys.modules)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_gives_the_local_records(ray_cluster, job, local_records, tmp_path):
    out = tmp_path / "out"
    summary = explain_dataset(job, out, engine="ray", batch_size=2, device="cpu", workers=2, progress=False)
    assert summary.items_done == N_ITEMS
    ray_rows, local_rows = _by_key(read_records(out)), _by_key(local_records)
    assert ray_rows.keys() == local_rows.keys()
    for key, r in ray_rows.items():
        l = local_rows[key]
        assert (r["item_index"], r["prompt"], r["tokens"], r["grid_h"], r["grid_w"]) == (
            l["item_index"],
            l["prompt"],
            l["tokens"],
            l["grid_h"],
            l["grid_w"],
        )
        np.testing.assert_allclose(r["grid_map"], l["grid_map"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["token_scores"], l["token_scores"], rtol=1e-4, atol=1e-5)
        for k in ("logit", "probability", "target"):
            assert r[k] == pytest.approx(l[k], rel=1e-5, abs=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_survives_a_killed_worker(ray_cluster, world, tmp_path):
    # a plain folder: the items travel to the actors as paths (the KIND:PATH test above sends PNG bytes)
    job = ScaleJob(model="shapes", dataset=str(world / "images"), texts=TEXTS, methods=METHODS)
    out, marker = tmp_path / "out", tmp_path / "killed"
    summary = explain_dataset(
        job,
        out,
        engine="ray",
        batch_size=1,
        device="cpu",
        workers=2,
        progress=False,
        _kill_worker_once=str(marker),
    )
    assert marker.exists(), "no worker was killed"
    assert summary.items_done == N_ITEMS
    rows = _by_key(read_records(out))  # every record exactly once
    assert len(rows) == N_ITEMS * len(TEXTS) * len(METHODS)


def test_dtype_bfloat16_writes_float32_maps(job, local_records, tmp_path):
    small = ScaleJob(
        model="shapes", dataset=job.dataset, texts=TEXTS, methods=("chefer",), dtype="bfloat16", limit=2
    )
    explain_dataset(small, tmp_path / "out", device="cpu", progress=False)
    table = read_records(tmp_path / "out")
    assert table.schema.field("grid_map").type.value_type == "float"
    ref = _by_key(local_records)
    for key, r in _by_key(table).items():
        assert np.isfinite(r["grid_map"]).all()
        assert r["logit"] == pytest.approx(ref[key]["logit"], abs=0.5)  # bfloat16 weights: close, not equal
