"""Running a scale job: the local engine (one process, batches of images) and the Ray engine
(Ray Data reads the item list in blocks; an actor pool, one model per actor, explains image
batches with ``map_batches``). Both hand whole items' rows to the same
:class:`~cliplens.scale.store.ParquetStore` in this process, which is what makes a run
resumable and every item land exactly once, whichever engine ran it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .job import ScaleJob, check_dataset, explain_rows, list_items, png_bytes

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ScaleSummary:
    out: Path
    items_done: int  # finished items in the folder after this run
    items_new: int  # of which this run explained
    rows_per_item: int


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda when a GPU is visible, else cpu; other names checked (one-line errors)."""
    import torch

    from ..cli import check_device

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(check_device(device))


def explain_dataset(
    job: ScaleJob,
    out: str | Path,
    *,
    engine: str = "local",
    batch_size: int = 8,
    device: str | None = "auto",
    restart: bool = False,
    ray_address: str | None = None,
    workers: int = 2,
    progress: bool = True,
    on_part: Callable[[int], None] | None = None,
    _kill_worker_once: str | None = None,
) -> ScaleSummary:
    """Explain every (item, prompt, method) of ``job`` into the Parquet dataset ``out``.

    Everything is checked before a model loads (methods, prompts, target, dtype, dataset, the
    output folder and its earlier job). ``on_part(items_committed_so_far)`` is called after each
    committed part (a test hook: raising there interrupts the run like a kill would).
    ``_kill_worker_once`` (tests, Ray engine): a file path; the first actor to reach its second
    batch while the file is missing creates it and exits, as a crashed worker would.
    """
    try:
        from .store import ParquetStore
    except ImportError:
        raise InputError(
            "explain-dataset writes Parquet and needs pyarrow: pip install 'cliplens[scale]'"
        ) from None

    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    requests = job.requests()
    check_dataset(job.dataset)
    dev = resolve_device(device)
    out = Path(out)
    with _ray_session(engine, ray_address), _locked(out):
        # opened under the lock: a second run on the folder is refused before it can sweep
        # the first one's uncommitted files
        store = ParquetStore(out, job, restart=restart)
        return _run(
            job, requests, store, engine, batch_size, dev, progress, on_part, workers, _kill_worker_once
        )


@contextlib.contextmanager
def _locked(out: Path):
    """Hold ``OUT/.explain-dataset.lock`` (the pid) for the run; a folder made only for the lock
    is removed again when the run fails before writing anything."""
    from ..files import output_lock

    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    try:
        with output_lock(out / ".explain-dataset.lock"):
            yield
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _run(job, requests, store, engine, batch_size, dev, progress, on_part, workers, kill_once):
    before = len(store.done)
    pending = (it for it in list_items(job.dataset, job.limit) if it["id"] not in store.done)
    total = _count(job)
    bar = _bar(progress, total, before)
    try:
        if engine == "local":
            _run_local(job, requests, pending, store, batch_size, dev, bar, on_part)
        else:
            _run_ray(job, pending, store, batch_size, dev, bar, on_part, workers, kill_once)
    finally:
        bar.close()
    return ScaleSummary(store.out, len(store.done), len(store.done) - before, store.rows_per_item)


def _count(job: ScaleJob) -> int | None:
    root = Path(job.dataset).expanduser()
    if root.is_dir():
        return None  # counted while listing would read the tree twice; tqdm shows a running count
    from ..eval.datasets import open_dataset

    return open_dataset(job.dataset, limit=job.limit).size


def _bar(progress: bool, total: int | None, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="explaining", unit="item", disable=not progress or None)


def _load(job: ScaleJob, device: str):
    from ..adapters import load_model

    return load_model(job.model, device=device, dtype=job.torch_dtype())


def _batches(items: Iterable[dict], size: int):
    batch: list[dict] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_local(job, requests, pending, store, batch_size, device, bar, on_part) -> None:
    from .store import rows_table

    adapter = _load(job, device)
    for batch in _batches(pending, batch_size):
        n = store.write(rows_table(explain_rows(adapter, requests, batch)))
        bar.update(n)
        if on_part is not None:
            on_part(len(store.done))


# ----------------------------------------------------------------------------- Ray


def job_from_dict(d: dict) -> ScaleJob:
    d = {k: v for k, v in d.items() if k != "format"}
    return ScaleJob(**{**d, "texts": tuple(d["texts"]), "methods": tuple(d["methods"])})


class RayExplainer:
    """The ``map_batches`` callable: one per actor, holding the model once."""

    def __init__(self, job: dict, device: str, kill_once: str | None = None):
        self.job = job_from_dict(job)
        self.requests = self.job.requests()
        self.adapter = _load(self.job, device)
        self.kill_once, self.calls = kill_once, 0

    def __call__(self, batch: dict):
        from .store import rows_table

        self.calls += 1
        if self.kill_once and self.calls == 2:
            import os

            try:
                fd = os.open(self.kill_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)  # a worker crash in the middle of the job

        items = []
        for i in range(len(batch["id"])):
            png = batch["png"][i]
            items.append(
                {
                    "index": int(batch["index"][i]),
                    "id": str(batch["id"][i]),
                    "path": str(batch["path"][i]),
                    "png": png,
                }
            )
        return rows_table(explain_rows(self.adapter, self.requests, items))


def _ray_rows(pending: Iterable[dict]) -> list[dict]:
    rows = []
    for it in pending:
        image = it.get("image")
        rows.append(
            {
                "index": it["index"],
                "id": it["id"],
                "path": it.get("path", ""),
                "png": b"" if image is None else png_bytes(image),
            }
        )
    return rows


def _run_ray(job, pending, store, batch_size, device, bar, on_part, workers, kill_once=None) -> None:
    import pyarrow as pa
    import ray

    rows = _ray_rows(pending)
    if not rows:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    blocks = max(1, min(len(rows) // batch_size, 4 * workers * 4)) if len(rows) >= batch_size else 1
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    gpus = {"num_gpus": 1} if device.startswith("cuda") else {}
    results = ds.map_batches(
        RayExplainer,
        fn_constructor_kwargs={"job": job.to_dict(), "device": device, "kill_once": kill_once},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
        **gpus,
    )
    leftover: pa.Table | None = None
    for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        if leftover is not None:
            table = pa.concat_tables([leftover, table.cast(leftover.schema)])
        whole, leftover = _whole_items(table, store.rows_per_item)
        if whole.num_rows:
            n = store.write(whole)
            bar.update(n)
            if on_part is not None:
                on_part(len(store.done))
    if leftover is not None and leftover.num_rows:
        raise RuntimeError(f"Ray returned incomplete rows for {leftover.num_rows} records")


@contextlib.contextmanager
def _ray_session(engine: str, address: str | None):
    """Ray joined (or a local cluster started) for the run, before the output folder is touched;
    a cluster this run started is shut down after it. Nothing for the local engine."""
    if engine != "ray":
        yield
        return
    try:
        import ray
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'cliplens[ray]'") from None
    if ray.is_initialized():
        yield
        return
    import logging

    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise InputError(f"--ray-address {address}: cannot join that Ray cluster ({exc})") from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()


def _whole_items(table, rows_per_item: int):
    """(rows of items whose every record is in ``table``, the rest) — a block boundary may in
    principle split an item's rows; only whole items are committed."""
    import pyarrow as pa

    ids = table.column("item_id").to_pylist()
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    whole = [k for k, v in enumerate(ids) if counts[v] >= rows_per_item]
    rest = [k for k, v in enumerate(ids) if counts[v] < rows_per_item]
    take = lambda idx: table.take(pa.array(idx, type=pa.int64()))
    return take(whole), (take(rest) if rest else None)
