"""Cost of the token x patch interaction maps on a ViT-B/16-sized random CLIP, one image.

- ``interactions`` (exact, no gradient) against a plain no-grad forward of both towers (the
  image once and the P prompts, default attention path);
- ``jacobian_interactions`` (D vector-Jacobian products per tower, batched) against the plain
  forward+backward of the P pairs (benchmarks/_common.py).

Time: interleaved repeats, the median of per-repeat ratios. Memory: peak RSS above the loaded
model, each run in a fresh process (malloc pinned so the readings follow live tensors).

    python benchmarks/bench_interactions.py             # P = 1, 8
    python benchmarks/bench_interactions.py --quick     # small model, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import cliplens  # noqa: E402
from cliplens.adapters import HFClipAdapter  # noqa: E402

#: method -> the baseline it is compared with
PAIRS = {"interactions": "forward", "jacobian_interactions": "plain"}


def setup(size: str, device: str = "cpu"):
    return HFClipAdapter(C.build_clip(size).to(device), C.tokenizer(), name=f"random-{size}"), C.random_photo()


def runner(adapter, image, texts, mode: str):
    if mode == "forward":
        fn = lambda: C.plain_forward(adapter, image, texts)  # noqa: E731
    elif mode == "plain":
        fn = lambda: C.plain_pass(adapter, image, texts)  # noqa: E731
    else:
        fn = lambda: cliplens.explain(adapter, image, texts, method=mode)  # noqa: E731
    return C.on_device(fn, adapter.device)


def measure(size: str, mode: str, P: int) -> None:
    adapter, image = setup(size)
    run = runner(adapter, image, C.PROMPTS[:P], mode)
    run()  # warm-up
    with C.PeakRSS() as peak:
        run()
    print(json.dumps({"peak_mb": peak.peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all available cores)")
    ap.add_argument("--methods", default=",".join(PAIRS), help="comma-separated (default: both)")
    ap.add_argument("--skip-memory", action="store_true", help="time only")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (memory: peak CUDA allocation there)")
    ap.add_argument("--measure", nargs=3, metavar=("SIZE", "MODE", "P"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.measure:
        measure(args.measure[0], args.measure[1], int(args.measure[2]))
        return
    size = "quick" if args.quick else "b16"
    adapter, image = setup(size, args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, threads {torch.get_num_threads()}"
    print(f"model: random CLIP ({size}), torch {torch.__version__}, {where}")
    methods = [m for m in args.methods.split(",") if m]
    print("| method | P | method s | baseline | baseline s | time x | peak MB | baseline MB | memory x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for P in [int(p) for p in args.prompts.split(",")]:
        texts = C.PROMPTS[:P]
        for method in methods:
            base = PAIRS[method]
            run_m, run_b = runner(adapter, image, texts, method), runner(adapter, image, texts, base)
            t_m, t_b, ratio = C.paired_ratio(run_m, run_b, args.repeats)
            if args.skip_memory:
                print(f"| {method} | {P} | {t_m:.3f} | {base} | {t_b:.3f} | {ratio:.2f} | | | |", flush=True)
                continue
            if args.device == "cuda":
                mem = {method: C.cuda_peak_mb(run_m), base: C.cuda_peak_mb(run_b)}
            else:
                mem = {
                    m: C.measure_peak_in_subprocess(__file__, [size, m, str(P)], threads=torch.get_num_threads())[
                        "peak_mb"
                    ]
                    for m in (method, base)
                }
            print(
                f"| {method} | {P} | {t_m:.3f} | {base} | {t_b:.3f} | {ratio:.2f} | {mem[method]:.0f} | "
                f"{mem[base]:.0f} | {mem[method] / max(mem[base], 1e-9):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
