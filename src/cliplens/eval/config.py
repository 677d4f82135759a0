"""Every knob of an evaluation, declared once: its default, its help text, and whether it is
part of the stored configuration.

:class:`EvalConfig` is the single source of defaults: :func:`cliplens.eval.harness.evaluate`
takes its keyword defaults from it and ``cliplens evaluate`` generates its flags from its fields
(:mod:`cliplens.eval.cli`). A config is made in two steps:

1. ``EvalConfig(...)`` from the user's knobs: values are checked and normalised on construction
   (one-line :class:`~cliplens.errors.InputError`); method names stay as given.
2. :meth:`EvalConfig.completed` once the model and the dataset are open: the model's name and
   checksum, the resolved methods, the dataset's canonical spec, the prompt, the templates and
   the class names. Only a completed config is stored and digested.

The fields marked ``stored`` are what decides the numbers (:meth:`EvalConfig.to_dict`,
:meth:`EvalConfig.digest`); the others (``limit``, ``out``, ``restart``, ...) decide how a run
goes, not what it measures, so a rerun with a larger ``limit`` extends the same results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import ModelAdapter
from ..cli import DTYPES
from ..errors import InputError
from ..methods import REGISTRY, get_method
from .classifier import resolve_templates
from .datasets import EvalDataset
from .metrics import CHEFER_FRACTIONS
from .perturbation import REMOVAL_MODES

__all__ = [
    "ALL_METRICS",
    "OPTIONAL_METRICS",
    "BASELINES",
    "CURVES",
    "DTYPES",
    "HARNESS_VERSION",
    "SEGMENTATION_PROTOCOLS",
    "SHAPES_EVAL_SEED",
    "PERTURBATION_PROTOCOLS",
    "TIE_DRAWS",
    "TIE_MODES",
    "TARGETS",
    "EvalConfig",
    "knobs",
    "model_checksum",
    "resolve_methods",
    "resolve_metrics",
]

#: Bumped when the meaning of a stored record changes (part of the config hash).
#: 2: ImageNet-S ignore pixels left out, near-constant maps scored as constant (issue 20).
HARNESS_VERSION = 2
#: How an item is brought to the scoring resolution (see docs/evaluation.md):
#: "cliplens": the model's own preprocessing, maps scored on the original image;
#: "chefer": image and masks squashed to the model input size and scored there (Chefer et al.'s
#: imagenet_seg_eval.py); "textspan": as "chefer", the map clipped at 0 before scoring (TextSpan).
SEGMENTATION_PROTOCOLS = ("cliplens", "chefer", "textspan")
#: How tied relevance values are ordered in perturbation / deletion / insertion: "index" (flat
#: index order: deterministic, biased towards the top rows), "random" (each tied group shuffled,
#: curves averaged over TIE_DRAWS seeded draws).
TIE_MODES = ("index", "random")
#: The positive / negative perturbation test: "cliplens" (patches of the model's grid, the
#: explained target as the score, fill ``removal``); "chefer" (Chefer et al.'s
#: pertubation_eval_from_hdf5.py: the pixels of the bilinearly upsampled map, black fill,
#: top-1 accuracy of the zero-shot classifier against the pair's class, AUC x 100).
PERTURBATION_PROTOCOLS = ("cliplens", "chefer")
TIE_DRAWS = 8
ALL_METRICS = ("segmentation", "pointing", "pmiou", "perturbation", "deletion", "sanity")
#: Metrics run only when named: ``text_perturbation`` (Chefer et al.'s text test: remove a
#: prompt's tokens in the order of the method's token scores; methods with token scores only)
OPTIONAL_METRICS = ("text_perturbation",)
BASELINES = ("random", "centre", "oracle")
TARGETS = ("logit", "probability", "class", "class-contrast")
#: Dataset seed of shapes scenes drawn for evaluation (training used seeds 1 and 2, and
#: seeds 12-14 to watch progress).
SHAPES_EVAL_SEED = 3
#: The perturbation curves of a record: Chefer's positive / negative, Petsiuk's deletion / insertion,
#: Chefer's text test (positive / negative over a prompt's tokens).
CURVES = ("positive", "negative", "deletion", "insertion", "text_positive", "text_negative")


def knob(
    default: Any,
    help: str,
    *,
    stored: bool = True,
    flag: bool = True,
    short: str | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    required: bool = False,
    cli_default: Any = dataclasses.MISSING,
    echo: str = "changed",
    omit_default: bool = False,
) -> Any:
    """A field of :class:`EvalConfig` with what the command line needs to know about it.

    Args:
        default: the value when the knob is not given (Python and command line alike).
        help: one line for ``--help`` (the default is appended by the CLI).
        stored: part of :meth:`EvalConfig.to_dict` and the digest (decides the numbers).
        flag: ``cliplens evaluate`` has a ``--name`` flag for it.
        short, choices, metavar, required: passed to argparse.
        cli_default: where the command line's default differs from Python's (``out``).
        echo: in the echoed command line: ``"always"``, ``"changed"`` (differs from the
            default) or ``"never"``.
        omit_default: a stored knob added after records were written: left out of
            :meth:`EvalConfig.to_dict` (and the digest) while it has its default value, so the
            configurations written before it keep their digest.
    """
    meta = {
        "help": help,
        "stored": stored,
        "flag": flag,
        "short": short,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "required": required,
        "cli_default": cli_default,
        "echo": echo,
        "omit_default": omit_default,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation can be told, with its default (see the module docstring)."""

    # -- stored: what decides the numbers (this order is the order of config.json) ---------------
    model: str = knob("shapes", "hub name, checkpoint directory or 'shapes'", short="-m", echo="always")
    model_checksum: str = knob(
        "", "fingerprint of the weights (filled in when the model is open)", flag=False
    )
    dtype: str = knob(
        "float32",
        "the weights' dtype: float32, bfloat16 or float16 (half the memory; maps and scores are "
        "scored in float; checked as a value, so a wrong one is one line)",
        metavar="DTYPE",
        omit_default=True,
    )
    methods: tuple[str, ...] | None = knob(
        None, "comma-separated methods (default: every method with an image map)"
    )
    dataset: str = knob(
        "",
        "KIND:PATH, e.g. shapes:data/shapes-eval (kinds: see docs/evaluation.md)",
        short="-d",
        required=True,
        echo="always",
    )
    target: str = knob("logit", "what is explained per object", choices=TARGETS)
    removal: str = knob("mean", "fill of removed patches", choices=REMOVAL_MODES)
    metrics: tuple[str, ...] = knob(
        ALL_METRICS,
        "comma-separated metrics: " + ", ".join(ALL_METRICS) + " (the default: all of these), "
        "and text_perturbation (Chefer et al.'s text test, on methods with token scores)",
    )
    seed: int = knob(0, "seed of the random baseline and the sanity check")
    steps: int = knob(10, "deletion/insertion steps (0..100% in equal steps)")
    perturbation_protocol: str = knob(
        "cliplens",
        "positive/negative perturbation: cliplens (patches, the explained target, --removal fill) or chefer "
        "(pixels of the upsampled map, black fill, top-1 accuracy against the class, AUC x 100; needs "
        "--target class or class-contrast)",
        choices=PERTURBATION_PROTOCOLS,
    )
    ties: str = knob(
        "index",
        "order of tied relevance values when removing patches: index (flat index order) or random "
        "(shuffled within each tied group, curves averaged over 8 seeded draws)",
        choices=TIE_MODES,
    )
    fractions: tuple[float, ...] = knob(
        CHEFER_FRACTIONS, "fractions of patches removed by the perturbation test", flag=False
    )
    pointing_tolerance: float = knob(
        0.0, "pointing game tolerance in pixels of the original image (TorchRay's protocol: 15)"
    )
    segmentation_protocol: str = knob(
        "cliplens",
        "cliplens: model preprocessing, scored on the original image; chefer: image and masks squashed "
        "to the model input size and scored there (Chefer's imagenet_seg_eval); textspan: chefer with the "
        "map clipped at 0 (every metric of the run sees the squashed item)",
        choices=SEGMENTATION_PROTOCOLS,
    )
    sanity_items: int = knob(16, "items given the sanity check (the first N)")
    prompt: str | None = knob(
        None, "pair prompt template with {} (default: 'a {}' on shapes, else 'a photo of a {}.')"
    )
    templates: tuple[str, ...] | str | None = knob(
        None, "class targets: imagenet80 (default), plain, a, photo, or a file with one per line"
    )
    classes: tuple[str, ...] | str | None = knob(
        None, "class targets: a file with one class name per line (default: the shapes world's labels)"
    )
    blur_sigma: float = knob(5.0, "sigma of the blur that insertion starts from", flag=False)
    version: int = knob(HARNESS_VERSION, "version of the record format", flag=False)
    # -- how a run goes (not stored) --------------------------------------------------------------
    limit: int | None = knob(None, "evaluate the first N items", stored=False, short="-n", metavar="N")
    make_shapes: int | None = knob(
        None, "shapes:PATH missing? draw N scenes there first", stored=False, metavar="N"
    )
    restart: bool = knob(
        False, "discard earlier results in --out that used another configuration", stored=False, echo="never"
    )
    device: str | None = knob(None, "torch device, e.g. cuda", stored=False)
    threads: int | None = knob(
        None,
        "torch CPU threads during the run (1 is much faster on a busy machine with small models; "
        "default: torch's)",
        stored=False,
    )
    parquet: bool = knob(
        False,
        "also write OUT/records.parquet: one row per (item, pair, source), flat metric columns "
        "(needs pyarrow; results.jsonl stays the resumable store)",
        stored=False,
    )
    progress: bool = knob(False, "show a progress bar", stored=False, flag=False)
    out: str | None = knob(
        None,
        "output folder (results.jsonl kept as items finish: resumable; in Python None keeps all in memory)",
        stored=False,
        cli_default="cliplens-eval",
        echo="always",
    )

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:  # frozen: normalise in place, on construction
            object.__setattr__(self, name, value)

        if self.removal not in REMOVAL_MODES:
            raise InputError(f"removal must be one of {', '.join(REMOVAL_MODES)}, got {self.removal!r}")
        if self.segmentation_protocol not in SEGMENTATION_PROTOCOLS:
            raise InputError(
                f"segmentation_protocol must be one of {', '.join(SEGMENTATION_PROTOCOLS)}, "
                f"got {self.segmentation_protocol!r}"
            )
        if self.perturbation_protocol not in PERTURBATION_PROTOCOLS:
            raise InputError(
                f"perturbation_protocol must be one of {', '.join(PERTURBATION_PROTOCOLS)}, "
                f"got {self.perturbation_protocol!r}"
            )
        if self.perturbation_protocol == "chefer" and not self.target.startswith("class"):
            raise InputError(
                "perturbation_protocol 'chefer' scores top-1 accuracy against the class: "
                "use target='class' or 'class-contrast' (--target class)"
            )
        if isinstance(self.dtype, torch.dtype):  # torch.bfloat16 -> "bfloat16"
            set_("dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.ties not in TIE_MODES:
            raise InputError(f"ties must be one of {', '.join(TIE_MODES)}, got {self.ties!r}")
        if self.target not in TARGETS:
            raise InputError(f"unknown evaluation target {self.target!r}; choose from {', '.join(TARGETS)}")
        for name, conv in (
            ("seed", int),
            ("steps", int),
            ("sanity_items", int),
            ("pointing_tolerance", float),
        ):
            set_(name, _number(name, getattr(self, name), conv))
        if self.steps < 1:
            raise InputError("steps must be at least 1")
        if self.sanity_items < 0:
            raise InputError("sanity_items must be >= 0")
        set_("metrics", resolve_metrics(self.metrics))
        set_("methods", _names(self.methods))
        set_("fractions", tuple(float(f) for f in self.fractions))
        for name in ("templates", "classes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                set_(name, tuple(str(v) for v in value))
            elif isinstance(value, os.PathLike):
                set_(name, os.fspath(value))
        if self.prompt is not None and (not isinstance(self.prompt, str) or self.prompt.count("{}") != 1):
            raise InputError(f"the prompt template needs exactly one {{}}, got {self.prompt!r}")
        if self.prompt is not None:
            check_template(self.prompt, "the prompt template")
        for name, low in (("limit", 0), ("make_shapes", 0), ("threads", 1)):
            value = getattr(self, name)
            if value is not None:
                value = _number(name, value, int)
                if value < low:
                    raise InputError(f"{name} must be at least {low}, got {value}")
                set_(name, value)
        if self.out is not None:
            set_("out", os.fspath(self.out))

    # -- the stored record ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The stored fields as JSON values (tuples as lists), in declaration order; a knob
        declared ``omit_default`` is left out while it has its default (``dtype``: float32),
        so a default configuration has the digest it had before that knob existed."""
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in knobs(stored=True)
            if not (f.metadata["omit_default"] and getattr(self, f.name) == f.default)
        }

    def digest(self) -> str:
        """A short hash of :meth:`to_dict`: equal digests, equal numbers."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> EvalConfig:
        """The config of a stored :meth:`to_dict` (e.g. ``config.json``), lists back as tuples."""
        names = {f.name for f in knobs(stored=True)}
        unknown = sorted(set(stored) - names)
        if unknown:
            raise InputError(f"a stored configuration has unknown keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})

    # -- completion -------------------------------------------------------------------------------
    def completed(self, adapter: ModelAdapter, dataset: EvalDataset) -> EvalConfig:
        """This config with everything that depends on the open model and dataset filled in:
        what is stored and digested. Raises :class:`InputError` for a class target without
        class names or with unknown templates."""
        class_names = templates = None
        if self.target.startswith("class"):
            class_names = (
                _read_lines_option(self.classes, "classes")
                if self.classes is not None
                else _default_classes(dataset)
            )
            if not class_names:
                raise InputError(
                    f"target {self.target!r} needs class names: pass classes= (--classes FILE, one per line)"
                )
            templates = resolve_templates(_read_lines_option(self.templates, "templates") or self.templates)
        dtype = str(adapter.dtype).removeprefix("torch.")
        return dataclasses.replace(
            self,
            model=adapter.name,
            dtype=dtype if dtype in DTYPES else self.dtype,  # what the weights are, not what was asked
            model_checksum=model_checksum(adapter),
            methods=resolve_methods(self.methods, adapter),
            dataset=f"{dataset.kind}:{Path(dataset.path).resolve()}",
            prompt=self.prompt if self.prompt is not None else default_prompt(dataset.kind),
            templates=tuple(templates) if templates is not None else None,
            classes=tuple(class_names) if class_names is not None else None,
        )


def knobs(*, stored: bool | None = None, flag: bool | None = None) -> Iterator[dataclasses.Field]:
    """The fields of :class:`EvalConfig` in declaration order, optionally only the stored ones
    or only those with a command-line flag."""
    for f in dataclasses.fields(EvalConfig):
        if stored is not None and f.metadata["stored"] != stored:
            continue
        if flag is not None and f.metadata["flag"] != flag:
            continue
        yield f


def cli_default(f: dataclasses.Field) -> Any:
    """The default a knob has on the command line (its Python default unless it declares another)."""
    value = f.metadata["cli_default"]
    return f.default if value is dataclasses.MISSING else value


def check_template(template: str, what: str) -> None:
    """A one-line InputError unless ``template.format(name)`` works (other braces must be
    doubled: ``{{`` and ``}}``), checked before anything is written."""
    try:
        template.format("x")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"{what} {template!r} is not a valid format string ({exc.__class__.__name__}: {exc}); "
            "write literal braces as {{ and }}"
        ) from None


def default_prompt(kind: str) -> str:
    """The pair prompt template of a dataset kind: ``"a {}"`` on shapes, ``"a photo of a {}."`` else."""
    return "a {}" if kind == "shapes" else "a photo of a {}."


def model_checksum(adapter: ModelAdapter) -> str:
    """A cheap fingerprint of the weights: parameter count and float64 sums."""
    total, absolute, count = 0.0, 0.0, 0
    with torch.no_grad():
        for p in adapter.model.parameters():
            d = p.detach().double()
            total += float(d.sum())
            absolute += float(d.abs().sum())
            count += p.numel()
    return f"{count}:{total:.10g}:{absolute:.10g}"


def resolve_methods(methods: str | Sequence[str] | None, adapter=None) -> tuple[str, ...]:
    """Method names (a comma-separated string or a list); None = every registered method
    that gives an image map (and, given the ``adapter`` of a fusion model, that runs on it)."""
    if methods is None:
        names = [n for n, cls in REGISTRY.items() if not n.startswith("_") and "image" in cls.towers]
        if adapter is not None and adapter.fusion:
            names = [n for n in names if _runs_on(n, adapter)]
        if not names:
            raise InputError("no registered method gives an image map")
        return tuple(names)
    names = _names(methods) or ()
    if not names:
        raise InputError("no methods given")
    if len(set(names)) != len(names):
        raise InputError("a method is listed twice")
    for n in names:
        if n in BASELINES:
            raise InputError(f"{n!r} is a baseline; baselines are always evaluated")
        meth = get_method(n)
        if "image" not in meth.towers:
            raise InputError(f"method {n!r} gives no image map, which every protocol here scores")
    return names


def _runs_on(name: str, adapter) -> bool:
    meth = get_method(name)
    return meth.unsupported(adapter, meth.towers, meth.parse_options({})) is None


def resolve_metrics(metrics: str | Sequence[str] | None) -> tuple[str, ...]:
    """Metric names (a comma-separated string or a list) in the order of :data:`ALL_METRICS`
    then :data:`OPTIONAL_METRICS`; None = all of :data:`ALL_METRICS`."""
    if metrics is None:
        return ALL_METRICS
    known = ALL_METRICS + OPTIONAL_METRICS
    out: list[str] = []
    for m in _names(metrics) or ():
        if m not in known:
            raise InputError(f"unknown metric {m!r}; choose from {', '.join(known)}")
        if m not in out:
            out.append(m)
    if not out:
        raise InputError("no metrics given")
    return tuple(m for m in known if m in out)


# ----------------------------------------------------------------------------- helpers


def _names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a, b"`` or ``["a", "b"]`` -> ``("a", "b")``; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(m for m in (s.strip() for s in value.split(",")) if m)
    return tuple(value)


def _number(name: str, value: Any, conv: type) -> Any:
    try:
        if isinstance(value, bool):
            raise TypeError
        return conv(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _default_classes(ds: EvalDataset) -> tuple[str, ...] | None:
    if ds.kind == "shapes":
        try:
            meta = json.loads((Path(ds.path) / "dataset.json").read_text(encoding="utf-8"))
            return tuple(meta["labels"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _read_lines_option(value: Any, what: str) -> tuple[str, ...] | None:
    """A list of strings, or a path to a UTF-8 file with one per line (None: neither)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            if what == "classes":
                raise InputError(f"{value}: no such {what} file")
            return None
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{value}: cannot read the {what} file ({exc.__class__.__name__})") from None
        return tuple(line.strip() for line in lines if line.strip())
    return tuple(str(v) for v in value)
