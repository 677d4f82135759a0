"""The web app without the web framework: validating a form, running it on the one loaded model,
rendering the results as page sections, and the per-process folder everything is written to.

:mod:`cliplens.app.server` only maps HTTP onto this module, so everything here is testable
without a server, and a user error is always a one-line :class:`~cliplens.errors.CliplensError`
that the server turns into HTTP 400.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..api import ExplainRequest, explain_request
from ..errors import CliplensError, ImageError, InputError
from ..explanation import Explanation
from ..images import load_image
from ..methods import REGISTRY
from ..viz import pages
from ..viz.html import card_html, number
from ..worlds import shapes

log = logging.getLogger("cliplens.app")

#: the options the form offers, and the methods that take each (read from the registry)
FORM_OPTIONS = ("start_layer", "layers")
TARGETS = ("logit", "probability", "contrast")
MODES = pages.MODES
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def public_methods(adapter=None) -> list[str]:
    """Every registered method; given an ``adapter``, those it can run (a fusion model runs a few)."""
    names = [name for name in REGISTRY if not name.startswith("_")]
    if adapter is None:
        return names
    runs = [n for n in names if (m := REGISTRY[n]()).unsupported(adapter, m.towers, m.parse_options({})) is None]
    # a dual encoder's tower-specific refusals are shown as errors, not hidden
    return runs if adapter.fusion else names


@dataclass(frozen=True)
class Limits:
    """What one request may ask. Every limit is checked before the model runs."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 16_000_000
    max_prompts: int = 12
    max_prompt_chars: int = 200
    max_scene_seed: int = 99_999
    kept_jobs: int = 24  # finished runs kept (their folders too); older ones are removed
    max_waiting: int = 8  # runs queued or running at once, all tabs together


@dataclass
class RunSpec:
    """A validated form: the image, where it came from, and one request per method."""

    image: Image.Image
    source: str  # "scene 3" or "upload"
    scene: shapes.Scene | None
    requests: list[ExplainRequest]
    options: dict[str, int]


@dataclass
class Job:
    id: str
    spec: RunSpec
    folder: Path
    status: str = "queued"  # queued, running, done, error
    done: int = 0
    current: str = ""
    error: str | None = None
    explanations: dict[str, Explanation] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.spec.requests)

    def progress(self) -> dict:
        return {
            "job": self.id,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "current": self.current,
            "error": self.error,
        }


# ---- reading the form ---------------------------------------------------------------------------


def _one(fields: Mapping[str, object], name: str, default: str = "") -> str:
    value = fields.get(name, default)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else default
    return str(value if value is not None else default).strip()


def _int(text: str, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if not re.fullmatch(r"-?\d{1,9}", text):
        raise InputError(f"{what} must be an integer, got {text[:40]!r}")
    value = int(text)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{what} must be between {lo} and {hi}, got {value}")
    return value


def parse_prompts(text: str, limits: Limits) -> list[str]:
    """One prompt a line; blank lines are skipped."""
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompts: type at least one, one a line")
    if len(prompts) > limits.max_prompts:
        raise InputError(f"{len(prompts)} prompts; at most {limits.max_prompts} are allowed")
    for i, prompt in enumerate(prompts, 1):
        if len(prompt) > limits.max_prompt_chars:
            raise InputError(
                f"prompt {i} has {len(prompt)} characters; at most {limits.max_prompt_chars} are allowed"
            )
    return prompts


def read_upload(data: bytes, folder: Path, limits: Limits) -> Image.Image:
    """Bytes from the browser as an RGB image, through :func:`load_image` and its pixel budget.
    Messages never name the server's file."""
    if not data:
        raise ImageError("the uploaded file is empty")
    if len(data) > limits.max_upload_bytes:
        raise ImageError(f"the upload is {len(data)} bytes; at most {limits.max_upload_bytes} are allowed")
    path = folder / f"upload-{secrets.token_hex(6)}"
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return load_image(path, max_pixels=limits.max_pixels)
    except ImageError as exc:
        message = str(exc).replace(str(path), "the uploaded file").split("; raise it with")[0]
        raise ImageError(message) from None
    finally:
        path.unlink(missing_ok=True)


def scene(seed: int) -> shapes.Scene:
    return shapes.make_scene(seed)


def scene_prompts(sc: shapes.Scene) -> list[str]:
    """Each object's caption and one absent object's, as the demo does."""
    absent = shapes.absent_labels(sc)
    rng = np.random.default_rng(sc.seed)
    return [shapes.caption(label) for label in sc.labels] + [
        shapes.caption(absent[int(rng.integers(len(absent)))])
    ]


def parse_form(
    fields: Mapping[str, object], upload: bytes | None, limits: Limits, scratch: Path, adapter=None
) -> RunSpec:
    """Everything the form asks, checked before any model runs; a bad value is one
    :class:`InputError` line. ``fields``: name -> str or list of str (``methods`` repeats)."""
    prompts = parse_prompts(_one(fields, "prompts"), limits)
    methods = fields.get("methods", [])
    methods = [methods] if isinstance(methods, str) else [str(m) for m in methods]
    methods = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not methods:
        raise InputError("choose at least one method")
    for name in methods:
        if name not in public_methods():
            raise InputError(f"unknown method {name[:40]!r}; available: {', '.join(public_methods())}")
    options: dict[str, int] = {}
    for name in FORM_OPTIONS:
        text = _one(fields, name)
        if text:
            options[name] = _int(text, name.replace("_", " "))
    target = _one(fields, "target", "logit")
    if target not in TARGETS:
        raise InputError(f"unknown target {target[:40]!r}; choose logit, probability or contrast")
    if target == "contrast":
        other = _one(fields, "contrast")
        if not other:
            raise InputError("the contrast target needs the other prompt (its text or its number, from 0)")
        target = f"contrast:{other}"
    requests = []
    for name in methods:
        takes = REGISTRY[name].options
        opts = {k: v for k, v in options.items() if k in takes}
        request = ExplainRequest.build(prompts, name, target=target, options=opts)
        if adapter is not None:
            why = request.method.unsupported(adapter, request.towers, request.method.parse_options(opts))
            if why:
                raise InputError(why)
        requests.append(request)

    source = _one(fields, "source", "scene")
    if source == "upload":
        if upload is None:
            raise ImageError("no image uploaded: choose a file, or pick a demo scene")
        return RunSpec(read_upload(upload, scratch, limits), "upload", None, requests, options)
    if source != "scene":
        raise InputError(f"unknown image source {source[:40]!r}; choose scene or upload")
    seed = _int(_one(fields, "scene", "0"), "scene number", lo=0, hi=limits.max_scene_seed)
    sc = scene(seed)
    return RunSpec(sc.image, f"scene {seed}", sc, requests, options)


# ---- ground truth on shapes scenes -------------------------------------------------------------


def outline_image(sc: shapes.Scene, width: int = 2) -> Image.Image:
    """A transparent RGBA picture of the scene's size: each object's visible-mask outline,
    white on a dark rim, so it reads on any heatmap."""
    h, w = sc.objects[0].mask.shape
    rgba = np.zeros((h, w, 4), np.uint8)

    def ring(mask: np.ndarray, k: int) -> np.ndarray:
        inner = mask.copy()
        for _ in range(k):
            shrunk = inner.copy()
            shrunk[1:] &= inner[:-1]
            shrunk[:-1] &= inner[1:]
            shrunk[:, 1:] &= inner[:, :-1]
            shrunk[:, :-1] &= inner[:, 1:]
            inner = shrunk
        return mask & ~inner

    for obj in sc.objects:
        rgba[ring(obj.mask, width + 1)] = (20, 20, 20, 255)
        rgba[ring(obj.mask, width)] = (255, 255, 255, 255)
    return Image.fromarray(rgba, "RGBA")


def named_object(sc: shapes.Scene, prompt: str) -> str | None:
    """The scene object a prompt names (its label, e.g. 'red circle', appears in it), or None
    when it names none or several."""
    text = " ".join(prompt.lower().split())
    hits = [obj.label for obj in sc.objects if obj.label in text]
    return hits[0] if len(set(hits)) == 1 else None


def peak_on(ex: Explanation, p: int, sc: shapes.Scene, note: str | None) -> str | None:
    """Label of the object under the map's peak, "background", FLAT for a map with no peak, or
    None where the method gives no image map."""
    from ..demo import FLAT, peak_object

    if ex.image_maps is None:
        return None
    return FLAT if note else peak_object(ex.grid_map(0, p), ex.geometries[0], sc)


def verdict(ex: Explanation, p: int, sc: shapes.Scene, note: str | None) -> str:
    """HTML: where the map's peak lies, and whether that is the object the prompt names."""
    on = peak_on(ex, p, sc, note)
    if on is None:
        return ""
    named = named_object(sc, ex.texts[p])
    where = "no peak (flat map)" if note else f"peak on {on}"
    if named is None:
        return f"<div class='note verdict'>names no single scene object; {html.escape(where)}</div>"
    if on == named:
        return "<div class='ok verdict'>peak on the named object</div>"
    return f"<div class='bad verdict'>{html.escape(where)}, not the {html.escape(named)}</div>"


def peak_table(explanations: Mapping[str, Explanation], sc: shapes.Scene) -> str:
    """HTML: per method, the object under its peak for each prompt (green on the named object,
    red elsewhere, plain for a prompt naming no single object) and its hits."""
    first = next(iter(explanations.values()))
    named = [named_object(sc, t) for t in first.texts]
    head = "".join(f"<th>{html.escape(t)}</th>" for t in first.texts)
    rows = []
    for name, ex in explanations.items():
        notes = pages.pair_notes(ex)[0]
        cells, hits = [], 0
        for p in range(len(first.texts)):
            on = peak_on(ex, p, sc, notes[p])
            cls = "" if on is None or named[p] is None else "ok" if on == named[p] else "bad"
            hits += cls == "ok"
            cells.append(f"<td class='{cls}'>{html.escape(on or '–')}</td>")
        scored = sum(n is not None for n in named)
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}<td>{hits}/{scored}</td></tr>")
    return (
        "<h2>Where each method's peak lies</h2>"
        f"<table class='peaks'><tr><th>method</th>{head}<th>on the named object</th></tr>{''.join(rows)}</table>"
        "<p class='note'>the object covering most of the peak patch; green: the object the prompt names</p>"
    )


# ---- the service: one model, a folder, the runs --------------------------------------------------


class Service:
    """The model (loaded once), the per-process folder (removed by :meth:`close`) and the
    runs. Runs execute one at a time on a worker thread each; the model lock queues them, so
    two browser tabs can submit at once."""

    def __init__(self, adapter, limits: Limits | None = None, root: str | Path | None = None):
        self.adapter = adapter
        self.limits = limits or Limits()
        self.root = Path(tempfile.mkdtemp(prefix="cliplens-app-", dir=root))
        self.scratch = self.root / "scratch"
        self.scratch.mkdir()
        self._model_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._render_lock = threading.Lock()  # a view writes its overlays once, whoever asks first
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._threads: list[threading.Thread] = []
        from .evaluation import Evaluations

        self.evals = Evaluations(adapter, self.root, self._model_lock)

    # lifecycle
    def close(self) -> None:
        self.evals.close()
        for t in self._threads:
            t.join(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    # runs
    def submit(self, fields: Mapping[str, object], upload: bytes | None, *, wait: bool = False) -> Job:
        spec = parse_form(fields, upload, self.limits, self.scratch, self.adapter)
        with self._jobs_lock:
            busy = sum(j.status in ("queued", "running") for j in self._jobs.values())
        if busy >= self.limits.max_waiting:
            raise InputError(f"{busy} runs are waiting already; try again when one has finished")
        job_id = secrets.token_hex(8)
        folder = self.root / job_id
        folder.mkdir()
        spec.image.save(folder / "image.png")
        if spec.scene is not None:
            outline_image(spec.scene).save(folder / "outlines.png")
        job = Job(job_id, spec, folder)
        with self._jobs_lock:
            self._jobs[job_id] = job
            self._forget_old()
        thread = threading.Thread(target=self._run, args=(job,), name=f"cliplens-run-{job_id}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        if wait:
            thread.join()
        return job

    def job(self, job_id: str) -> Job:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise InputError("no such run (it may have been removed to make room for newer ones)")
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in ("done", "error")]
        for old in finished[: max(0, len(finished) - self.limits.kept_jobs)]:
            del self._jobs[old.id]
            shutil.rmtree(old.folder, ignore_errors=True)

    def _run(self, job: Job) -> None:
        try:
            with self._model_lock:
                job.status = "running"
                label = str(job.folder / "image.png")
                for request in job.spec.requests:
                    name = request.method.name
                    job.current = name
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ex = explain_request(self.adapter, [job.spec.image], request)
                    sub = job.folder / name
                    sub.mkdir()
                    pages.write_folder(ex, [label], sub, model=self.adapter.name)
                    job.explanations[name] = ex
                    job.seconds[name] = time.perf_counter() - t0
                    job.done += 1
            job.current = ""
            job.status = "done"
        except CliplensError as exc:
            job.error, job.status = " ".join(str(exc).split()), "error"
        except Exception:  # a bug: the log gets the traceback, the page one line
            log.exception("run %s failed", job.id)
            job.error, job.status = (
                "internal error while explaining (the server log has the details)",
                "error",
            )

    # files
    def file(self, job_id: str, parts: Sequence[str]) -> Path:
        """A file a run wrote, by its name inside the run's folder; nothing else is reachable."""
        job = self.job(job_id)
        if not parts or len(parts) > 2 or not all(_NAME.match(p) and ".." not in p for p in parts):
            raise InputError("no such file")
        path = job.folder.joinpath(*parts)
        if not path.resolve().is_relative_to(job.folder.resolve()) or not path.is_file():
            raise InputError("no such file")
        return path

    def zip(self, job: Job) -> Path:
        """The run as a zip: image.png and one folder per method holding what ``cliplens
        explain`` writes (index.html, results.json, overlays)."""
        if job.status != "done":
            raise InputError("the run has not finished")
        path = job.folder / "cliplens-results.zip"
        if not path.exists():
            tmp = path.with_suffix(".partial")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.write(job.folder / "image.png", "cliplens-results/image.png")
                for name in job.explanations:
                    for f in sorted((job.folder / name).iterdir()):
                        zf.write(f, f"cliplens-results/{name}/{f.name}")
            tmp.replace(path)
        return path

    # the page
    def render(self, job: Job, mode: str = "minmax") -> str:
        """The results of a finished run as HTML: the prompts' scores, then per prompt the
        original image (with ground-truth outlines on a scene) and every method side by side."""
        if mode not in MODES:
            raise InputError(f"unknown view {mode[:20]!r}; choose {', '.join(MODES)}")
        if job.status != "done":
            raise InputError("the run has not finished")
        with self._render_lock:
            return self._render(job, mode)

    def _render(self, job: Job, mode: str) -> str:
        base = f"files/{job.id}/"
        label = str(job.folder / "image.png")
        views = {}
        for name, ex in job.explanations.items():
            folder = name if mode == "minmax" else f"{mode}-{name}"
            if not (job.folder / folder).is_dir():
                (job.folder / folder).mkdir()
                pages.write_overlays(ex, job.folder / folder, [label], mode=mode)
                pages.write_word_overlays(ex, job.folder / folder, [label], mode=mode)
            names = _overlay_names(ex, label)
            words = _word_names(ex, label)
            matrices = [
                n[: -len(".png")] + "__matrix.png"
                if n and (job.folder / name / (n[: -len(".png")] + "__matrix.png")).is_file()
                else ""
                for n in names
            ]
            views[name] = (folder, names, words, matrices)
        first = next(iter(job.explanations.values()))
        sc = job.spec.scene
        opts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in job.spec.options.items()) or "defaults"
        parts = [
            f"<p class='note meta'>model <b>{html.escape(self.adapter.name)}</b> · image <b>{html.escape(job.spec.source)}</b>"
            f" · target <b>{html.escape(first.target)}</b> · options: {html.escape(opts)} · "
            + " · ".join(f"{html.escape(n)} {s:.2f}s" for n, s in job.seconds.items())
            + "</p>",
            "<h2>The image against every prompt</h2>",
            pages.prompt_table(first, 0),
        ]
        if sc is not None:
            parts.append(peak_table(job.explanations, sc))
        for p, text in enumerate(first.texts):
            cards = [self._original_card(job, first, p, base)]
            for name, ex in job.explanations.items():
                folder, names, words, matrices = views[name]
                note = pages.pair_notes(ex)[0][p]
                extra = verdict(ex, p, sc, note) if sc is not None else ""
                if matrices[p]:
                    extra += pages.matrix_html(ex, 0, p, base + f"{name}/{matrices[p]}")
                overlay = base + f"{folder}/{names[p]}" if names[p] else ""
                wmap = (
                    {t: base + f"{folder}/{f}" for t, f in words[p].items()}
                    if words[p] and not note
                    else None
                )
                card = pages.pair_card(ex, 0, p, overlay, mode=mode, note=note, extra=extra, words=wmap)
                card.caption = f"<div class='method'>{html.escape(name)}</div>" + card.caption
                parts_html = card_html(card)
                if sc is not None and overlay:
                    # after the overlay: the word-map script swaps the card's first picture
                    head, sep, tail = parts_html.partition("alt=''>")
                    outline = f"<img class='outline' src='{base}outlines.png' alt=''>"
                    parts_html = (
                        head.replace("<div class='card'>", "<div class='card gt'>", 1) + sep + outline + tail
                    )
                cards.append(parts_html)
            parts.append(
                f"<h2 class='prompt'>{html.escape(text)}</h2><div class='grid'>{''.join(cards)}</div>"
            )
        return "\n".join(parts)

    def _original_card(self, job: Job, ex: Explanation, p: int, base: str) -> str:
        sc = job.spec.scene
        lines = [
            "<div class='method'>original</div>",
            f"<div class='num'>logit {number(ex.logits[0, p])} · p {html.escape(pages.probability_text(ex, 0, p))}</div>",
        ]
        outline = ""
        if sc is not None:
            outline = f"<img class='outline' src='{base}outlines.png' alt=''>"
            named = named_object(sc, ex.texts[p])
            lines.append(
                "<div class='note'>outlines: ground-truth masks of "
                + html.escape(", ".join(sc.labels))
                + (
                    f"; the prompt names the {html.escape(named)}"
                    if named
                    else "; the prompt names no single object"
                )
                + "</div>"
            )
        cls = "card gt" if sc is not None else "card"
        return (
            f"<div class='{cls}'><img src='{base}image.png' alt='original'>{outline}"
            f"<div class='cap'>{''.join(lines)}</div></div>"
        )


def _overlay_names(ex: Explanation, label: str) -> list[str]:
    if ex.image_maps is None:
        return [""] * ex.shape[1]
    return [pages.overlay_name(0, label, p, t) for p, t in enumerate(ex.texts)]


def _word_names(ex: Explanation, label: str) -> list[dict[int, str]]:
    """The word-map file names :func:`pages.write_word_overlays` gives, without writing."""
    if "interactions" not in ex.extras:
        return [{} for _ in ex.texts]
    notes = pages.pair_notes(ex)
    out = []
    for p, text in enumerate(ex.texts):
        stem = pages.overlay_name(0, label, p, text)[: -len(".png")]
        if notes[0][p]:
            out.append({})
            continue
        out.append(
            {int(t): f"{stem}__w{int(t):02d}.png" for t in np.flatnonzero(ex.content[p][: len(ex.tokens[p])])}
        )
    return out
