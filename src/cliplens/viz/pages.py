"""An :class:`~cliplens.explanation.Explanation` as page pieces: overlay files, one section per
image with a card per prompt, and the JSON entries beside them. ``cliplens explain``,
``cliplens demo`` and a web front end build their pages from these, so a card looks and reads
the same everywhere.

A pair whose target is constant by construction, or whose map is flat, gets the plain image
and a note instead of a heatmap: min-max stretching would turn rounding noise into a
confident-looking picture.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..explanation import Explanation
from ..files import slug
from .colors import colorize, normalise
from .html import Card, Section, colour_bar, fold, number, table, token_html, write_page
from .overlay import overlay

MODES = ("minmax", "positive", "signed")

#: longest side of the overlay pictures unless asked otherwise (None or 0: the source size)
DISPLAY_SIDE = 1024


def overlay_name(b: int, label: str, p: int, text: str) -> str:
    """File name of the overlay of image b (``label``: its path or name) with prompt p. The
    indices make it unique within a call whatever the labels and prompts are; the slugs keep
    it readable."""
    return f"{b:03d}-{slug(Path(label).stem)}__{p:02d}-{slug(text)}.png"


def display_range(grid: np.ndarray, mode: str = "minmax") -> tuple[float, float] | None:
    """The raw values the two ends of the palette stand for when a map is shown with
    normalisation ``mode``: (min, max) for minmax, (0, max) for positive, (-m, m) with m the
    largest magnitude for signed. None when the map has no finite value."""
    if mode not in MODES:
        raise ValueError(f"unknown normalisation {mode!r}")
    v = np.asarray(grid, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    if mode == "minmax":
        return float(v.min()), float(v.max())
    if mode == "positive":
        return 0.0, float(max(v.max(), 0.0))
    m = float(np.abs(v).max())
    return -m, m


#: how the palette's ends are chosen: per pair, or shared by every prompt of an image (so an
#: absent object's map no longer looks as hot as a present one's)
SCALES = ("pair", "image")


def pair_range(ex: Explanation, b: int, p: int, mode: str = "minmax", scale: str = "pair"):
    """The raw values the palette's ends stand for in pair (b, p)'s overlay: :func:`display_range`
    of its own map (``scale="pair"``), or of all maps of image b that get a heatmap (``"image"``)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}")
    if scale == "pair":
        return display_range(ex.grid_map(b, p), mode)
    notes = pair_notes(ex)[b]
    maps = [np.ravel(ex.grid_map(b, q)) for q in range(ex.shape[1]) if not notes[q]]
    return display_range(np.concatenate(maps), mode) if maps else None


def pair_notes(ex: Explanation) -> list[list[str | None]]:
    """[b][p]: why pair (b, p) gets no heatmap (its target is constant, or its map is flat),
    or None when it gets one."""
    B, P = ex.shape
    flat = ex.flat_pairs()
    notes: list[list[str | None]] = []
    for b in range(B):
        row: list[str | None] = []
        for p in range(P):
            reason = ex.constant_reason(p)
            if reason:
                row.append(f"nothing to explain: {reason}, so no heatmap is drawn")
            elif flat[b, p]:
                r = ex.map_range(b, p)
                value = "no finite value" if r is None else f"every value ≈ {number(r[0], 4)}"
                row.append(f"flat map ({value}): no heatmap is drawn")
            else:
                row.append(None)
        notes.append(row)
    return notes


def write_overlays(
    ex: Explanation,
    directory: str | Path,
    labels: Sequence[str],
    *,
    mode: str = "minmax",
    first_index: int = 0,
    max_side: int | None = DISPLAY_SIDE,
    scale: str = "pair",
) -> list[list[str]]:
    """Write one PNG per pair into ``directory``; [b][p] file names ("" where the method gave
    no image map). ``labels`` name the images (paths or names) for :func:`overlay_name`, whose
    index is ``first_index + b`` (callers writing several explanations into one folder give
    each its own range). The palette's ends are pinned to
    :func:`display_range`, so the colour bar of :func:`pair_card` reads true. A pair with a
    note (:func:`pair_notes`) gets its plain image, the parts the model never saw hatched."""
    B, P = ex.shape
    if len(labels) != B:
        raise ValueError(f"{len(labels)} labels for {B} images")
    directory = Path(directory)
    notes = pair_notes(ex)
    out = []
    for b in range(B):
        row = []
        for p in range(P):
            if ex.image_maps is None:
                row.append("")
                continue
            name = overlay_name(first_index + b, labels[b], p, ex.texts[p])
            if notes[b][p]:
                image = ex.overlay(b, p, alpha=0.0, max_side=max_side)
            else:
                image = ex.overlay(
                    b, p, mode=mode, value_range=pair_range(ex, b, p, mode, scale), max_side=max_side
                )
            image.save(directory / name)
            row.append(name)
        out.append(row)
    return out


def write_word_overlays(
    ex: Explanation,
    directory: str | Path,
    labels: Sequence[str],
    *,
    mode: str = "minmax",
    first_index: int = 0,
    max_side: int | None = DISPLAY_SIDE,
) -> list[list[dict[int, str]]]:
    """For a method with token x patch interactions: per pair, one overlay per content token of
    the prompt (its row of :meth:`Explanation.interaction_matrix` on the original image).
    Returns [b][p] {token index: file name}; empty
    for other methods and for pairs without a heatmap."""
    B, P = ex.shape
    if "interactions" not in ex.extras and "word_maps" not in ex.extras:
        return [[{} for _ in range(P)] for _ in range(B)]
    notes = pair_notes(ex)
    out = []
    for b in range(B):
        row = []
        for p in range(P):
            files: dict[int, str] = {}
            if not notes[b][p]:
                matrix = ex.word_matrix(b, p)
                stem = overlay_name(first_index + b, labels[b], p, ex.texts[p])[: -len(".png")]
                for t in np.flatnonzero(ex.content[p][: len(ex.tokens[p])]):
                    grid = matrix[t]
                    image, heat = ex.display_pair(b, grid, max_side)
                    name = f"{stem}__w{int(t):02d}.png"
                    overlay(image, heat, mode=mode, value_range=display_range(grid, mode)).save(
                        Path(directory) / name
                    )
                    files[int(t)] = name
            row.append(files)
        out.append(row)
    return out


def write_matrices(
    ex: Explanation, directory: str | Path, labels: Sequence[str], *, first_index: int = 0, cell: int = 8
) -> list[list[str]]:
    """For a method with token x patch interactions: per pair, a heat picture of its matrix,
    one row per content token and one column per patch (row-major over the grid), signed
    palette symmetric about 0. Returns [b][p] file names ("" where none)."""
    B, P = ex.shape
    if "interactions" not in ex.extras:
        return [[""] * P for _ in range(B)]
    out = []
    for b in range(B):
        row = []
        for p in range(P):
            matrix = ex.interaction_matrix(b, p)
            rows = matrix[ex.content[p][: len(ex.tokens[p])]].reshape(-1, matrix[0].size)
            if rows.size == 0 or not np.isfinite(rows).any():
                row.append("")
                continue
            rgb = colorize(normalise(rows, "signed"), signed=True)
            name = overlay_name(first_index + b, labels[b], p, ex.texts[p])[: -len(".png")] + "__matrix.png"
            Image.fromarray(np.repeat(np.repeat(rgb, cell, 0), cell, 1)).save(Path(directory) / name)
            row.append(name)
        out.append(row)
    return out


def write_interactions(ex: Explanation, directory: str | Path) -> str | None:
    """For a method with token x patch interactions: ``interactions.npz`` in ``directory`` with
    ``image_B`` (P, T, Gh, Gw) per image (rows: the prompt's tokens, NaN on padding) and, where
    the method gives them, ``image_const_B`` (P, T) and ``text_const_B`` (P, Gh, Gw). Returns the
    file name, or None for other methods."""
    if "interactions" not in ex.extras:
        return None
    arrays = {}
    for b in range(ex.shape[0]):
        arrays[f"image_{b}"] = np.asarray(ex.extra("interactions", b), dtype=np.float32)
        for key, name in (("interactions_image_const", "image_const"), ("interactions_text_const", "text_const")):
            if key in ex.extras:
                arrays[f"{name}_{b}"] = np.asarray(ex.extra(key, b), dtype=np.float32)
    name = "interactions.npz"
    np.savez_compressed(Path(directory) / name, **arrays)
    return name


def matrix_html(ex: Explanation, b: int, p: int, picture: str) -> str:
    """A folded block with the token x patch matrix picture of pair (b, p) and its token rows."""
    if not picture:
        return ""
    matrix = ex.interaction_matrix(b, p)
    toks = [tok for t, tok in enumerate(ex.tokens[p]) if ex.content[p, t]]
    m = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else float("nan")
    return (
        "<details class='matrix'><summary>token x patch matrix</summary>"
        f"<div class='note'>rows: {html.escape(' · '.join(toks))}; columns: the {matrix[0].size} patches, "
        "row by row</div>"
        f"<img src='{html.escape(picture)}' alt='token x patch matrix' style='width:100%'>"
        f"{colour_bar(-m, m, signed=True)}</details>"
    )


def probability_text(ex: Explanation, b: int, p: int) -> str:
    """The probability of pair (b, p) for display; a softmax over one prompt says that it is 1
    by construction."""
    if ex.shape[1] == 1 and ex.probability == "softmax":
        return f"{number(ex.probs[b, p])} (one-prompt softmax: 1 by construction)"
    return number(ex.probs[b, p])


def pair_card(
    ex: Explanation,
    b: int,
    p: int,
    overlay: str,
    *,
    mode: str = "minmax",
    note: str | None = None,
    extra: str = "",
    words: dict[int, str] | None = None,
    scale: str = "pair",
) -> Card:
    """The card of pair (b, p): its overlay with a colour bar labelled in raw map values (or
    ``note`` instead of a heatmap), the prompt (folded when long), logit and probability, the
    target's value when it is not the logit, token chips with their scores (hovering a chip
    shows its word map where ``words`` gives one: {token index: overlay file}), then ``extra``
    (HTML, for example a verdict)."""
    lines = [
        f"<b>{fold(ex.texts[p])}</b>",
        f"<span class='num'>logit {number(ex.logits[b, p])} · p {html.escape(probability_text(ex, b, p))}</span>",
    ]
    if ex.target != "logit":
        lines.append(
            f"<span class='num'>target {html.escape(ex.target)} = {number(ex.target_values[b, p])}</span>"
        )
    if ex.truncated[p]:
        lines.append("<span class='note'>prompt truncated to the model's context</span>")
    if extra:
        lines.append(extra)
    below = ""
    if ex.image_maps is not None:
        if note:
            below = f"<div class='nomap'>{html.escape(note)}</div>"
        else:
            r = ex.map_range(b, p)
            lo, hi = pair_range(ex, b, p, mode, scale) or (float("nan"), float("nan"))
            raw = "" if r is None or r == (lo, hi) else f"raw {number(r[0])} … {number(r[1])}"
            below = colour_bar(lo, hi, signed=mode == "signed", label=raw)
    tokens = ""
    if ex.token_scores is not None or words:
        content = [t for t in range(len(ex.tokens[p])) if ex.content[p, t]]
        images = ranges = None
        if words:
            images = [words.get(t, "") for t in content]
            matrix = ex.word_matrix(b, p)
            ranges = [display_range(matrix[t], mode) if t in words else None for t in content]
        if ex.token_scores is not None:
            table, coloured = ex.token_table(b, p), ex.constant_reason(p) is None
        else:  # per-word maps without token scores (LAVIS's Grad-CAM): grey chips to hover
            table, coloured = [(ex.tokens[p][t], float("nan")) for t in content], False
        tokens = token_html(table, coloured=coloured, images=images, ranges=ranges)
        if words:
            tokens += "<div class='note'>hover a word to see its map; click to keep it</div>"
    return Card(overlay, "".join(f"<div>{line}</div>" for line in lines), tokens, below)


def prompt_table(ex: Explanation, b: int) -> str:
    """Image b against every prompt: logit, probability (and the target when it is not the
    logit); the most probable prompt in bold."""
    P = ex.shape[1]
    header = ["prompt", "logit", "probability"] + (
        [html.escape(f"target {ex.target}")] if ex.target != "logit" else []
    )
    rows = []
    for p in range(P):
        row = [fold(ex.texts[p]), number(ex.logits[b, p]), html.escape(probability_text(ex, b, p))]
        if ex.target != "logit":
            row.append(number(ex.target_values[b, p]))
        rows.append(row)
    best = int(np.argmax(ex.probs[b])) if P > 1 else None
    return table(header, rows, highlight=best)


def image_sections(
    ex: Explanation,
    labels: Sequence[str],
    overlays: list[list[str]],
    *,
    mode: str = "minmax",
    words: list[list[dict[int, str]]] | None = None,
    matrices: list[list[str]] | None = None,
    scale: str = "pair",
) -> list[Section]:
    """One section per image (headed by its label): the table of its prompts, then a card per
    prompt (with word maps and the token x patch matrix where ``words`` / ``matrices`` from
    :func:`write_word_overlays` / :func:`write_matrices` give them)."""
    notes = pair_notes(ex)
    B, P = ex.shape
    return [
        Section(
            heading=str(labels[b]),
            html=prompt_table(ex, b),
            cards=[
                pair_card(
                    ex,
                    b,
                    p,
                    overlays[b][p],
                    mode=mode,
                    scale=scale,
                    note=notes[b][p],
                    words=words[b][p] if words else None,
                    extra=matrix_html(ex, b, p, matrices[b][p]) if matrices else "",
                )
                for p in range(P)
            ],
        )
        for b in range(B)
    ]


def results(
    ex: Explanation,
    labels: Sequence[str],
    overlays: list[list[str]],
    folder: str | Path,
    *,
    mode: str = "minmax",
    interactions: str | None = None,
) -> dict:
    """:meth:`Explanation.to_dict` with the files of a written page: each image's ``path`` and
    each pair's ``image`` (that path) and ``overlay``, relative to ``folder`` (where the
    results file lies), ``display`` (the normalisation of the overlays), and where
    ``interactions`` names the file of :func:`write_interactions`, a pointer to it."""
    d = ex.to_dict()
    paths = [_relative(label, folder) for label in labels]
    for im in d["images"]:
        im["path"] = paths[im["index"]]
    for entry in d["pairs"]:
        b, p = entry["image_index"], entry["prompt_index"]
        entry["image"] = paths[b]
        entry["overlay"] = overlays[b][p] or None
    d["display"] = {"normalise": mode}
    if interactions:
        d["interactions"] = {
            "file": interactions,
            "arrays": "image_B: (P, T, Gh, Gw) token x patch interactions of image B, rows as 'tokens' "
            "(NaN on padding); image_const_B (P, T), text_const_B (P, Gh, Gw): the constants' rows and columns",
        }
    return d


def write_folder(
    ex: Explanation,
    labels: Sequence[str],
    stage: str | Path,
    *,
    model: str,
    mode: str = "minmax",
    final: str | Path | None = None,
    max_side: int | None = DISPLAY_SIDE,
    scale: str = "pair",
) -> dict:
    """Write what ``cliplens explain`` writes into ``stage``: one overlay per pair, word maps and
    matrices where the method has interactions, ``results.json`` and ``index.html``. Paths in
    the results are relative to ``final`` (where the folder ends up; default ``stage``); overlays
    at ``max_side`` pixels at most, coloured per ``scale`` (:data:`SCALES`). Returns the results
    dict. The CLI and the web app both write their folders with this."""
    stage = Path(stage)
    final = stage if final is None else Path(final)
    overlays = write_overlays(ex, stage, labels, mode=mode, max_side=max_side, scale=scale)
    words = write_word_overlays(ex, stage, labels, mode=mode, max_side=max_side)
    matrices = write_matrices(ex, stage, labels)
    inter = write_interactions(ex, stage)
    res = results(ex, labels, overlays, final, mode=mode, interactions=inter)
    (stage / "results.json").write_text(json.dumps(res, indent=1, allow_nan=False), encoding="utf-8")
    intro = (
        f"<p class='note'>model <b>{html.escape(model)}</b> · method <b>{html.escape(ex.method)}</b> · "
        f"target <b>{html.escape(ex.target)}</b> · maps shown {mode}-normalised per {scale}, the colour "
        "bar under each labelled with the raw values of its ends; hatched = not seen by the model; token chips "
        "show raw scores; every number is in results.json</p>"
    )
    sections = image_sections(ex, labels, overlays, mode=mode, words=words, matrices=matrices, scale=scale)
    write_page(stage / "index.html", "cliplens explanation", sections, intro)
    return res


def _relative(path: str | os.PathLike, folder: str | Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()
