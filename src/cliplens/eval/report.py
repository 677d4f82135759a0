"""Tables (terminal, Markdown, CSV) and line charts drawn with PIL (no matplotlib).

A table is a list of column specs and a list of row dicts; a chart is one or more panels of
(x, y) series sharing a legend.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["Column", "Panel", "csv_text", "format_value", "line_chart", "markdown_table", "text_table"]


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
