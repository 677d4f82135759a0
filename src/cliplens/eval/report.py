"""Tables (terminal, Markdown, CSV), line charts drawn with PIL (no matplotlib), and the files
of an evaluation's report.

A table is a list of column specs and a list of row dicts; a chart is one or more panels of
(x, y) series sharing a legend. The last section turns an
:class:`~cliplens.eval.summary.EvalResults` into ``results.md``, ``results.csv``,
``summary.json`` and the PNG charts (:func:`write_results`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from .config import BASELINES
from .store import atomic_write

if TYPE_CHECKING:
    from .summary import EvalResults

__all__ = [
    "COLUMNS",
    "CSV_KEYS",
    "REPORT_FILES",
    "Column",
    "Panel",
    "csv_text",
    "format_value",
    "is_finite",
    "line_chart",
    "markdown_table",
    "report_markdown",
    "result_columns",
    "text_table",
    "write_results",
]


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str = "{:.3f}"  # for floats
    better: str = ""  # "up", "down" or ""

    @property
    def heading(self) -> str:
        arrow = {"up": " ↑", "down": " ↓"}.get(self.better, "")
        return self.title + arrow


def format_value(value, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return fmt.format(value)
    return str(value)


def _cells(columns: Sequence[Column], rows: Sequence[dict]) -> list[list[str]]:
    return [[format_value(row.get(c.key), c.fmt) for c in columns] for row in rows]


def text_table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    """Aligned plain-text table for the terminal (first column left, the others right)."""
    head = [c.heading for c in columns]
    body = _cells(columns, rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule] + [line(r) for r in body])


def markdown_table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    head = "| " + " | ".join(c.heading for c in columns) + " |"
    align = "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"
    body = ["| " + " | ".join(cells) + " |" for cells in _cells(columns, rows)]
    return "\n".join([head, align, *body])


def csv_text(keys: Sequence[str], rows: Sequence[dict]) -> str:
    """CSV with a header of ``keys``; floats in full precision, NaN and missing as empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for row in rows:
        out = []
        for k in keys:
            v = row.get(k)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out.append("")
            elif isinstance(v, float):
                out.append(repr(v))
            else:
                out.append(str(v))
        writer.writerow(out)
    return buf.getvalue()


# ----------------------------------------------------------------------------- charts

#: Distinct, colour-blind-friendly-ish line colours (Okabe-Ito first, then Tableau).
PALETTE = [
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (140, 86, 75),
    (148, 103, 189),
    (23, 190, 207),
    (188, 189, 34),
]
GREY = (120, 120, 120)


@dataclass
class Panel:
    """One plot: ``series`` maps a name to (x values, y values)."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None
    xticks: Sequence[float] | None = None


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _dashed(
    draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], fill, width: int, dash: float = 7.0
) -> None:
    on, carry = True, 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            seg = min(dash - carry, length - pos)
            if on and length > 0:
                a = pos / length
                b = (pos + seg) / length
                draw.line(
                    [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                    fill=fill,
                    width=width,
                )
            pos += seg
            carry += seg
            if carry >= dash - 1e-9:
                carry, on = 0.0, not on


def _axis(lo: float, hi: float, out_lo: float, out_hi: float):
    """The linear map taking [lo, hi] onto [out_lo, out_hi]."""

    def f(v: float) -> float:
        return out_lo + (v - lo) / (hi - lo) * (out_hi - out_lo)

    return f


def line_chart(
    panels: Sequence[Panel],
    path: str | Path | None = None,
    *,
    dashed: Sequence[str] = (),
    panel_size: tuple[int, int] = (420, 300),
    title: str = "",
) -> Image.Image:
    """Draw panels side by side with one shared legend on the right; save a PNG if ``path``.

    Series named in ``dashed`` are drawn dashed in grey shades (baselines); the others get
    palette colours in order of first appearance, the same colour in every panel.
    """
    names: list[str] = []
    for p in panels:
        for name in p.series:
            if name not in names:
                names.append(name)
    colours: dict[str, tuple[int, int, int]] = {}
    k = 0
    greys = [(175, 175, 175), (110, 110, 110), (20, 20, 20), (140, 140, 140)]
    g = 0
    for name in names:
        if name in dashed:
            colours[name] = greys[g % len(greys)]
            g += 1
        else:
            colours[name] = PALETTE[k % len(PALETTE)]
            k += 1

    font, small, big = _font(13), _font(11), _font(15)
    pw, ph = panel_size
    legend_w = 24 + max((int(small.getlength(n)) for n in names), default=40) + 16
    top = 30 if title else 6
    width = pw * len(panels) + legend_w + 10
    height = ph + top + 6
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((10, 6), title, fill=(20, 20, 20), font=big)

    for i, panel in enumerate(panels):
        ox, oy = i * pw, top
        left, right, ptop, bottom = ox + 58, ox + pw - 14, oy + 26, oy + ph - 44
        xs = [float(v) for s in panel.series.values() for v in s[0]]
        ys = [float(v) for s in panel.series.values() for v in s[1] if math.isfinite(float(v))]
        x0, x1 = panel.xlim or ((min(xs), max(xs)) if xs else (0.0, 1.0))
        y0, y1 = panel.ylim or ((min(ys), max(ys)) if ys else (0.0, 1.0))
        if x1 <= x0:
            x1 = x0 + 1.0
        if y1 <= y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = 0.05 * (y1 - y0)
        if panel.ylim is None:
            y0, y1 = y0 - pad, y1 + pad

        sx = _axis(x0, x1, left, right)
        sy = _axis(y0, y1, bottom, ptop)

        draw.text((left, oy + 4), panel.title, fill=(20, 20, 20), font=font)
        for t in _nice_ticks(y0, y1):
            yy = sy(t)
            draw.line([(left, yy), (right, yy)], fill=(232, 232, 232))
            label = _tick_label(t)
            draw.text((left - 6 - small.getlength(label), yy - 6), label, fill=(60, 60, 60), font=small)
        for t in panel.xticks if panel.xticks is not None else _nice_ticks(x0, x1):
            xx = sx(t)
            draw.line([(xx, ptop), (xx, bottom)], fill=(232, 232, 232))
            label = _tick_label(t)
            draw.text((xx - small.getlength(label) / 2, bottom + 4), label, fill=(60, 60, 60), font=small)
        draw.rectangle([left, ptop, right, bottom], outline=(90, 90, 90))
        draw.text(
            ((left + right) / 2 - small.getlength(panel.xlabel) / 2, bottom + 20),
            panel.xlabel,
            fill=(40, 40, 40),
            font=small,
        )
        ylab = Image.new("RGBA", (int(small.getlength(panel.ylabel)) + 4, 16), (255, 255, 255, 0))
        ImageDraw.Draw(ylab).text((2, 1), panel.ylabel, fill=(40, 40, 40), font=small)
        ylab = ylab.rotate(90, expand=True)
        img.paste(ylab, (ox + 4, int((ptop + bottom) / 2 - ylab.height / 2)), ylab)

        for name, (sx_vals, sy_vals) in panel.series.items():
            pts = [
                (sx(float(a)), sy(float(b)))
                for a, b in zip(sx_vals, sy_vals)
                if math.isfinite(float(a)) and math.isfinite(float(b))
            ]
            if not pts:
                continue
            colour = colours[name]
            if name in dashed:
                _dashed(draw, pts, colour, 2)
            elif len(pts) > 1:
                draw.line(pts, fill=colour, width=2, joint="curve")
            if len(pts) <= 24:
                for x, y in pts:
                    draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)

    lx = pw * len(panels) + 6
    ly = top + 30
    for name in names:
        colour = colours[name]
        if name in dashed:
            _dashed(draw, [(lx, ly + 7), (lx + 18, ly + 7)], colour, 2, dash=4)
        else:
            draw.line([(lx, ly + 7), (lx + 18, ly + 7)], fill=colour, width=3)
        draw.text((lx + 24, ly), name, fill=(30, 30, 30), font=small)
        ly += 18
    if path is not None:
        img.save(path)
    return img


# ----------------------------------------------------------------------------- evaluation report

#: The columns of the results table; ``better`` is also what :meth:`EvalResults.best` ranks by.
COLUMNS = [
    Column("source", "source"),
    Column("n_pairs", "pairs", "{}"),
    Column("pointing", "pointing", better="up"),
    Column("pointing_class_mean", "pointing/class", better="up"),
    Column("miou", "mIoU", better="up"),
    Column("pixel_accuracy", "pixel acc", better="up"),
    Column("map", "mAP", better="up"),
    Column("fg_ap", "fg AP", better="up"),
    Column("pmiou", "p-mIoU", better="up"),
    Column("positive_auc", "pos AUC", "{:.4g}", better="down"),
    Column("negative_auc", "neg AUC", "{:.4g}", better="up"),
    Column("deletion_auc", "del AUC", "{:.4g}", better="down"),
    Column("insertion_auc", "ins AUC", "{:.4g}", better="up"),
    Column("text_positive_auc", "text pos AUC", "{:.4g}", better="down"),
    Column("text_negative_auc", "text neg AUC", "{:.4g}", better="up"),
    Column("sanity_change", "sanity change", better="up"),
    Column("sanity_rho_last", "rho all random"),
]
CSV_KEYS = [
    "source",
    "kind",
    "n_pairs",
    "pointing",
    "pointing_class_mean",
    "miou",
    "pixel_accuracy",
    "map",
    "fg_ap",
    "pmiou",
    "positive_auc",
    "negative_auc",
    "deletion_auc",
    "insertion_auc",
    "text_positive_auc",
    "text_negative_auc",
    "sanity_change",
    "sanity_rho_last",
]
#: The files :func:`write_results` makes (a restart removes them with the results).
REPORT_FILES = (
    "results.md",
    "results.csv",
    "summary.json",
    "perturbation.png",
    "deletion_insertion.png",
    "text_perturbation.png",
    "sanity.png",
)
_COLUMN_NOTES = """\
Columns: pointing = share of pairs whose map maximum lies on the object; pointing/class = the mean
over classes of each class's share (TorchRay's); mIoU, pixel acc: the segmentation protocol (map
thresholded at its mean); mAP = the literature's: AP of the two-channel score (1 - r, r) of the
min-max map r against one-hot labels (Chefer et al.'s script, TextSpan); fg AP = AP of the raw map
against the foreground alone; pos/neg AUC: Chefer et al.'s
perturbation test (target value while 0..90% of patches are removed, most / least relevant first;
trapezoid area, unnormalised); del/ins AUC: deletion / insertion (Petsiuk et al.) over 0..100%;
text pos/neg AUC: Chefer et al.'s text test (target value while 0..100% of the prompt's content
tokens are removed, most / least relevant first; metric text_perturbation, methods with token scores);
sanity change: 1 - mean Spearman correlation between the map of the trained model and the map after
randomising the top 1..L image blocks (0 = the map ignores the weights; above 1 = anti-correlated);
rho all random: that correlation with every image block randomised (near 0 passes the check).
Baselines do not read the model, so their sanity change is 0 by construction.
"""


def is_finite(v) -> bool:
    """A real number that is not NaN or infinite (bools and None are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def result_columns(rows: Sequence[dict]) -> list[Column]:
    """The columns of :data:`COLUMNS` that some row has a finite value for (source and pairs always)."""
    return [
        c for c in COLUMNS if c.key in ("source", "n_pairs") or any(is_finite(r.get(c.key)) for r in rows)
    ]


def column_heading(key: str) -> str:
    """The heading (title and arrow) of a column of :data:`COLUMNS`."""
    return next(c.heading for c in COLUMNS if c.key == key)


def report_markdown(results: EvalResults) -> str:
    """``results.md``: the command, the setting, the table, refusals, the best method per
    column and what the columns mean."""
    cfg = results.config
    lines = ["# cliplens evaluation", ""]
    if results.command:
        lines += ["```", results.command, "```", ""]
    lines += [
        (
            f"- model: `{cfg['model']}`; dataset: `{cfg['dataset']}`; items: {results.n_items}"
            f" ({results.n_skipped} skipped); explained pairs: {results.n_pairs}"
        ),
        (
            f"- target: `{cfg['target']}`; patch removal: `{cfg['removal']}`; seed: {cfg['seed']};"
            f" sanity check on the first {cfg['sanity_items']} items"
        ),
    ]
    if results.accuracy is not None:
        lines.append(
            f"- share of explained pairs whose class is the classifier's top-1 class: {results.accuracy:.3f}"
            " (at most one per image)"
        )
    lines += ["", results.markdown(), ""]
    for m, info in results.refused.items():
        lines.append(f"- `{m}` did not explain {info['items']} item(s): {info['reason']}")
    if results.refused:
        lines.append("")
    best = results.best()
    if best:
        lines.append(
            "Best method per column: "
            + "; ".join(f"{column_heading(k)}: **{v}**" for k, v in best.items())
            + "."
        )
        lines.append("")
    lines += [*_COLUMN_NOTES.splitlines(), ""]
    return "\n".join(lines)


def _chart_title(results: EvalResults) -> str:
    kind, _, path = str(results.config["dataset"]).partition(":")
    return f"{Path(str(results.config['model'])).name} · {kind}:{Path(path).name} · {results.n_pairs} pairs"


def write_results(results: EvalResults, out: str | Path) -> list[Path]:
    """results.md, results.csv, summary.json and the PNG charts into ``out`` (each written
    whole or not at all); returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("results.md", report_markdown(results)),
        ("results.csv", results.csv()),
        ("summary.json", json.dumps(results.to_dict(), indent=1)),
    ):
        atomic_write(out / name, text)
        written.append(out / name)
    dashed = list(BASELINES)
    charts = [
        ("perturbation.png", ("positive", "negative"), "fraction of patches removed", "target"),
        (
            "deletion_insertion.png",
            ("deletion", "insertion"),
            "fraction of patches removed / inserted",
            "target",
        ),
        ("text_perturbation.png", ("text_positive", "text_negative"), "fraction of prompt tokens removed", "target"),
    ]
    for name, kinds, xlabel, ylabel in charts:
        panels = [
            Panel(
                f"{kind} ({'lower' if kind in ('positive', 'deletion', 'text_positive') else 'higher'} is better)",
                xlabel,
                ylabel,
                dict(results.curves[kind]),
            )
            for kind in kinds
            if results.curves.get(kind)
        ]
        if panels:
            tmp = out / f".{name}.tmp.png"
            line_chart(panels, tmp, dashed=dashed, title=_chart_title(results))
            os.replace(tmp, out / name)
            written.append(out / name)
    if results.sanity:
        depth_series = {s: (list(range(1, len(v) + 1)), v) for s, v in results.sanity.items()}
        depth = max(len(v) for v in results.sanity.values())
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
