"""``cliplens evaluate``: the command line of :func:`cliplens.eval.harness.evaluate`.

Every flag is generated from a field of :class:`~cliplens.eval.config.EvalConfig` (name, default,
help, choices), so the command line and the Python API cannot disagree on a default. The
command line that ran is echoed into ``results.md`` (the flags that differ from their defaults).
:mod:`cliplens.cli` only mounts :func:`add_evaluate_parser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import EvalConfig, cli_default, knobs, resolve_methods

__all__ = [
    "add_arguments",
    "add_evaluate_parser",
    "cmd_evaluate",
    "command_line",
    "config_from_args",
    "flag_name",
]

HELP = "score explanation methods on a dataset (segmentation, pointing, perturbation, sanity)"
DESCRIPTION = (
    "Run methods and baselines over a dataset, score their maps (pointing game, mIoU, pixel "
    "accuracy, mAP, p-mIoU, perturbation and deletion/insertion AUC, sanity check), print a table and write "
    "results.md, results.csv and PNG curves. Resumable: rerun the same command to continue."
)


def flag_name(f: dataclasses.Field) -> str:
    """``--sanity-items`` for the field ``sanity_items``."""
    return "--" + f.name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse_type(hint: Any) -> type:
    """The argparse type of a field's annotation: int or float where the field holds one, else
    str (lists are given comma-separated and split by :class:`EvalConfig`)."""
    args = set(typing.get_args(hint)) or {hint}
    for t in (int, float):
        if t in args:
            return t
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cliplens evaluate``: one flag per :class:`EvalConfig` knob with a flag."""
    hints = typing.get_type_hints(EvalConfig)
    for f in knobs(flag=True):
        meta = f.metadata
        default = cli_default(f)
        names = [flag_name(f)] + ([meta["short"]] if meta["short"] else [])
        text = meta["help"]
        if default is not None and default is not False and not meta["required"]:
            text += f". Default: {_shown(default)}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": text.replace("%", "%%")}
        if hints[f.name] is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _parse_type(hints[f.name])
            for key in ("choices", "metavar", "required"):
                if meta[key]:
                    kwargs[key] = meta[key]
        parser.add_argument(*names, **kwargs)


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Mount ``evaluate`` on the ``cliplens`` command's subparsers."""
    p = subparsers.add_parser("evaluate", help=HELP, description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=cmd_evaluate)
    return p


def config_from_args(args: argparse.Namespace, **overrides: Any) -> EvalConfig:
    """The :class:`EvalConfig` of parsed arguments (values checked: one-line InputError)."""
    values = {f.name: getattr(args, f.name) for f in knobs(flag=True)}
    return EvalConfig(**{**values, **overrides})


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces a run: the flags that differ from their defaults (and those
    always shown: model, dataset, out), shell-quoted."""
    parts = ["cliplens", "evaluate"]
    for f in knobs(flag=True):
        value = getattr(args, f.name)
        echo = f.metadata["echo"]
        if echo == "never" or (echo == "changed" and value == cli_default(f)) or value is None:
            continue
        if isinstance(value, bool):
            if value:
                parts.append(flag_name(f))
            continue
        parts += [flag_name(f), _shown(value)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cliplens evaluate``: check the arguments and the dataset before the model loads, run
    :func:`~cliplens.eval.harness.run_evaluation`, print the table, write the reports."""
    from ..cli import check_device
    from . import report
    from .harness import open_eval_dataset, run_evaluation

    config = config_from_args(args, progress=True)
    check_device(config.device)  # before the dataset is drawn or the model loads
    if config.out:
        from ..files import check_writable_dir

        check_writable_dir(config.out)  # before the dataset is drawn or the model loads
    if config.parquet:
        from .export import require_pyarrow

        require_pyarrow()
    if config.limit == 0:
        raise InputError("--limit 0: nothing to evaluate; give --limit 1 or more, or leave it out for every item")
    dataset = open_eval_dataset(config, draw=False)
    if dataset is not None and dataset.size == 0:
        raise InputError(f"{config.dataset}: the dataset has no items; nothing to evaluate")
    resolve_methods(config.methods)
    results = run_evaluation(args.model, config, command=command_line(args))
    print(results.table())
    for m, info in results.refused.items():
        print(f"note: {m} did not explain {info['items']} item(s): {info['reason']}")
    best = results.best()
    if best:
        print("best method: " + "; ".join(f"{report.column_heading(k)} {v}" for k, v in best.items()))
    print(written_line(config.out))
    return 0


def written_line(out: str | None) -> str:
    """"wrote OUT/ (...)" naming the files that are there, not the ones a run usually writes."""
    folder = Path(out) if out else None
    if folder is None or not folder.is_dir():
        return "wrote nothing"
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    pngs = [n for n in names if n.endswith(".png")]
    shown = [n for n in names if not n.endswith(".png")] + ([f"{len(pngs)} PNG chart(s)"] if pngs else [])
    return f"wrote {out}/ ({', '.join(shown)})" if shown else f"wrote nothing to {out}/"
