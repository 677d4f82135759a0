"""``cliplens demo``: one shapes-world scene explained by every registered method, offline.

The scene's ground-truth masks say whether each method's peak lands on the object a caption
names, so the page shows at a glance which explanations point at the right thing.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters import ALIASES, load_model
from .api import explain, similarity
from .errors import InputError
from .files import staged_dir
from .methods import REGISTRY
from .viz import pages
from .viz.html import Section, write_page
from .worlds import shapes

FLAT = "flat map"  # what DemoRow.peak_on says where a map has no peak

#: the fusion model the demo adds beside the main one (image and text scored together)
FUSION_DEMO_MODEL = "shapes-blip"


def embedded_model_present(name: str) -> bool:
    """Whether ``name`` is an embedded model whose files this install has."""
    return name in ALIASES and (ALIASES[name] / "config.json").is_file()


@dataclass
class DemoRow:
    method: str
    seconds: float
    hits: list[bool | None] = field(default_factory=list)  # per prompt; None for the absent prompt
    peak_on: list[str] = field(default_factory=list)  # label of the object under the peak, "background" or FLAT


def peak_object(grid_map: np.ndarray, geometry, scene: shapes.Scene) -> str:
    """Label of the object the map's top patch lies on: the object covering most pixels of
    that patch's footprint on the original image; "background" if none does."""
    if not np.isfinite(grid_map).any():
        return "nothing"
    gh, gw = grid_map.shape
    i, j = np.unravel_index(np.nanargmax(grid_map), grid_map.shape)
    w_in, h_in = geometry.input_size
    ph, pw = h_in / gh, w_in / gw
    x0, y0, x1, y1 = geometry.input_to_original_box((j * pw, i * ph, (j + 1) * pw, (i + 1) * ph))
    h, w = scene.objects[0].mask.shape
    ys = slice(max(0, int(np.floor(y0))), min(h, int(np.ceil(y1))))
    xs = slice(max(0, int(np.floor(x0))), min(w, int(np.ceil(x1))))
    cover = [int(obj.mask[ys, xs].sum()) for obj in scene.objects]
    if max(cover, default=0) == 0:
        return "background"
    return scene.objects[int(np.argmax(cover))].label


def run_demo(out: str | Path, *, seed: int = 0, model="shapes", methods: list[str] | None = None,
             n_objects: int = 3, size: int = shapes.DEFAULT_SIZE, progress: bool = True,
             device=None, dtype="float32", fusion_model: str | None = FUSION_DEMO_MODEL) -> list[DemoRow]:
    """Draw scene ``seed``, explain each object's caption and one absent caption with every
    method, and write ``index.html`` plus PNGs into ``out``. Returns one row per method.

    ``methods`` None: every method the model can run. ``fusion_model`` (default: the embedded
    shapes BLIP, when this install has it; None: none): a second model, one that scores image
    and text together, whose methods join the page and the table as ``MODEL: METHOD``.

    A method "hits" when its top patch lies on the object the caption names (the object
    covering most of that patch; see :func:`peak_object`). ``device`` and ``dtype`` (a name
    such as ``"bfloat16"`` or a torch dtype) are those the model loads with; maps and scores
    come back in float whatever the dtype."""
    for name in methods or []:
        if name not in REGISTRY:
            raise InputError(f"unknown method {name!r}; available: {', '.join(n for n in REGISTRY if not n.startswith('_'))}")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    adapter = load_model(model, device=device, dtype=dtype)
    models = [(adapter, methods or runnable_methods(adapter), "")]
    if fusion_model is not None and fusion_model != model and embedded_model_present(fusion_model):
        second = load_model(fusion_model, device=device, dtype=dtype)
        names = [m for m in runnable_methods(second) if methods is None or m in methods]
        models.append((second, names, f"{fusion_model}: "))
    scene = shapes.make_scene(seed, n_objects=n_objects, size=size)
    rng = np.random.default_rng(seed)
    absent = shapes.absent_labels(scene)
    absent_label = absent[int(rng.integers(len(absent)))]
    labels = scene.labels + [absent_label]
    prompts = [shapes.caption(label) for label in labels]
    present = [True] * len(scene.labels) + [False]

    all_caps = shapes.all_captions()
    _, zs_probs = similarity(adapter, scene.image, all_caps)
    ranking = np.argsort(-zs_probs[0])

    rows: list[DemoRow] = []
    sections: list[Section] = []
    with staged_dir(out) as stage:
        scene.image.save(stage / "scene.png")
        for explainer, names, prefix in models:
            for name in names:
                t0 = time.perf_counter()
                ex = explain(explainer, scene.image, prompts, method=name)
                row = DemoRow(prefix + name, time.perf_counter() - t0)
                overlays = pages.write_overlays(ex, stage, [(prefix + name).replace(": ", "-")], first_index=len(rows))
                notes = pages.pair_notes(ex)
                section = Section(heading=f"{prefix}{name} — {REGISTRY[name].describe(explainer)}")
                for p, prompt in enumerate(prompts):
                    # a flat map has no peak; its argmax would be an arbitrary patch
                    on = FLAT if notes[0][p] else peak_object(ex.grid_map(0, p), ex.geometries[0], scene)
                    hit = (on == labels[p]) if present[p] else None
                    row.hits.append(hit)
                    row.peak_on.append(on)
                    where = "no peak (flat map)" if on == FLAT else f"peak on {html.escape(on)}"
                    verdict = (
                        "<span class='ok'>peak on the object</span>" if hit
                        else f"<span class='bad'>{where}</span>" if hit is False
                        else f"absent object; {where}"
                    )
                    section.cards.append(pages.pair_card(ex, 0, p, overlays[0][p], note=notes[0][p], extra=verdict))
                sections.append(section)
                rows.append(row)
                if progress:
                    print(f"  {row.method:<16} {_hit_text(row)}  ({row.seconds:.1f}s)", flush=True)

        top = "".join(
            f"<tr><td>{html.escape(all_caps[i])}</td><td>{zs_probs[0, i]:.3f}</td>"
            f"<td>{'present' if all_caps[i] in prompts[:-1] else ''}</td></tr>"
            for i in ranking[:8]
        )
        summary = "".join(
            f"<tr><td>{html.escape(r.method)}</td>"
            + "".join(
                f"<td class='{'ok' if h else 'bad' if h is False else ''}'>{html.escape(on)}</td>"
                for h, on in zip(r.hits, r.peak_on)
            )
            + f"<td>{r.seconds:.2f}</td></tr>"
            for r in rows
        )
        head = "".join(f"<th>{html.escape(p)}</th>" for p in prompts)
        fusion_note = (
            f" · then <b>{html.escape(models[1][0].name)}</b>, a model that scores image and text together "
            "(its rows are prefixed with its name)"
            if len(models) > 1
            else ""
        )
        intro = (
            f"<p class='note'>model <b>{html.escape(adapter.name)}</b>{fusion_note} · scene seed {seed} · "
            f"{len(scene.objects)} objects · maps min-max normalised per panel, the colour bar under each labelled with "
            "the raw values of its ends; token chips show raw scores</p>"
            f"<div class='grid'><div class='card'><img src='scene.png' alt='scene'><div class='cap'>the scene: "
            f"{html.escape(', '.join(scene.labels))}</div></div>"
            f"<div><b>zero-shot over all {len(all_caps)} captions ({html.escape(adapter.name)})</b><table><tr><th>caption</th><th>p</th><th></th></tr>"
            f"{top}</table></div></div>"
            f"<h2>Where each method's peak lands</h2><table><tr><th>method</th>{head}<th>seconds</th></tr>{summary}</table>"
            "<p class='note'>green: the peak lies on the object the caption names; the last prompt names an "
            "object that is not in the scene.</p>"
        )
        write_page(stage / "index.html", "cliplens demo: the shapes world", sections, intro)
    return rows


def runnable_methods(adapter) -> list[str]:
    """Every registered method this model can run with its default options."""
    out = []
    for name, cls in REGISTRY.items():
        meth = cls()
        if not name.startswith("_") and meth.unsupported(adapter, meth.towers, meth.parse_options({})) is None:
            out.append(name)
    return out


def _hit_text(row: DemoRow) -> str:
    scored = [h for h in row.hits if h is not None]
    return f"peak on the named object {sum(scored)}/{len(scored)}"


def summary_table(rows: list[DemoRow]) -> str:
    width = max(len(r.method) for r in rows)
    lines = [f"{'method':<{width}}  peak on object  seconds"]
    for r in rows:
        scored = [h for h in r.hits if h is not None]
        lines.append(f"{r.method:<{width}}  {sum(scored)}/{len(scored):<13} {r.seconds:7.2f}")
    return "\n".join(lines)
