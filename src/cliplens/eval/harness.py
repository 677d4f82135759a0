"""The evaluation harness: how faithful is each explanation, measured.

:func:`evaluate` runs every requested method (and the baselines) over a dataset and scores
the maps with the protocols of ``design/ALGORITHMS.md`` ("Evaluation protocols"):

- **segmentation** (pixel accuracy, mIoU, mAP) and the **pointing game** on the map brought
  onto the original image (:meth:`cliplens.Explanation.map_on_original`) against each
  labelled object's mask; **p-mIoU** where the dataset has point labels;
- **perturbation** (Chefer et al. 2021: positive / negative, 0..90% in steps of 10%) and
  **deletion / insertion** (Petsiuk et al. 2018) at the model input, re-running the model
  (:mod:`cliplens.eval.perturbation`);
- the **sanity check** (Adebayo et al. 2018): cascading randomisation of the image blocks
  (:mod:`cliplens.eval.sanity`).

Baselines go through the same code as the methods: ``random`` (uniform noise on the patch
grid, seeded per item), ``centre`` (a centred Gaussian on the grid) and, where masks exist,
``oracle`` (the fraction of each patch covered by the mask). All maps are patch maps of the
model input; the baselines are upsampled exactly like the methods' maps.

What is explained for each (image, labelled object) pair is chosen by ``target``:

- ``"logit"`` (default): the pair logit of the object's prompt (``"a {label}"`` on the shapes
  world, ``"a photo of a {label}."`` elsewhere; ``prompt=`` changes it);
- ``"probability"``: the softmax over the prompts of the image's objects;
- ``"class"``: the probability of the object's class under a CLIP zero-shot classifier
  (templates averaged as CLIP does, :mod:`cliplens.eval.classifier`) over the dataset's
  classes; if the label is not a class name the predicted class is explained;
- ``"class-contrast"``: the logit of that class minus the logit of the best other class.

Perturbation curves track the explained target itself (pair logit, class probability, ...).

Results are appended to ``OUT/results.jsonl`` one item at a time; a rerun with the same
configuration skips the finished items, a changed configuration is refused (``restart=True``
discards the old results). Everything is seeded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters import ModelAdapter, adapt, load_model
from ..api import explain
from ..errors import CliplensError, InputError
from ..methods import REGISTRY, get_method
from ..targets import resolve_target
from .classifier import ZeroShotClassifier, encode_images, encode_texts, resolve_templates
from .datasets import DatasetError, EvalDataset, EvalItem, open_dataset
from .metrics import (
    CHEFER_FRACTIONS,
    PointCounts,
    PointIoUAccumulator,
    SegmentationAccumulator,
    SegmentationCounts,
    centre_prior,
    deletion_curve,
    insertion_curve,
    perturbation_curve,
    point_counts,
    pointing_game,
    random_map,
    segmentation_counts,
    spearman_correlation,
)
from .perturbation import REMOVAL_MODES, CurveBatch, mask_to_grid, target_scores
from .report import Column, Panel, csv_text, line_chart, markdown_table, text_table
from .sanity import CascadingRandomization

__all__ = ["ALL_METRICS", "BASELINES", "SHAPES_EVAL_SEED", "TARGETS", "EvalConfig", "EvalResults", "evaluate"]

#: Bumped when the meaning of a stored record changes (part of the config hash).
HARNESS_VERSION = 1
ALL_METRICS = ("segmentation", "pointing", "pmiou", "perturbation", "deletion", "sanity")
BASELINES = ("random", "centre", "oracle")
TARGETS = ("logit", "probability", "class", "class-contrast")
#: Dataset seed of shapes scenes drawn for evaluation (training used seeds 1 and 2, and
#: seeds 12-14 to watch progress).
SHAPES_EVAL_SEED = 3
CURVES = ("positive", "negative", "deletion", "insertion")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides the numbers of one evaluation (``limit`` is not part of it:
    a rerun with a larger limit extends the same results)."""

    model: str
    model_checksum: str
    methods: tuple[str, ...]
    dataset: str
    target: str = "logit"
    removal: str = "mean"
    metrics: tuple[str, ...] = ALL_METRICS
    seed: int = 0
    steps: int = 10
    fractions: tuple[float, ...] = CHEFER_FRACTIONS
    pointing_tolerance: float = 0.0
    sanity_items: int = 16
    prompt: str = "a photo of a {}."
    templates: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    blur_sigma: float = 5.0
    version: int = HARNESS_VERSION

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


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


def resolve_methods(methods: str | Sequence[str] | None) -> tuple[str, ...]:
    """Method names (a comma-separated string or a list); None = every registered method
    that gives an image map."""
    if methods is None:
        names = [n for n, cls in REGISTRY.items() if not n.startswith("_") and "image" in cls.towers]
        if not names:
            raise InputError("no registered method gives an image map")
        return tuple(names)
    if isinstance(methods, str):
        methods = [m for m in (s.strip() for s in methods.split(",")) if m]
    names = tuple(methods)
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


def resolve_metrics(metrics: str | Sequence[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return ALL_METRICS
    if isinstance(metrics, str):
        metrics = [m for m in (s.strip() for s in metrics.split(",")) if m]
    out = []
    for m in metrics:
        if m not in ALL_METRICS:
            raise InputError(f"unknown metric {m!r}; choose from {', '.join(ALL_METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise InputError("no metrics given")
    return tuple(m for m in ALL_METRICS if m in out)


def _dataset_spec(spec: str) -> tuple[str, Path]:
    if not isinstance(spec, str) or ":" not in spec:
        # let the reader produce its one-line message
        open_dataset(spec)
    kind, _, path = spec.partition(":")
    return kind.strip().lower(), Path(path).expanduser()


def _default_classes(ds: EvalDataset) -> tuple[str, ...] | None:
    if ds.kind == "shapes":
        try:
            meta = json.loads((Path(ds.path) / "dataset.json").read_text(encoding="utf-8"))
            return tuple(meta["labels"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _read_lines_option(value, what: str) -> tuple[str, ...] | None:
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


# ----------------------------------------------------------------------------- result store


class ResultStore:
    """``OUT/config.json`` + ``OUT/results.jsonl`` (one finished item per line)."""

    def __init__(self, out: str | Path | None, config: EvalConfig, *, restart: bool = False):
        self.out = None if out is None else Path(out)
        self.config = config
        self.records: dict[int, dict] = {}
        if self.out is None:
            return
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: exists and is not a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_path = self.out / "config.json"
        self.results_path = self.out / "results.jsonl"
        if restart:
            self._discard()
        if self.config_path.exists():
            self._check_config()
            self._load()
        elif self.results_path.exists():
            raise InputError(
                f"{self.out} holds results.jsonl without config.json: use another --out or --restart to discard it"
            )
        _atomic_write(
            self.config_path, json.dumps({"digest": config.digest(), "config": config.to_dict()}, indent=1)
        )

    def _discard(self) -> None:
        for name in ("config.json", "results.jsonl", *REPORT_FILES):
            p = self.out / name  # type: ignore[operator]
            if p.exists():
                p.unlink()

    def _check_config(self) -> None:
        try:
            saved = json.loads(self.config_path.read_text(encoding="utf-8"))
            old = saved["config"]
            digest = saved["digest"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{self.config_path} is unreadable: use another --out or --restart") from None
        if digest == self.config.digest():
            return
        new = self.config.to_dict()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise InputError(
            f"{self.out} holds results of a different configuration (changed: {', '.join(changed) or 'version'}); "
            "use another --out, or --restart (restart=True) to discard them and start fresh"
        )

    def _load(self) -> None:
        if not self.results_path.exists():
            return
        raw = self.results_path.read_bytes()
        lines = raw.split(b"\n")
        good: list[bytes] = []
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                index = int(rec["index"])
            except (ValueError, KeyError, TypeError):
                if k >= len(lines) - 2 and not raw.endswith(b"\n"):
                    warnings.warn(
                        f"{self.results_path}: dropped an unfinished last line (interrupted run)",
                        stacklevel=3,
                    )
                    break
                raise InputError(
                    f"{self.results_path} line {k + 1} is corrupt: use --restart to start fresh"
                ) from None
            self.records[index] = rec
            good.append(line)
        if len(good) != sum(1 for line in lines if line.strip()):
            _atomic_write(self.results_path, b"".join(g + b"\n" for g in good))

    def append(self, record: dict) -> None:
        self.records[int(record["index"])] = record
        if self.out is None:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.results_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- per item


def _item_seed(seed: int, index: int, p: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), int(p), 0xE7A1]).generate_state(1)[0])


def _f(x) -> float:
    return float(x)


class _Runner:
    """Evaluates one dataset item at a time (see :func:`evaluate`)."""

    def __init__(self, adapter: ModelAdapter, cfg: EvalConfig, classifier: ZeroShotClassifier | None):
        self.adapter = adapter
        self.cfg = cfg
        self.classifier = classifier
        self.metrics = set(cfg.metrics)
        self._randomizer: CascadingRandomization | None = None

    @property
    def randomizer(self) -> CascadingRandomization:
        if self._randomizer is None:
            self._randomizer = CascadingRandomization(self.adapter, seed=self.cfg.seed)
        return self._randomizer

    # -- what is explained ---------------------------------------------------------------
    def _target(self, labels: list[str], pixels: torch.Tensor):
        cfg = self.cfg
        info: list[dict[str, Any]] = [{} for _ in labels]
        if cfg.target in ("logit", "probability"):
            texts = [cfg.prompt.format(label) for label in labels]
            return texts, resolve_target(cfg.target, texts), info
        clf = self.classifier
        assert clf is not None
        probs = clf.probabilities(encode_images(self.adapter, pixels[None]).double())[0]
        predicted = int(probs.argmax())
        chosen = []
        for label, rec in zip(labels, info):
            c = clf.index.get(label, predicted)
            chosen.append(c)
            rec.update(
                {"class": clf.classes[c], "predicted": clf.classes[predicted], "probability": _f(probs[c])}
            )
        texts = [clf.classes[c] for c in chosen]
        if cfg.target == "class":
            return texts, clf.target(chosen), info
        versus = []
        for c, rec in zip(chosen, info):
            other = probs.clone()
            other[c] = -1.0
            v = int(other.argmax())
            versus.append(v)
            rec["versus"] = clf.classes[v]
        return texts, clf.contrast(chosen, versus), info

    # -- one item ----------------------------------------------------------------------
    def evaluate_item(self, index: int, item: EvalItem) -> dict:
        cfg, adapter = self.cfg, self.adapter
        masks = item.masks or {}
        points = item.points or {}
        labels = [
            label
            for label in item.labels
            if (label in masks and np.asarray(masks[label]).any()) or label in points
        ]
        record: dict[str, Any] = {"index": index, "id": item.id}
        if not labels:
            record["skipped"] = "no labelled object"
            return record
        group = adapter.prepare_images([item.image], resize="model")[0]
        pixels, geom = group.pixel_values[0], group.geometries[0]
        ph, pw = adapter.patch_size
        grid = (pixels.shape[1] // ph, pixels.shape[2] // pw)
        texts, target, info = self._target(labels, pixels)

        text_embeds = encode_texts(adapter, texts)
        values = target_scores(adapter, encode_images(adapter, pixels[None]), text_embeds, target)[0]
        maps: dict[str, np.ndarray] = {}
        for m in cfg.methods:
            try:
                ex = explain(adapter, [item.image], texts, method=m, target=target, towers=("image",))
            except CliplensError as exc:  # e.g. a method that cannot explain this kind of target
                record.setdefault("refused", {})[m] = str(exc)
                continue
            maps[m] = np.asarray(ex.image_maps[0], dtype=np.float64)  # type: ignore[index]
        P = len(labels)
        maps["random"] = np.stack([random_map(grid, seed=_item_seed(cfg.seed, index, p)) for p in range(P)])
        maps["centre"] = np.stack([centre_prior(grid)] * P)
        has_masks = all(label in masks for label in labels)
        if has_masks:
            maps["oracle"] = np.stack([mask_to_grid(masks[label], geom, grid) for label in labels])
        sources = list(maps)

        pairs = []
        for p, label in enumerate(labels):
            entry: dict[str, Any] = {"label": label, "text": texts[p], "value": _f(values[p]), **info[p]}  # type: ignore[index]
            entry["scores"] = {s: {} for s in sources}
            pairs.append(entry)

        # maps on the original image: segmentation, pointing game, p-mIoU
        if self.metrics & {"segmentation", "pointing", "pmiou"}:
            for p, label in enumerate(labels):
                for s in sources:
                    out = pairs[p]["scores"][s]
                    if s == "oracle":  # the mask itself, at full resolution
                        on_orig = np.where(
                            geom.seen_mask(), np.asarray(masks[label], dtype=np.float64), np.nan
                        )
                    else:
                        on_orig = geom.grid_to_original(maps[s][p])
                    if label in masks:
                        mask = np.asarray(masks[label], dtype=bool)
                        if "segmentation" in self.metrics:
                            c = segmentation_counts(on_orig, mask)
                            out["seg"] = [
                                c.correct,
                                c.labeled,
                                *c.intersection,
                                *c.union,
                                c.ap,
                                c.ap_reference,
                            ]
                        if "pointing" in self.metrics and mask.any():
                            out["pointing"] = int(
                                pointing_game(on_orig, mask, tolerance=cfg.pointing_tolerance)
                            )
                    if label in points and "pmiou" in self.metrics:
                        pos, neg = points[label]
                        pc = point_counts(on_orig, pos, neg)
                        out["points"] = [pc.tp, pc.fp, pc.fn, pc.tn]

        # perturbation at the model input
        if self.metrics & {"perturbation", "deletion"}:
            batch = CurveBatch(pixels, (ph, pw), cfg.removal, blur_sigma=cfg.blur_sigma)
            for p in range(P):
                for s in sources:
                    r = maps[s][p]
                    if "perturbation" in self.metrics:
                        for order in ("positive", "negative"):
                            batch.add(
                                (s, p, order), perturbation_curve, r, p, order=order, fractions=cfg.fractions
                            )
                    if "deletion" in self.metrics:
                        batch.add((s, p, "deletion"), deletion_curve, r, p, n_steps=cfg.steps)
                        batch.add((s, p, "insertion"), insertion_curve, r, p, n_steps=cfg.steps)
            curves = batch.run(adapter, text_embeds, target)
            for (s, p, kind), curve in curves.items():
                pairs[p]["scores"][s][kind] = [_f(v) for v in curve.scores]
                pairs[p]["scores"][s][kind + "_auc"] = _f(curve.auc)
            record["unique_inputs"] = len(batch.masks)

        # sanity check: cascading randomisation of the image blocks
        if "sanity" in self.metrics and index < cfg.sanity_items:
            rhos: dict[str, list[list[float]]] = {s: [[] for _ in range(P)] for s in sources}
            for _d, rand_adapter in self.randomizer.depths():
                for m in cfg.methods:
                    if m not in maps:
                        continue
                    ex = explain(
                        rand_adapter, [item.image], texts, method=m, target=target, towers=("image",)
                    )
                    for p in range(P):
                        rhos[m][p].append(spearman_correlation(maps[m][p], ex.grid_map(0, p)))
                for s in sources:
                    if s not in BASELINES:
                        continue
                    # a baseline does not read the model: its map under a random model is itself
                    for p in range(P):
                        rhos[s][p].append(spearman_correlation(maps[s][p], maps[s][p]))
            for s in sources:
                for p in range(P):
                    pairs[p]["scores"][s]["sanity"] = [_f(v) for v in rhos[s][p]]

        record["pairs"] = pairs
        return record


# ----------------------------------------------------------------------------- summary

COLUMNS = [
    Column("source", "source"),
    Column("n_pairs", "pairs", "{}"),
    Column("pointing", "pointing", better="up"),
    Column("miou", "mIoU", better="up"),
    Column("pixel_accuracy", "pixel acc", better="up"),
    Column("map", "mAP", better="up"),
    Column("pmiou", "p-mIoU", better="up"),
    Column("positive_auc", "pos AUC", "{:.4g}", better="down"),
    Column("negative_auc", "neg AUC", "{:.4g}", better="up"),
    Column("deletion_auc", "del AUC", "{:.4g}", better="down"),
    Column("insertion_auc", "ins AUC", "{:.4g}", better="up"),
    Column("sanity_change", "sanity change", better="up"),
    Column("sanity_rho_last", "rho all random"),
]
CSV_KEYS = [
    "source",
    "kind",
    "n_pairs",
    "pointing",
    "miou",
    "pixel_accuracy",
    "map",
    "map_reference",
    "pmiou",
    "positive_auc",
    "negative_auc",
    "deletion_auc",
    "insertion_auc",
    "sanity_change",
    "sanity_rho_last",
]
REPORT_FILES = (
    "results.md",
    "results.csv",
    "summary.json",
    "perturbation.png",
    "deletion_insertion.png",
    "sanity.png",
)


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


@dataclass
class EvalResults:
    """Aggregated scores. ``rows``: one dict per source (methods, then baselines) with the
    keys of :data:`CSV_KEYS`; ``curves[kind][source]`` = (x, mean y); ``sanity[source]`` =
    mean Spearman correlation per randomisation depth 1..L."""

    config: dict
    rows: list[dict]
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)
    sanity: dict[str, list[float]] = field(default_factory=dict)
    n_items: int = 0
    n_pairs: int = 0
    n_skipped: int = 0
    accuracy: float | None = None
    command: str | None = None
    refused: dict[str, dict] = field(default_factory=dict)  # method -> {"items": n, "reason": first message}

    def row(self, source: str) -> dict:
        for r in self.rows:
            if r["source"] == source:
                return r
        raise KeyError(source)

    def _columns(self) -> list[Column]:
        return [
            c
            for c in COLUMNS
            if c.key in ("source", "n_pairs") or any(_finite(r.get(c.key)) for r in self.rows)
        ]

    def table(self) -> str:
        """The results as an aligned text table (for the terminal)."""
        return text_table(self._columns(), self.rows)

    def markdown(self) -> str:
        return markdown_table(self._columns(), self.rows)

    def csv(self) -> str:
        return csv_text(CSV_KEYS, self.rows)

    def best(self) -> dict[str, str]:
        """Per metric column, the best *method* (baselines excluded)."""
        out = {}
        methods = [r for r in self.rows if r["kind"] == "method"]
        for c in COLUMNS:
            if not c.better:
                continue
            scored = [(r[c.key], r["source"]) for r in methods if _finite(r.get(c.key))]
            if scored:
                pick = max(scored) if c.better == "up" else min(scored)
                out[c.key] = pick[1]
        return out

    def report_markdown(self) -> str:
        cfg = self.config
        lines = ["# cliplens evaluation", ""]
        if self.command:
            lines += ["```", self.command, "```", ""]
        lines += [
            (
                f"- model: `{cfg['model']}`; dataset: `{cfg['dataset']}`; items: {self.n_items}"
                f" ({self.n_skipped} skipped); explained pairs: {self.n_pairs}"
            ),
            (
                f"- target: `{cfg['target']}`; patch removal: `{cfg['removal']}`; seed: {cfg['seed']};"
                f" sanity check on the first {cfg['sanity_items']} items"
            ),
        ]
        if self.accuracy is not None:
            lines.append(
                f"- share of explained pairs whose class is the classifier's top-1 class: {self.accuracy:.3f}"
                " (at most one per image)"
            )
        lines += ["", self.markdown(), ""]
        for m, info in self.refused.items():
            lines.append(f"- `{m}` did not explain {info['items']} item(s): {info['reason']}")
        if self.refused:
            lines.append("")
        best = self.best()
        if best:
            titles = {c.key: c.heading for c in COLUMNS}
            lines.append(
                "Best method per column: " + "; ".join(f"{titles[k]}: **{v}**" for k, v in best.items()) + "."
            )
            lines.append("")
        lines += [
            "Columns: pointing = share of pairs whose map maximum lies on the object; mIoU, pixel acc, mAP: the",
            "segmentation protocol (map thresholded at its mean; mAP of the raw map); pos/neg AUC: Chefer et al.'s",
            "perturbation test (target value while 0..90% of patches are removed, most / least relevant first;",
            "trapezoid area, unnormalised); del/ins AUC: deletion / insertion (Petsiuk et al.) over 0..100%;",
            "sanity change: 1 - mean Spearman correlation between the map of the trained model and the map after",
            "randomising the top 1..L image blocks (0 = the map ignores the weights; above 1 = anti-correlated);",
            "rho all random: that correlation with every image block randomised (near 0 passes the check).",
            "Baselines do not read the model, so their sanity change is 0 by construction.",
            "",
        ]
        return "\n".join(lines)

    def _chart_title(self) -> str:
        kind, _, path = str(self.config["dataset"]).partition(":")
        return f"{Path(str(self.config['model'])).name} · {kind}:{Path(path).name} · {self.n_pairs} pairs"

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "rows": self.rows,
            "curves": {
                k: {s: {"x": xy[0], "y": xy[1]} for s, xy in v.items()} for k, v in self.curves.items()
            },
            "sanity": self.sanity,
            "n_items": self.n_items,
            "n_pairs": self.n_pairs,
            "n_skipped": self.n_skipped,
            "accuracy": self.accuracy,
            "command": self.command,
            "refused": self.refused,
        }

    def write(self, out: str | Path) -> list[Path]:
        """results.md, results.csv, summary.json and the PNG charts into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in (
            ("results.md", self.report_markdown()),
            ("results.csv", self.csv()),
            ("summary.json", json.dumps(self.to_dict(), indent=1)),
        ):
            _atomic_write(out / name, text)
            written.append(out / name)
        dashed = [b for b in BASELINES]
        charts = [
            ("perturbation.png", ("positive", "negative"), "fraction of patches removed", "target"),
            (
                "deletion_insertion.png",
                ("deletion", "insertion"),
                "fraction of patches removed / inserted",
                "target",
            ),
        ]
        for name, kinds, xlabel, ylabel in charts:
            panels = [
                Panel(
                    f"{kind} ({'lower' if kind in ('positive', 'deletion') else 'higher'} is better)",
                    xlabel,
                    ylabel,
                    dict(self.curves[kind]),
                )
                for kind in kinds
                if self.curves.get(kind)
            ]
            if panels:
                tmp = out / f".{name}.tmp.png"
                line_chart(panels, tmp, dashed=dashed, title=self._chart_title())
                os.replace(tmp, out / name)
                written.append(out / name)
        if self.sanity:
            depth_series = {s: (list(range(1, len(v) + 1)), v) for s, v in self.sanity.items()}
            depth = max(len(v) for v in self.sanity.values())
            panel = Panel(
                "cascading randomisation (lower = the map follows the weights)",
                "top image blocks randomised",
                "Spearman rank correlation",
                depth_series,
                xlim=(1, max(depth, 2)),
                xticks=list(range(1, depth + 1)),
            )
            tmp = out / ".sanity.tmp.png"
            line_chart([panel], tmp, dashed=dashed, panel_size=(480, 300))
            os.replace(tmp, out / "sanity.png")
            written.append(out / "sanity.png")
        return written


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarise(config: EvalConfig, records: Sequence[dict], command: str | None = None) -> EvalResults:
    """Aggregate per-item records (in index order) into an :class:`EvalResults`."""
    done = [r for r in records if "pairs" in r]
    pairs = [p for r in done for p in r["pairs"]]
    sources = list(config.methods) + [b for b in BASELINES if any(b in p["scores"] for p in pairs)]
    rows = []
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {k: {} for k in CURVES}
    sanity: dict[str, list[float]] = {}
    for s in sources:
        scored = [p["scores"][s] for p in pairs if s in p["scores"]]
        row: dict[str, Any] = {
            "source": s,
            "kind": "baseline" if s in BASELINES else "method",
            "n_pairs": len(scored),
        }
        seg = SegmentationAccumulator()
        for sc in scored:
            if "seg" in sc:
                c = sc["seg"]
                seg.add_counts(
                    SegmentationCounts(
                        int(c[0]), int(c[1]), (int(c[2]), int(c[3])), (int(c[4]), int(c[5])), c[6], c[7]
                    )
                )
        if len(seg):
            res = seg.result()
            row.update(
                pixel_accuracy=res.pixel_accuracy, miou=res.miou, map=res.ap, map_reference=res.ap_reference
            )
        hits = [sc["pointing"] for sc in scored if "pointing" in sc]
        if hits:
            row["pointing"] = float(np.mean(hits))
        acc = PointIoUAccumulator()
        for p in pairs:
            sc = p["scores"].get(s, {})
            if "points" in sc:
                acc.add_counts(p["label"], PointCounts(*sc["points"]))
        if len(acc):
            row["pmiou"] = acc.result().p_miou
        for kind in CURVES:
            ys = [sc[kind] for sc in scored if kind in sc]
            if not ys:
                continue
            row[f"{kind}_auc"] = _nanmean(sc[f"{kind}_auc"] for sc in scored if kind in sc)
            if len({len(y) for y in ys}) == 1:
                if kind in ("positive", "negative"):
                    x = list(config.fractions)
                else:
                    x = list(np.linspace(0.0, 1.0, len(ys[0])))
                curves[kind][s] = (
                    x,
                    [float(v) for v in np.nanmean(np.asarray(ys, dtype=np.float64), axis=0)],
                )
        rho = [sc["sanity"] for sc in scored if "sanity" in sc]
        if rho and len({len(r) for r in rho}) == 1:
            per_depth = [_nanmean(col) for col in zip(*rho)]
            sanity[s] = per_depth
            row["sanity_change"] = 1.0 - _nanmean(per_depth)
            row["sanity_rho_last"] = per_depth[-1]
        rows.append(row)
    refused: dict[str, dict] = {}
    for r in records:
        for m, reason in r.get("refused", {}).items():
            info = refused.setdefault(m, {"items": 0, "reason": reason})
            info["items"] += 1
    correct = [p["class"] == p["predicted"] for p in pairs if "class" in p and "predicted" in p]
    return EvalResults(
        config=config.to_dict(),
        rows=rows,
        curves={k: v for k, v in curves.items() if v},
        sanity=sanity,
        n_items=len(records),
        n_pairs=len(pairs),
        n_skipped=len(records) - len(done),
        accuracy=float(np.mean(correct)) if correct else None,
        command=command,
        refused=refused,
    )


# ----------------------------------------------------------------------------- entry point


def evaluate(
    model,
    methods: str | Sequence[str] | None = None,
    dataset: str = "",
    *,
    limit: int | None = None,
    out: str | Path | None = None,
    removal: str = "mean",
    metrics: str | Sequence[str] | None = None,
    seed: int = 0,
    target: str = "logit",
    templates: str | Sequence[str] | None = None,
    classes: str | Sequence[str] | None = None,
    prompt: str | None = None,
    steps: int = 10,
    sanity_items: int = 16,
    pointing_tolerance: float = 0.0,
    make_shapes: int | None = None,
    restart: bool = False,
    progress: bool = False,
    device: str | None = None,
    command: str | None = None,
) -> EvalResults:
    """Score explanation methods on a dataset; see the module docstring for the protocols.

    Args:
        model: an adapter, a model object or a :func:`cliplens.load_model` spec (``"shapes"``).
        methods: method names (list or ``"a,b"``); default every registered image method.
        dataset: ``"KIND:PATH"`` (:func:`cliplens.eval.open_dataset`), e.g. ``"shapes:data/val"``.
        limit: evaluate the first ``limit`` items only.
        out: output folder (``results.jsonl`` kept as items finish, reports at the end); None
            keeps everything in memory (no resume).
        removal: how removed patches are filled: ``mean`` (the image's channel means),
            ``blur`` (a Gaussian-blurred copy) or ``zero`` (0 in normalised input space).
        metrics: subset of :data:`ALL_METRICS`; default all (each is skipped where the data
            lacks what it needs).
        seed: seeds the random baseline and the sanity-check weights.
        target: one of :data:`TARGETS`.
        templates, classes: for the ``class`` targets: template set name / list / file, and
            the class names (default: the shapes world's labels for a shapes dataset).
        prompt: the template of a pair prompt (default ``"a {}"`` on shapes, else
            ``"a photo of a {}."``).
        steps: deletion / insertion steps (0..100% in ``steps`` equal steps).
        sanity_items: run the sanity check on the first this many items.
        pointing_tolerance: pointing-game tolerance in original pixels.
        make_shapes: for ``shapes:PATH`` with no folder at PATH, draw this many scenes there
            first (dataset seed :data:`SHAPES_EVAL_SEED`, 224 px).
        restart: discard results of an earlier, different configuration in ``out``.
        progress: show a tqdm progress bar.
    """
    if removal not in REMOVAL_MODES:
        raise InputError(f"removal must be one of {', '.join(REMOVAL_MODES)}, got {removal!r}")
    if target not in TARGETS:
        raise InputError(f"unknown evaluation target {target!r}; choose from {', '.join(TARGETS)}")
    if steps < 1:
        raise InputError("steps must be at least 1")
    if sanity_items < 0:
        raise InputError("sanity_items must be >= 0")
    metric_names = resolve_metrics(metrics)
    method_names = resolve_methods(methods)
    kind, path = _dataset_spec(dataset)
    if kind == "shapes" and make_shapes and not path.exists():
        from ..worlds.shapes import write_dataset

        write_dataset(path, int(make_shapes), seed=SHAPES_EVAL_SEED, progress=progress)
    try:
        ds = open_dataset(dataset, limit=limit)
    except DatasetError as exc:
        if kind == "shapes" and not path.exists():
            raise DatasetError(f"{exc} (draw one with --make-shapes N, or make_shapes=N in Python)") from None
        raise
    if prompt is None:
        prompt = "a {}" if ds.kind == "shapes" else "a photo of a {}."
    if prompt.count("{}") != 1:
        raise InputError(f"the prompt template needs exactly one {{}}, got {prompt!r}")

    adapter: ModelAdapter = (
        load_model(model, device=device) if isinstance(model, (str, os.PathLike)) else adapt(model)
    )
    classifier = None
    class_names = templ = None
    if target.startswith("class"):
        class_names = _read_lines_option(classes, "classes") if classes is not None else _default_classes(ds)
        if not class_names:
            raise InputError(
                f"target {target!r} needs class names: pass classes= (--classes FILE, one per line)"
            )
        templ = resolve_templates(_read_lines_option(templates, "templates") or templates)
        classifier = ZeroShotClassifier.build(adapter, class_names, templ)

    cfg = EvalConfig(
        model=adapter.name,
        model_checksum=model_checksum(adapter),
        methods=method_names,
        dataset=f"{ds.kind}:{Path(ds.path).resolve()}",
        target=target,
        removal=removal,
        metrics=metric_names,
        seed=int(seed),
        steps=int(steps),
        pointing_tolerance=float(pointing_tolerance),
        sanity_items=int(sanity_items),
        prompt=prompt,
        templates=tuple(templ) if templ is not None else None,
        classes=tuple(class_names) if class_names is not None else None,
    )
    store = ResultStore(out, cfg, restart=restart)
    runner = _Runner(adapter, cfg, classifier)

    from tqdm import tqdm

    bar = tqdm(total=ds.size, desc="evaluating", unit="item", disable=not progress, dynamic_ncols=True)
    seen: list[int] = []
    try:
        for index, item in enumerate(ds):
            seen.append(index)
            old = store.records.get(index)
            if old is not None:
                if old.get("id") != item.id:
                    raise InputError(
                        f"{store.out}: item {index} was {old.get('id')!r} and is now {item.id!r}; "
                        "the dataset changed: use --restart"
                    )
            else:
                store.append(runner.evaluate_item(index, item))
            bar.update(1)
    finally:
        bar.close()
    records = [store.records[i] for i in seen]
    results = summarise(cfg, records, command=command)
    if store.out is not None:
        results.write(store.out)
    return results


# ----------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    """The options of ``cliplens evaluate`` (called from :mod:`cliplens.cli`)."""
    p.add_argument(
        "--model", "-m", default="shapes", help="hub name, checkpoint directory or 'shapes'. Default: shapes"
    )
    p.add_argument(
        "--methods", default=None, help="comma-separated methods (default: every method with an image map)"
    )
    p.add_argument(
        "--dataset",
        "-d",
        required=True,
        help="KIND:PATH, e.g. shapes:data/shapes-eval (kinds: see docs/evaluation.md)",
    )
    p.add_argument("--limit", "-n", type=int, default=None, help="evaluate the first N items")
    p.add_argument("--out", default="cliplens-eval", help="output folder (resumable). Default: cliplens-eval")
    p.add_argument(
        "--removal", choices=REMOVAL_MODES, default="mean", help="fill of removed patches. Default: mean"
    )
    p.add_argument(
        "--metrics", default=None, help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random baseline and the sanity check. Default: 0"
    )
    p.add_argument(
        "--target", choices=TARGETS, default="logit", help="what is explained per object. Default: logit"
    )
    p.add_argument(
        "--templates", default=None, help="class targets: imagenet80 (default), plain, a, photo, or a file"
    )
    p.add_argument("--classes", default=None, help="class targets: a file with one class name per line")
    p.add_argument("--prompt", default=None, help="pair prompt template with {} (default: 'a {}' on shapes)")
    p.add_argument("--steps", type=int, default=10, help="deletion/insertion steps. Default: 10")
    p.add_argument("--sanity-items", type=int, default=16, help="items given the sanity check. Default: 16")
    p.add_argument(
        "--pointing-tolerance", type=float, default=0.0, help="pointing game tolerance in pixels. Default: 0"
    )
    p.add_argument(
        "--make-shapes",
        type=int,
        default=None,
        metavar="N",
        help="shapes:PATH missing? draw N scenes there first",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard earlier results in --out that used another configuration",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is much faster on a busy machine with small models). Default: torch's",
    )


def _command_line(args) -> str:
    parts = ["cliplens", "evaluate", "--model", args.model]
    if args.methods:
        parts += ["--methods", args.methods]
    parts += ["--dataset", args.dataset]
    if args.make_shapes:
        parts += ["--make-shapes", str(args.make_shapes)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    for flag, value, default in (
        ("--removal", args.removal, "mean"),
        ("--metrics", args.metrics, None),
        ("--seed", args.seed, 0),
        ("--target", args.target, "logit"),
        ("--templates", args.templates, None),
        ("--classes", args.classes, None),
        ("--prompt", args.prompt, None),
        ("--steps", args.steps, 10),
        ("--sanity-items", args.sanity_items, 16),
        ("--pointing-tolerance", args.pointing_tolerance, 0.0),
    ):
        if value != default:
            parts += [flag, str(value)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_evaluate(args) -> int:
    """``cliplens evaluate``: run :func:`evaluate`, print the table, write the reports."""
    if args.limit is not None and args.limit < 0:
        raise InputError("--limit must be >= 0")
    # a bad dataset or method fails before the model loads
    kind, path = _dataset_spec(args.dataset)
    if not (kind == "shapes" and args.make_shapes and not path.exists()):
        try:
            open_dataset(args.dataset, limit=args.limit)
        except DatasetError as exc:
            if kind == "shapes" and not path.exists():
                raise DatasetError(f"{exc} (add --make-shapes N to draw N scenes there)") from None
            raise
    resolve_methods(args.methods)
    resolve_metrics(args.metrics)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    results = evaluate(
        args.model,
        args.methods,
        args.dataset,
        limit=args.limit,
        out=args.out,
        removal=args.removal,
        metrics=args.metrics,
        seed=args.seed,
        target=args.target,
        templates=args.templates,
        classes=args.classes,
        prompt=args.prompt,
        steps=args.steps,
        sanity_items=args.sanity_items,
        pointing_tolerance=args.pointing_tolerance,
        make_shapes=args.make_shapes,
        restart=args.restart,
        progress=True,
        device=args.device,
        command=_command_line(args),
    )
    print(results.table())
    for m, info in results.refused.items():
        print(f"note: {m} did not explain {info['items']} item(s): {info['reason']}")
    best = results.best()
    if best:
        titles = {c.key: c.heading for c in COLUMNS}
        print("best method: " + "; ".join(f"{titles[k]} {v}" for k, v in best.items()))
    print(f"wrote {args.out}/ (results.md, results.csv, results.jsonl, summary.json, *.png)")
    return 0
