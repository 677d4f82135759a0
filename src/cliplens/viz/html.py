"""HTML primitives of self-contained pages: cards of overlays in a grid, sections, token
chips, colour bars, tables, and the page writer. What goes on a page of explanations is
:mod:`cliplens.viz.pages`."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .colors import colorize, normalise

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;overflow-wrap:anywhere}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:260px}
.card img{width:100%;image-rendering:auto;border-radius:3px;display:block}
.cap{font-size:.85em;margin-top:4px;overflow-wrap:anywhere} .num{font-family:monospace}
.tok{display:inline-flex;flex-direction:column;align-items:center;padding:1px 4px;margin:1px;border-radius:3px;
font-family:monospace;font-size:.85em;line-height:1.15}
.tok small{font-size:.75em;opacity:.9}
.toks{margin-top:4px}
.bar{height:9px;border-radius:2px;margin-top:3px}
.ends{display:flex;justify-content:space-between;font-family:monospace;font-size:.72em;color:#444}
.nomap{margin-top:3px;padding:3px 5px;background:#fff4e5;border:1px solid #f0c36d;border-radius:3px;font-size:.8em}
.ok{color:#1a7f37;font-weight:600} .bad{color:#b42318;font-weight:600}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0 .8em} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left;max-width:32em;overflow-wrap:anywhere}
tr.best td{font-weight:600}
details.fold summary{cursor:pointer} details.fold[open] summary{display:none}
.note{color:#555;font-size:.85em}
.tok.word{cursor:pointer;outline:1px dashed #888} .tok.word.pinned{outline:2px solid #111}
.matrix img{image-rendering:pixelated}
"""

#: hovering a word chip shows its map in the card's picture; a click keeps it until clicked again
_SCRIPT = """
function pic(t){return t.closest('.card').querySelector('img');}
function ends(t){return t.closest('.card').querySelectorAll('.ends')[0].querySelectorAll('span');}
function paint(t,src,lo,hi){const i=pic(t),e=ends(t);
 if(!i.dataset.orig){i.dataset.orig=i.getAttribute('src');i.dataset.lo=e[0].textContent;i.dataset.hi=e[e.length-1].textContent;}
 i.setAttribute('src',src);e[0].textContent=lo;e[e.length-1].textContent=hi;}
function show(t){paint(t,t.dataset.img,t.dataset.lo||'',t.dataset.hi||'');}
function back(t){const c=t.closest('.card'),p=c.querySelector('.tok.word.pinned'),i=pic(t);
 if(p)show(p);else if(i.dataset.orig)paint(t,i.dataset.orig,i.dataset.lo,i.dataset.hi);}
document.addEventListener('mouseover',e=>{const t=e.target.closest('.tok.word');if(t)show(t);});
document.addEventListener('mouseout',e=>{const t=e.target.closest('.tok.word');if(t)back(t);});
document.addEventListener('click',e=>{const t=e.target.closest('.tok.word');if(!t)return;
 const was=t.classList.contains('pinned');t.closest('.card').querySelectorAll('.tok.word.pinned').forEach(x=>x.classList.remove('pinned'));
 if(!was)t.classList.add('pinned');back(t);});
"""


def number(x: float | None, digits: int = 3) -> str:
    """A raw value for display: ``digits`` significant digits, '–' for None and NaN."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


def fold(text: str, limit: int = 60) -> str:
    """``text`` escaped; when longer than ``limit`` characters, folded: the start shows and a
    click opens the rest."""
    if len(text) <= limit:
        return html.escape(text)
    return (
        f"<details class='fold'><summary>{html.escape(text[:limit].rstrip())}…</summary>"
        f"{html.escape(text)}</details>"
    )


_BYTE_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


def merge_byte_tokens(table: list[tuple[str, float]]) -> list[tuple[str, float, list[int]]]:
    """Join runs of tokens that hold pieces of one multi-byte character (their loose bytes
    written ``\\xNN`` by the adapter) into whole characters, for display: (text, summed score,
    the indices of ``table`` joined). Tokens that are whole already pass through alone; a run
    whose bytes still do not decode is left as it was."""
    out: list[tuple[str, float, list[int]]] = []
    i = 0
    while i < len(table):
        tok, score = table[i]
        if not _BYTE_ESCAPE.search(tok):
            out.append((tok, score, [i]))
            i += 1
            continue
        j, data, joined = i, b"", None
        while j < len(table) and j - i < 8:  # a character is at most 4 bytes; tokens hold 1 or more
            data += _token_bytes(table[j][0])
            j += 1
            try:
                joined = data.decode("utf-8")
                break
            except UnicodeDecodeError:
                pass
        if joined is None:
            out.append((tok, score, [i]))
            i += 1
            continue
        out.append((joined, float(sum(s for _, s in table[i:j])), list(range(i, j))))
        i = j
    return out


def _token_bytes(tok: str) -> bytes:
    parts, last = [], 0
    for m in _BYTE_ESCAPE.finditer(tok):
        parts.append(tok[last : m.start()].encode("utf-8"))
        parts.append(bytes([int(m.group(1), 16)]))
        last = m.end()
    parts.append(tok[last:].encode("utf-8"))
    return b"".join(parts)


def token_html(
    table: list[tuple[str, float]],
    *,
    coloured: bool = True,
    images: list[str] | None = None,
    ranges: list[tuple[float, float] | None] | None = None,
) -> str:
    """Tokens as chips showing their raw score under them; the background shows the score
    (min-max over the prompt), or stays grey when ``coloured`` is False (scores that mean
    nothing, for example of a constant target). ``images``, one per chip ("" for none): the
    overlay a chip shows in its card while hovered (clicked: kept until clicked again), and
    ``ranges`` the raw values of that overlay's palette ends, shown on the card's colour bar."""
    if not table:
        return ""
    groups = merge_byte_tokens(table)
    if len(groups) < len(table):  # pieces of one character shown as one chip, scores summed
        images = [next((images[k] for k in g if images[k]), "") for *_, g in groups] if images else None
        ranges = [next((ranges[k] for k in g if ranges[k]), None) for *_, g in groups] if ranges else None
        table = [(t, s) for t, s, _ in groups]
    scores = np.array([s for _, s in table], dtype=np.float64)
    if coloured:
        colours = colorize(normalise(scores, "minmax"))
    else:
        colours = np.full((len(table), 3), 225, dtype=np.uint8)
    spans = []
    for i, ((tok, score), (r, g, b)) in enumerate(zip(table, colours)):
        light = 0.299 * r + 0.587 * g + 0.114 * b
        fg = "#000" if light > 140 else "#fff"
        link = images[i] if images else ""
        data = f' data-img="{html.escape(link)}"' if link else ""
        if link and ranges and ranges[i]:
            data += f' data-lo="{number(ranges[i][0])}" data-hi="{number(ranges[i][1])}"'
        spans.append(
            f'<span class="tok{" word" if link else ""}"{data} style="background:rgb({r},{g},{b});color:{fg}" '
            f'title="{score:.6g}">{html.escape(tok)}<small>{number(score)}</small></span>'
        )
    return "<div class='toks'>" + "".join(spans) + "</div>"


def colour_bar(lo: float, hi: float, *, signed: bool = False, label: str = "") -> str:
    """The palette as a bar, its ends labelled with the raw values they stand for."""
    stops = np.linspace(-1, 1, 9) if signed else np.linspace(0, 1, 9)
    colours = colorize(stops, signed=signed)
    gradient = ", ".join(f"rgb({r},{g},{b})" for r, g, b in colours)
    middle = f"<span>{html.escape(label)}</span>" if label else ""
    return (
        f"<div class='bar' style='background:linear-gradient(to right, {gradient})'></div>"
        f"<div class='ends'><span>{number(lo)}</span>{middle}<span>{number(hi)}</span></div>"
    )


def table(header: Iterable[str], rows: Iterable[Iterable[str]], *, highlight: int | None = None) -> str:
    """An HTML table; cells are HTML (escape user text before). Row ``highlight`` is bold."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        f"<tr{' class=best' if i == highlight else ''}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


@dataclass
class Card:
    image: str  # path relative to the page; "" for a card without a picture
    caption: str  # HTML allowed (escape user text before)
    tokens: str = ""  # HTML from token_html
    below: str = ""  # HTML right under the picture (colour bar, a note instead of a map)


@dataclass
class Section:
    heading: str
    cards: list[Card] = field(default_factory=list)
    html: str = ""  # free HTML placed before the cards (tables, notes)


def card_html(card: Card) -> str:
    img = f"<img src='{html.escape(card.image)}' alt=''>" if card.image else ""
    return f"<div class='card'>{img}{card.below}<div class='cap'>{card.caption}</div>{card.tokens}</div>"


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
            parts.extend(card_html(card) for card in sec.cards)
            parts.append("</div>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
