"""The app's evaluation panel without the web framework: run :func:`cliplens.eval.evaluate` on N
shapes-world scenes in a background thread with the app's loaded model, keep a summary (table
and perturbation chart) that is refreshed while items come in, and stop between items on cancel.

The scenes are drawn once per N into the app's per-process folder (dataset seed
:data:`~cliplens.eval.config.SHAPES_EVAL_SEED`, as ``cliplens evaluate --make-shapes N``).
One evaluation runs at a time per process; it takes the model lock, so explain runs wait for
it (and it waits for them).
"""

from __future__ import annotations

import html
import logging
import secrets
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CliplensError, InputError
from ..eval import report
from ..eval.config import SHAPES_EVAL_SEED, resolve_methods, resolve_metrics

log = logging.getLogger("cliplens.app")

#: the metrics the panel offers (the shapes world has masks; deletion and p-mIoU are left to the CLI)
EVAL_METRICS = ("pointing", "segmentation", "perturbation", "sanity")
DEFAULT_EVAL_METRICS = ("pointing", "segmentation", "perturbation")
MAX_EVAL_SCENES = 200
KEPT_EVALS = 4
#: a fresh summary at most this often while items come in (and always after the first and last)
REFRESH_SECONDS = 1.0
#: files of an evaluation the browser may fetch
EVAL_FILES = ("perturbation.png", "sanity.png", "results.csv", "results.md", "summary.json")


class _Cancelled(Exception):
    pass


@dataclass
class EvalJob:
    id: str
    n: int
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    folder: Path
    status: str = "queued"  # queued, running, done, cancelled, error
    done: int = 0
    error: str | None = None
    version: int = 0  # bumped each time a summary is written
    table: str = ""  # the latest summary as HTML
    charts: tuple[str, ...] = ()
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)

    def progress(self) -> dict:
        return {
            "eval": self.id,
            "status": self.status,
            "done": self.done,
            "total": self.n,
            "version": self.version,
            "methods": list(self.methods),
            "metrics": list(self.metrics),
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


def parse_eval_form(fields: Mapping[str, object]) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
    """N, the methods and the metrics of an evaluation form; a user error is one line."""
    from .core import _int, _one, public_methods

    n = _int(_one(fields, "n", "3"), "number of scenes", lo=1, hi=MAX_EVAL_SCENES)
    methods = _list(fields, "methods")
    if not methods:
        raise InputError("choose at least one method")
    for m in methods:
        if m not in public_methods():
            raise InputError(f"unknown method {m[:40]!r}")
    metrics = _list(fields, "metrics") or list(DEFAULT_EVAL_METRICS)
    for m in metrics:
        if m not in EVAL_METRICS:
            raise InputError(f"unknown metric {m[:40]!r}; choose from {', '.join(EVAL_METRICS)}")
    return n, resolve_methods(methods), resolve_metrics(metrics)


def _list(fields: Mapping[str, object], name: str) -> list[str]:
    value = fields.get(name, [])
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for v in items:
        out += [s.strip() for s in str(v).split(",") if s.strip()]
    return out


class Evaluations:
    """The evaluations of one app process (one running at a time, the latest few kept)."""

    def __init__(self, adapter, root: Path, model_lock: threading.Lock):
        self.adapter = adapter
        self.root = root
        self._model_lock = model_lock
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, EvalJob] = OrderedDict()
        self._threads: list[threading.Thread] = []

    def close(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel.set()
        for t in self._threads:
            t.join(timeout=30)

    def start(self, fields: Mapping[str, object], *, wait: bool = False) -> EvalJob:
        n, methods, metrics = parse_eval_form(fields)
        with self._lock:
            if any(j.status in ("queued", "running") for j in self._jobs.values()):
                raise InputError("an evaluation is running already; cancel it or wait for it to finish")
            job_id = secrets.token_hex(8)
            folder = self.root / f"eval-{job_id}"
            folder.mkdir(parents=True)
            job = EvalJob(job_id, n, methods, metrics, folder)
            self._jobs[job_id] = job
            finished = [j for j in self._jobs.values() if j.status not in ("queued", "running")]
            for old in finished[: max(0, len(finished) - KEPT_EVALS)]:
                del self._jobs[old.id]
                shutil.rmtree(old.folder, ignore_errors=True)
        thread = threading.Thread(target=self._run, args=(job,), name=f"cliplens-eval-{job_id}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        if wait:
            thread.join()
        return job

    def job(self, job_id: str) -> EvalJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise InputError("no such evaluation (it may have been removed to make room for newer ones)")
        return job

    def cancel(self, job_id: str) -> EvalJob:
        job = self.job(job_id)
        job.cancel.set()
        return job

    def file(self, job_id: str, name: str) -> Path:
        job = self.job(job_id)
        path = job.folder / name
        if name not in EVAL_FILES or not path.is_file():
            raise InputError("no such file")
        return path

    def render(self, job: EvalJob) -> str:
        """The latest summary as HTML (empty before the first item is done)."""
        return job.table

    # the worker
    def _scenes(self, n: int) -> Path:
        from ..worlds.shapes import write_dataset

        path = self.root / "eval-scenes" / f"shapes-{n}"
        if not path.exists():
            write_dataset(path, n, seed=SHAPES_EVAL_SEED)
        return path

    def _run(self, job: EvalJob) -> None:
        from ..eval.harness import evaluate

        last = [0.0]

        def on_item(done: int, total: int, partial) -> None:
            job.done = done
            job.seconds = time.monotonic() - job.started
            stop = job.cancel.is_set()
            if stop or done in (1, total) or time.monotonic() - last[0] >= REFRESH_SECONDS:
                self._publish(job, partial(), "cancelled" if stop else "so far")
                last[0] = time.monotonic()
            if stop:
                raise _Cancelled

        try:
            with self._model_lock:
                if job.cancel.is_set():
                    job.status = "cancelled"
                    return
                job.status = "running"
                job.started = time.monotonic()
                data = self._scenes(job.n)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results = evaluate(
                        self.adapter,
                        list(job.methods),
                        f"shapes:{data}",
                        metrics=list(job.metrics),
                        limit=job.n,
                        on_item=on_item,
                        progress=False,
                    )
                job.seconds = time.monotonic() - job.started
                self._publish(job, results, "final")
                job.status = "done"
        except _Cancelled:
            job.status = "cancelled"
        except CliplensError as exc:
            job.error, job.status = " ".join(str(exc).split()), "error"
        except Exception:  # a bug: the log gets the traceback, the page one line
            log.exception("evaluation %s failed", job.id)
            job.error, job.status = (
                "internal error while evaluating (the server log has the details)",
                "error",
            )

    def _publish(self, job: EvalJob, results, state: str) -> None:
        written = report.write_results(results, job.folder)
        job.charts = tuple(p.name for p in written if p.suffix == ".png")
        version = job.version + 1
        job.table = summary_html(results, job, state, version)  # the table first: a poll that
        job.version = version  # sees the new version then gets this table or a newer one


def summary_html(results, job: EvalJob, state: str, version: int) -> str:
    """The table of :class:`~cliplens.eval.summary.EvalResults` (methods, then baselines in
    grey), the best method per column in bold, then the charts."""
    rows = results.rows
    cols = report.result_columns(rows)
    best = results.best()
    head = "".join(f"<th>{html.escape(c.heading)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            text = html.escape(report.format_value(r.get(c.key), c.fmt))
            if best.get(c.key) == r["source"]:
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        cls = " class='baseline'" if r.get("kind") != "method" else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    lines = [
        (
            f"<p class='evalline'>{results.n_items} of {job.n} scenes ({state}); explained pairs: "
            f"{results.n_pairs}; target: {html.escape(str(results.config.get('target')))}; "
            f"metrics: {html.escape(', '.join(job.metrics))}; baselines in grey; best method per column in bold</p>"
        ),
        f"<table id='evaltable' class='evaltable'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
    ]
    for m, info in results.refused.items():
        lines.append(
            f"<p class='note'>{html.escape(m)} did not explain {info['items']} item(s): {html.escape(str(info['reason']))}</p>"
        )
    for name in job.charts:
        if name in EVAL_FILES:
            lines.append(
                f"<img class='evalchart' alt='{name}' src='api/evals/{job.id}/files/{name}?v={version}'>"
            )
    return "\n".join(lines)
