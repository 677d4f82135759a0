"""--dtype for `cliplens evaluate` and `cliplens demo`: bfloat16 weights on the shapes model give
finite numbers (maps and scores in float), the dtype is part of an evaluation's stored
configuration (a resumed run with another dtype is refused), and the flags are checked in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplens.cli import main
from cliplens.demo import run_demo
from cliplens.errors import InputError
from cliplens.eval import harness
from cliplens.worlds.shapes import write_dataset


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster here


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dtype") / "scenes", 2, seed=11, size=64)


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, float):
        yield value


def test_bfloat16_evaluate_is_finite_and_resume_with_another_dtype_is_refused(scenes, tmp_path):
    kwargs = {"metrics": "pointing,perturbation,deletion", "steps": 2, "out": tmp_path / "out"}
    half = harness.evaluate("shapes", ["chefer"], f"shapes:{scenes}", dtype="bfloat16", **kwargs)
    stored = json.loads((tmp_path / "out" / "config.json").read_text())
    assert stored["config"]["dtype"] == "bfloat16"
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    values = list(_numbers(records))
    assert len(records) == 2 and values and np.isfinite(values).all()
    assert half.to_dict()["config"]["dtype"] == "bfloat16"
    # the same dtype resumes (nothing to do); another one is refused, naming dtype
    harness.evaluate("shapes", ["chefer"], f"shapes:{scenes}", dtype="bfloat16", **kwargs)
    with pytest.raises(InputError, match=r"different configuration \(changed: .*dtype") as e:
        harness.evaluate("shapes", ["chefer"], f"shapes:{scenes}", **kwargs)
    assert "\n" not in str(e.value)
    full = harness.evaluate("shapes", ["chefer"], f"shapes:{scenes}", restart=True, **kwargs)
    assert "dtype" not in json.loads((tmp_path / "out" / "config.json").read_text())["config"]
    assert full.to_dict()["config"].get("dtype") is None


def test_bfloat16_demo_returns_float_maps(tmp_path):
    rows = run_demo(
        tmp_path / "demo", model="shapes", methods=["chefer", "legrad"], dtype="bfloat16", progress=False
    )
    # the embedded shapes BLIP joins with the chosen methods it runs, in bfloat16 as well
    assert [r.method for r in rows] == ["chefer", "legrad", "shapes-blip: chefer"]
    assert all(h in (True, False) for r in rows for h in r.hits[:-1])
    assert not any(on == "nothing" for r in rows for on in r.peak_on)  # "nothing": a map with no finite value
    assert (tmp_path / "demo" / "index.html").is_file()
    with pytest.raises(InputError, match="dtype must be"):
        run_demo(tmp_path / "bad", model="shapes", dtype="int8", progress=False)


def test_demo_cli_flags(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(["demo", "--out", str(out), "--methods", "chefer", "--device", "cpu", "--dtype", "bfloat16"])
        == 0
    )
    assert (out / "index.html").is_file()
    capsys.readouterr()
    for flag, value, fragment in (
        ("--dtype", "int8", "--dtype must be one of"),
        ("--device", "nope", "--device"),
    ):
        code = main(["demo", "--out", str(tmp_path / "bad"), "--methods", "chefer", flag, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / "bad").exists()


def test_every_command_checks_device_and_dtype_in_one_line(scenes, tmp_path, capsys):
    image = str(min((scenes / "images").iterdir()))
    out = str(tmp_path / "out")
    commands = {
        "evaluate": ["evaluate", "-d", f"shapes:{tmp_path / 'drawn'}", "--make-shapes", "2", "--out", out],
        "demo": ["demo", "--out", out],
        "explain-dataset": [
            "explain-dataset",
            "--model",
            "shapes",
            "--dataset",
            f"shapes:{scenes}",
            "-t",
            "a x",
        ]
        + ["--out", out],
    }
    commands["explain"] = ["explain", image, "-t", "a x", "--model", "shapes", "--out", out]
    for name, argv in commands.items():
        for flag, value, fragment in (
            ("--dtype", "int8", "dtype must be one of"),
            ("--device", "nope", "--device"),
        ):
            if name == "explain-dataset" and flag == "--device":
                continue  # checked by explain-dataset's own tests (it takes auto)
            code = main([*argv, flag, value])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and fragment in err[0], (name, flag, err)
            assert not (tmp_path / "out").exists() and not (tmp_path / "drawn").exists(), name
