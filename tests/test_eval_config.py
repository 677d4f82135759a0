"""EvalConfig is the one source of the evaluation's defaults: the `cliplens evaluate` flags and
evaluate()'s keyword defaults are generated from / read off it; the stored record (to_dict,
digest) is the one written before the harness was split; bad values are one-line InputErrors."""

from __future__ import annotations

import dataclasses
import inspect
import shlex

import pytest

from cliplens.cli import build_parser, main
from cliplens.errors import InputError
from cliplens.eval import harness
from cliplens.eval.cli import command_line, config_from_args, flag_name
from cliplens.eval.config import ALL_METRICS, EvalConfig, cli_default, knobs


def _evaluate_args(*argv: str):
    return build_parser().parse_args(["evaluate", *argv])


def test_every_flag_default_is_the_configs_default():
    args = vars(_evaluate_args("--dataset", "shapes:x"))
    flagged = [f for f in knobs(flag=True)]
    # the parser has exactly one option per flagged knob, and no hand-written extras
    assert set(args) - {"command", "func"} == {f.name for f in flagged}
    differing = set()
    for f in flagged:
        if f.name == "dataset":
            continue  # required: given above
        assert args[f.name] == cli_default(f), f.name
        if cli_default(f) != f.default:
            differing.add(f.name)
    assert differing == {"out"}  # the command line writes files by default; Python keeps them in memory


def test_every_knob_has_help_and_the_knobs_without_flags_are_known():
    for f in dataclasses.fields(EvalConfig):
        assert f.metadata["help"].strip(), f.name
    assert {f.name for f in knobs(flag=False)} == {
        "model_checksum",
        "fractions",
        "blur_sigma",
        "version",
        "progress",
    }
    help_text = build_parser()._subparsers._group_actions[0].choices["evaluate"].format_help()
    for f in knobs(flag=True):
        assert flag_name(f) in help_text


def test_evaluate_keyword_defaults_are_the_configs():
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    params = inspect.signature(harness.evaluate).parameters
    checked = 0
    for name, param in params.items():
        if name in fields and param.default is not inspect.Parameter.empty:
            assert param.default == fields[name].default, name
            checked += 1
    # all but model (required), command and on_item (a callback): neither is a knob
    assert checked == len(params) - 3


def test_parsed_defaults_make_the_default_config():
    config = config_from_args(_evaluate_args("-d", "shapes:x"))
    assert config == EvalConfig(dataset="shapes:x", out="cliplens-eval")
    assert config.metrics == ALL_METRICS and config.methods is None and config.prompt is None


def test_echoed_command_line_parses_back_to_the_same_config():
    argv = ["-d", "shapes:/tmp/a b", "--methods", "chefer,rollout", "--metrics", "pointing,deletion"]
    argv += ["--steps", "3", "--seed", "5", "--pointing-tolerance", "2.5", "--prompt", "a {} here"]
    argv += ["--limit", "4", "--threads", "1", "--restart", "--out", "o"]
    args = _evaluate_args(*argv)
    echo = command_line(args)
    assert echo.startswith("cliplens evaluate --model shapes --methods chefer,rollout ")
    assert "--restart" not in echo  # rerunning the echo must not discard results
    again = _evaluate_args(*shlex.split(echo)[2:])
    assert config_from_args(again) == dataclasses.replace(config_from_args(args), restart=False)
    assert (
        command_line(_evaluate_args("-d", "x:y"))
        == "cliplens evaluate --model shapes --dataset x:y --out cliplens-eval"
    )


def test_values_are_normalised_on_construction():
    c = EvalConfig(methods="chefer, rollout", metrics=["sanity", "pointing", "sanity"], seed="3", steps=4.0)
    assert c.methods == ("chefer", "rollout") and c.metrics == ("pointing", "sanity")
    assert c.seed == 3 and isinstance(c.steps, int) and isinstance(c.pointing_tolerance, float)
    assert EvalConfig(templates=["a {}"], classes=["x"]).templates == ("a {}",)
    assert dataclasses.replace(c) == c  # normalising twice changes nothing


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"removal": "noise"}, "removal"),
        ({"target": "nope"}, "unknown evaluation target"),
        ({"steps": 0}, "steps"),
        ({"sanity_items": -1}, "sanity_items"),
        ({"metrics": "speed"}, "unknown metric"),
        ({"metrics": ""}, "no metrics"),
        ({"prompt": "no placeholder"}, "exactly one {}"),
        ({"limit": -1}, "limit"),
        ({"threads": 0}, "threads"),
        ({"seed": "x"}, "seed must be a number"),
    ],
)
def test_bad_values_are_one_line_input_errors(kwargs, fragment):
    with pytest.raises(InputError, match=fragment.replace("{", r"\{").replace("}", r"\}")) as e:
        EvalConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_cli_bad_value_is_one_line(capsys):
    code = main(["evaluate", "--dataset", "shapes:/nonexistent", "--steps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == "cliplens: error: steps must be at least 1"


#: config.json of a run written by the harness before it was split into config/runner/store/...
STORED_BEFORE_THE_SPLIT = {
    "digest": "df0728ad1671c921",
    "config": {
        "model": "tiny",
        "model_checksum": "1632225:452.5301508:32470.40092",
        "methods": ["chefer", "legrad"],
        "dataset": "shapes:/tmp/evalcheck/data",
        "target": "logit",
        "removal": "mean",
        "metrics": ["segmentation", "pointing", "pmiou", "perturbation", "deletion", "sanity"],
        "seed": 3,
        "steps": 3,
        "fractions": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "pointing_tolerance": 0.0,
        "sanity_items": 1,
        "prompt": "a {}",
        "templates": None,
        "classes": None,
        "blur_sigma": 5.0,
        "version": 1,
    },
}


def test_stored_record_and_digest_are_unchanged():
    stored = STORED_BEFORE_THE_SPLIT["config"]
    config = EvalConfig.from_dict(stored)
    # issue 20 added one stored knob (segmentation_protocol, after pointing_tolerance); a record
    # written before reads back with its default, and the digest changes with it (deliberate:
    # version 2 records score ImageNet-S ignore pixels and near-constant maps differently)
    # ... and ties (index order, the former behaviour), before fractions
    keys = list(stored)
    keys.insert(keys.index("pointing_tolerance") + 1, "segmentation_protocol")
    keys.insert(keys.index("fractions"), "perturbation_protocol")
    keys.insert(keys.index("fractions"), "ties")
    new = {"segmentation_protocol": "cliplens", "perturbation_protocol": "cliplens", "ties": "index"}
    want = {k: stored.get(k, new.get(k)) for k in keys}
    assert config.to_dict() == want and list(config.to_dict()) == keys  # same keys, same order
    assert config.digest() != STORED_BEFORE_THE_SPLIT["digest"]
    old = {k: v for k, v in config.to_dict().items() if k not in new}
    assert old == stored
    # run-only knobs are not part of the record: a larger limit extends the same results
    assert dataclasses.replace(config, limit=3, out="x", threads=1).digest() == config.digest()
    with pytest.raises(InputError, match="unknown keys: speed"):
        EvalConfig.from_dict({**stored, "speed": 1})


def test_dtype_is_stored_but_a_default_config_keeps_its_digest():
    stored = {k: v for k, v in STORED_BEFORE_THE_SPLIT["config"].items()}
    config = EvalConfig.from_dict(stored)
    assert config.dtype == "float32" and "dtype" not in config.to_dict()  # omitted at its default
    assert dataclasses.replace(config, dtype="float32").digest() == config.digest()
    half = dataclasses.replace(config, dtype="bfloat16")
    assert half.to_dict()["dtype"] == "bfloat16" and half.digest() != config.digest()
    assert EvalConfig.from_dict(half.to_dict()) == half
    import torch

    assert EvalConfig(dtype=torch.float16).dtype == "float16"
    with pytest.raises(InputError, match="dtype must be one of float32, bfloat16, float16"):
        EvalConfig(dtype="float64")


def test_cli_dtype_flag_is_generated_and_checked(capsys):
    assert config_from_args(_evaluate_args("-d", "shapes:x", "--dtype", "bfloat16")).dtype == "bfloat16"
    assert "--dtype bfloat16" in command_line(_evaluate_args("-d", "shapes:x", "--dtype", "bfloat16"))
    assert "--dtype" not in command_line(_evaluate_args("-d", "shapes:x"))
    code = main(["evaluate", "--dataset", "shapes:/nonexistent", "--dtype", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dtype must be one of float32, bfloat16, float16" in err[0]
