"""Cost of every method (but Chefer: benchmarks/bench_chefer.py) against a plain gradient pass,
on a ViT-B/16-sized random CLIP.

For P prompts on one image prints time(explain(method)) / time(plain pass), the plain pass
being one forward with the image repeated P times and the P texts, the sum of the P pair
logits back-propagated once to the input, parameters frozen (benchmarks/_common.py). For the
methods without a backward pass (decomposition, rollout, raw_attention) it also prints
time / (plain forward): one no-grad forward of the image and the P texts.

Interleaved repeats (baseline, method, baseline, method, ...): the times shown are medians,
the ratio is the median of the per-repeat ratios (each method run over the baseline run just
before it), which follows slow changes of load on a shared machine better than a ratio of
medians.

    python benchmarks/bench_methods.py              # P = 1, 8 on ViT-B/16 size
    python benchmarks/bench_methods.py --quick      # small model, for a smoke run
    python benchmarks/bench_methods.py --methods legrad,decomposition --prompts 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

import cliplens
from cliplens.adapters import HFClipAdapter

#: (label, method, options); the label is what the table shows
CASES = [
    ("legrad", "legrad", {}),
    ("legrad layers=2", "legrad", {"layers": 2}),
    ("legrad image only", "legrad", {"towers": ["image"]}),
    ("rollout", "rollout", {}),
    ("raw_attention", "raw_attention", {}),
    ("gradcam", "gradcam", {}),
    ("sensitivity grad_norm", "sensitivity", {}),
    ("sensitivity pixel_grad", "sensitivity", {"variant": "pixel_grad"}),
    ("sensitivity iterative k=3", "sensitivity", {"variant": "iterative", "steps": 3}),
    ("decomposition", "decomposition", {}),
    ("decomposition image only", "decomposition", {"towers": ["image"]}),
]
NO_BACKWARD = {"rollout", "raw_attention", "decomposition"}


def setup(size: str):
    adapter = HFClipAdapter(C.build_clip(size), C.tokenizer(), name=f"random-{size}")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))
    return adapter, image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    ap.add_argument("--prompts", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated labels or method names (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all available cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    size = "quick" if args.quick else "b16"
    adapter, image = setup(size)
    wanted = {w.strip() for w in args.methods.split(",") if w.strip()}
    cases = [c for c in CASES if not wanted or c[0] in wanted or c[1] in wanted]
    print(
        f"model: random CLIP ({size}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats}"
    )
    print(
        f"| {'method':<26} | {'P':>2} | {'method s':>8} | {'plain s':>7} | {'x plain pass':>12} | {'x plain forward':>15} |"
    )
    print(f"|{'-' * 28}|{'-' * 4}|{'-' * 10}|{'-' * 9}|{'-' * 14}|{'-' * 17}|")
    for P in [int(p) for p in args.prompts.split(",")]:
        texts = C.PROMPTS[:P]
        for label, method, opts in cases:
            opts = dict(opts)
            towers = opts.pop("towers", None)

            def run(method=method, opts=opts, towers=towers, texts=texts):
                cliplens.explain(adapter, image, texts, method=method, towers=towers, **opts)

            def plain(texts=texts):
                C.plain_pass(adapter, image, texts)

            def forward(texts=texts):
                C.plain_forward(adapter, image, texts)

            t_m, t_plain, ratio = C.paired_ratio(run, plain, args.repeats)
            fwd = ""
            if method in NO_BACKWARD:
                _, t_fwd, r_fwd = C.paired_ratio(run, forward, args.repeats)
                fwd = f"{r_fwd:.2f} ({t_fwd:.2f} s)"
            print(
                f"| {label:<26} | {P:>2} | {t_m:>8.2f} | {t_plain:>7.2f} | {ratio:>12.2f} | {fwd:>15} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
