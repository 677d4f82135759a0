"""HTML primitives of self-contained pages: cards of overlays in a grid, sections, token
heatmaps, and the page writer. What goes on a page of explanations is :mod:`cliplens.viz.pages`."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .colors import colorize, normalise

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:260px}
.card img{width:100%;image-rendering:auto;border-radius:3px}
.cap{font-size:.85em;margin-top:4px} .num{font-family:monospace}
.tok{display:inline-block;padding:1px 3px;margin:1px;border-radius:3px;font-family:monospace;font-size:.85em}
.ok{color:#1a7f37;font-weight:600} .bad{color:#b42318;font-weight:600}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.85em}
"""


def token_html(table: list[tuple[str, float]]) -> str:
    """Tokens as inline spans whose background shows the score (min-max over the prompt)."""
    if not table:
        return ""
    scores = np.array([s for _, s in table], dtype=np.float64)
    colours = colorize(normalise(scores, "minmax"))
    spans = []
    for (tok, score), (r, g, b) in zip(table, colours):
        light = 0.299 * r + 0.587 * g + 0.114 * b
        fg = "#000" if light > 140 else "#fff"
        spans.append(
            f'<span class="tok" style="background:rgb({r},{g},{b});color:{fg}" '
            f'title="{score:.4g}">{html.escape(tok)}</span>'
        )
    return "".join(spans)


@dataclass
class Card:
    image: str  # path relative to the page
    caption: str  # HTML allowed (escape user text before)
    tokens: str = ""  # HTML from token_html


@dataclass
class Section:
    heading: str
    cards: list[Card] = field(default_factory=list)
    html: str = ""  # free HTML placed before the cards (tables, notes)


def write_page(path: str | Path, title: str, sections: list[Section], intro: str = "") -> Path:
    """Write one HTML page. Every image is referenced by a relative path."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        intro,
    ]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.heading)}</h2>")
        parts.append(sec.html)
        if sec.cards:
            parts.append("<div class='grid'>")
            for card in sec.cards:
                parts.append(
                    f"<div class='card'><img src='{html.escape(card.image)}' alt=''>"
                    f"<div class='cap'>{card.caption}</div><div>{card.tokens}</div></div>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
