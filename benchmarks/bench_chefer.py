"""Chefer explanation cost against a plain gradient pass, on a ViT-B/16-sized random CLIP.

Prints, for P prompts on one image, time(explain(method="chefer")) / time(plain pass) and
peak memory (each measured in a fresh process, RSS above the loaded model) over the plain
pass's. See benchmarks/_common.py for the baseline's definition.

    python benchmarks/bench_chefer.py              # P = 1, 8, 32 on ViT-B/16 size
    python benchmarks/bench_chefer.py --quick      # small model, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import cliplens  # noqa: E402
from cliplens.adapters import HFClipAdapter  # noqa: E402


def setup(size: str):
    adapter = HFClipAdapter(C.build_clip(size), C.tokenizer(), name=f"random-{size}")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))
    return adapter, image


def measure(size: str, mode: str, P: int) -> None:
    adapter, image = setup(size)
    texts = C.PROMPTS[:P]
    torch.manual_seed(0)
    if mode == "plain-eager":
        adapter.model.set_attn_implementation("eager")
    run = (lambda: C.plain_pass(adapter, image, texts)) if mode.startswith("plain") else (
        lambda: cliplens.explain(adapter, image, texts, method=mode)
    )
    run()  # warm-up: one-time allocations (thread pools, caches) are not the pass's memory
    with C.PeakRSS() as peak:
        run()
    print(json.dumps({"peak_mb": peak.peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all available cores)")
    ap.add_argument("--skip-memory", action="store_true", help="time only (memory runs two extra passes per mode)")
    ap.add_argument("--measure", nargs=3, metavar=("SIZE", "MODE", "P"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
        measure(args.measure[0], args.measure[1], int(args.measure[2]))
        return
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    size = "quick" if args.quick else "b16"
    adapter, image = setup(size)
    print(f"model: random CLIP ({size}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'P':>3} {'chefer s':>9} {'plain s':>8} {'time x':>7} {'mem x':>6} {'mem x (eager plain)':>20}")
    for P in [int(p) for p in args.prompts.split(",")]:
        texts = C.PROMPTS[:P]
        t_ex, t_plain, ratio = C.paired_ratio(
            lambda: cliplens.explain(adapter, image, texts, method="chefer"),
            lambda: C.plain_pass(adapter, image, texts),
            repeats=args.repeats,
        )
        if args.skip_memory:
            print(f"{P:>3} {t_ex:>9.3f} {t_plain:>8.3f} {ratio:>7.2f}  (memory not measured)", flush=True)
            continue
        mem = {
            m: C.measure_peak_in_subprocess(__file__, [size, m, str(P)], threads=torch.get_num_threads())["peak_mb"]
            for m in ("chefer", "plain", "plain-eager")
        }
        print(
            f"{P:>3} {t_ex:>9.3f} {t_plain:>8.3f} {ratio:>7.2f} {mem['chefer'] / mem['plain']:>6.2f} "
            f"{mem['chefer'] / mem['plain-eager']:>20.2f}   (peak MB: chefer {mem['chefer']:.0f}, "
            f"plain {mem['plain']:.0f}, plain eager {mem['plain-eager']:.0f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
