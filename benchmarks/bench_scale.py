"""Pairs per second of `explain-dataset` with the local engine against the Ray engine (a local
cluster of N single-threaded actors), on the embedded shapes model, and the Parquet writer's
cost per item.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --images 64 --prompts 10 --workers 2

Wall times include everything a user waits for: model load, (for Ray) cluster start and actor
start-up, explaining and writing. The writer's overhead is timed apart: the same rows turned into
Arrow and committed as parts (temporary files, rename, marker), per item, next to the explaining
time per item.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from cliplens.scale import ScaleJob, explain_dataset
from cliplens.scale.job import explain_rows, list_items
from cliplens.worlds.shapes import COLOURS, SHAPES, write_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--methods", default="chefer")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="scene size in pixels")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        world = write_dataset(tmp / "world", args.images, seed=0, size=args.size)
        texts = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)[: args.prompts]
        methods = tuple(args.methods.split(","))
        job = ScaleJob(model="shapes", dataset=f"shapes:{world}", texts=texts, methods=methods)
        pairs = args.images * len(texts) * len(methods)
        print(
            f"{args.images} images x {len(texts)} prompts x {len(methods)} method(s) = {pairs} records, "
            f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
        )

        for threads in sorted({1, args.workers}):
            torch.set_num_threads(threads)
            t = time.perf_counter()
            explain_dataset(
                job, tmp / f"local{threads}", batch_size=args.batch_size, device="cpu", progress=False
            )
            local = time.perf_counter() - t
            print(
                f"local engine, 1 process, {threads} thread(s):   {local:7.1f} s  {pairs / local:7.1f} records/s"
            )
        torch.set_num_threads(1)

        import ray

        t = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t
        try:
            t = time.perf_counter()
            explain_dataset(
                job,
                tmp / "ray",
                engine="ray",
                batch_size=args.batch_size,
                device="cpu",
                workers=args.workers,
                progress=False,
            )
            dist = time.perf_counter() - t
        finally:
            ray.shutdown()
        print(
            f"ray engine, {args.workers} actors x 1 thread:     {dist:7.1f} s  {pairs / dist:7.1f} records/s "
            f"(+ {start:.1f} s cluster start; with it {pairs / (dist + start):.1f} records/s)"
        )

        # the writer's share: explain one batch, then time only Arrow conversion + committed parts
        from cliplens.adapters import load_model
        from cliplens.scale.store import ParquetStore, rows_table

        adapter = load_model("shapes")
        reqs = job.requests()
        items = list(list_items(job.dataset))[: args.batch_size]
        t = time.perf_counter()
        cols = explain_rows(adapter, reqs, items)
        explain_per_item = (time.perf_counter() - t) / len(items)
        store = ParquetStore(tmp / "writer", job)
        reps, t = 20, time.perf_counter()
        for r in range(reps):
            renamed = dict(cols, item_id=[f"{i}-{r}" for i in cols["item_id"]])
            store.write(rows_table(renamed))
        write_per_item = (time.perf_counter() - t) / (reps * len(items))
        print(
            f"writer: {1e3 * write_per_item:.2f} ms per item ({len(texts) * len(methods)} records) vs "
            f"{1e3 * explain_per_item:.1f} ms explaining it ({100 * write_per_item / explain_per_item:.1f}%)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
