"""Records -> numbers: :func:`summarise` aggregates the per-item records of an evaluation (of one
run, or merged from shards) into :class:`EvalResults`: one row per source, the mean curves and
the sanity check's correlation per randomisation depth.

Aggregation pools counts where the protocol pools them (segmentation over the dataset, p-mIoU
per class over points) and averages per-pair values otherwise (pointing, AUCs, correlations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import report
from .config import BASELINES, CURVES, EvalConfig
from .metrics import TEXT_FRACTIONS
from .metrics import PointCounts, PointIoUAccumulator, SegmentationAccumulator, SegmentationCounts

__all__ = ["EvalResults", "summarise"]


@dataclass
class EvalResults:
    """Aggregated scores. ``rows``: one dict per source (methods, then baselines) with the
    keys of :data:`~cliplens.eval.report.CSV_KEYS`; ``curves[kind][source]`` = (x, mean y);
    ``sanity[source]`` = mean Spearman correlation per randomisation depth 1..L."""

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
        """The row of one source (a method or baseline name); KeyError if there is none."""
        for r in self.rows:
            if r["source"] == source:
                return r
        raise KeyError(source)

    def best(self) -> dict[str, str]:
        """Per metric column, the best *method* (baselines excluded)."""
        out = {}
        methods = [r for r in self.rows if r["kind"] == "method"]
        for c in report.COLUMNS:
            if not c.better:
                continue
            scored = [(r[c.key], r["source"]) for r in methods if report.is_finite(r.get(c.key))]
            if scored:
                pick = max(scored) if c.better == "up" else min(scored)
                out[c.key] = pick[1]
        return out

    def table(self) -> str:
        """The results as an aligned text table (for the terminal)."""
        return report.text_table(report.result_columns(self.rows), self.rows)

    def markdown(self) -> str:
        """The results as a Markdown table."""
        return report.markdown_table(report.result_columns(self.rows), self.rows)

    def csv(self) -> str:
        """The rows as CSV (every key of :data:`~cliplens.eval.report.CSV_KEYS`)."""
        return report.csv_text(report.CSV_KEYS, self.rows)

    def report_markdown(self) -> str:
        """The text of ``results.md`` (:func:`cliplens.eval.report.report_markdown`)."""
        return report.report_markdown(self)

    def to_dict(self) -> dict:
        """Everything as JSON values (the content of ``summary.json``)."""
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
        """results.md, results.csv, summary.json and the PNG charts into ``out``
        (:func:`cliplens.eval.report.write_results`)."""
        return report.write_results(self, out)


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _source_row(config: EvalConfig, source: str, pairs: list[dict]) -> tuple[dict, dict, list[float] | None]:
    """(table row, kind -> (x, mean y) curves, mean correlation per depth or None) of one source."""
    scored = [p["scores"][source] for p in pairs if source in p["scores"]]
    row: dict[str, Any] = {
        "source": source,
        "kind": "baseline" if source in BASELINES else "method",
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
        # "mAP" is the literature's (Chefer et al.'s script, TextSpan): AP of the two-channel score
        # (1 - r, r) against one-hot labels; "fg AP" is the AP of the raw map against the foreground
        row.update(pixel_accuracy=res.pixel_accuracy, miou=res.miou, map=res.ap_reference, fg_ap=res.ap)
    hits = [(p["label"], p["scores"][source]["pointing"]) for p in pairs if "pointing" in p["scores"].get(source, {})]
    if hits:
        row["pointing"] = float(np.mean([h for _, h in hits]))  # over pairs
        per_class: dict[str, list[int]] = {}
        for label, h in hits:
            per_class.setdefault(label, []).append(h)
        # TorchRay's: the mean over classes of each class's accuracy
        row["pointing_class_mean"] = float(np.mean([np.mean(v) for v in per_class.values()]))
    acc = PointIoUAccumulator()
    for p in pairs:
        sc = p["scores"].get(source, {})
        if "points" in sc:
            acc.add_counts(p["label"], PointCounts(*sc["points"]))
    if len(acc):
        row["pmiou"] = acc.result().p_miou
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for kind in CURVES:
        ys = [sc[kind] for sc in scored if kind in sc]
        if not ys:
            continue
        row[f"{kind}_auc"] = _nanmean(sc[f"{kind}_auc"] for sc in scored if kind in sc)
        if len({len(y) for y in ys}) == 1:
            if kind in ("positive", "negative"):
                x = list(config.fractions)
            elif kind.startswith("text_"):
                x = list(TEXT_FRACTIONS)
            else:
                x = list(np.linspace(0.0, 1.0, len(ys[0])))
            curves[kind] = (x, [float(v) for v in np.nanmean(np.asarray(ys, dtype=np.float64), axis=0)])
    per_depth = None
    rho = [sc["sanity"] for sc in scored if "sanity" in sc]
    if rho and len({len(r) for r in rho}) == 1:
        per_depth = [_nanmean(col) for col in zip(*rho)]
        row["sanity_change"] = 1.0 - _nanmean(per_depth)
        row["sanity_rho_last"] = per_depth[-1]
    return row, curves, per_depth


def summarise(config: EvalConfig, records: Sequence[dict], command: str | None = None) -> EvalResults:
    """Aggregate per-item records (in index order) into an :class:`EvalResults`."""
    done = [r for r in records if "pairs" in r]
    pairs = [p for r in done for p in r["pairs"]]
    sources = list(config.methods or ()) + [b for b in BASELINES if any(b in p["scores"] for p in pairs)]
    rows = []
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {k: {} for k in CURVES}
    sanity: dict[str, list[float]] = {}
    for s in sources:
        row, source_curves, per_depth = _source_row(config, s, pairs)
        rows.append(row)
        for kind, xy in source_curves.items():
            curves[kind][s] = xy
        if per_depth is not None:
            sanity[s] = per_depth
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
