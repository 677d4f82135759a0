"""Memory bounded by the chunk, not by the call: peak memory and time of chefer and legrad for
1 image x 1,000 prompts and 64 images x 80 prompts on a ViT-B/16-sized random CLIP, with the
default ``max_pairs`` and with every pair in one batch (``--unchunked``; may not fit).

    python benchmarks/bench_chunks.py --device cuda
    python benchmarks/bench_chunks.py --cases 1x1000 --methods chefer      # CPU: peak RSS
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import cliplens  # noqa: E402
from cliplens.adapters import HFClipAdapter  # noqa: E402

CASES = {"1x1000": (1, 1000), "64x80": (64, 80)}


def run(device: str, method: str, B: int, P: int, max_pairs: int | None) -> dict:
    adapter = HFClipAdapter(C.build_clip("b16").to(device), C.tokenizer(), name="random-b16")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(B)]
    texts = [f"{C.PROMPTS[i % len(C.PROMPTS)]} number {i}" for i in range(P)]
    opts = {"layers": 2, "pooling": "mean"} if method == "legrad" else {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if device == "cuda":
        ex = cliplens.explain(adapter, images, texts, method=method, max_pairs=max_pairs, **opts)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with C.PeakRSS() as p:
            ex = cliplens.explain(adapter, images, texts, method=method, max_pairs=max_pairs, **opts)
        peak = p.peak_mb
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak, "finite": bool(np.isfinite(ex.logits).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--methods", default="chefer,legrad")
    ap.add_argument("--unchunked", action="store_true", help="also run every pair in one batch")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        method, B, P, mp = args.one
        print(json.dumps(run(args.device, method, int(B), int(P), int(mp) if mp != "none" else None)))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"random CLIP ViT-B/16 size, torch {torch.__version__}, {where}")
    print("| images x prompts | method | max_pairs | seconds | peak MB |")
    print("|---|---|---|---|---|")
    for case in args.cases.split(","):
        B, P = CASES[case]
        for method in args.methods.split(","):
            for mp in ["none"] + (["1000000000"] if args.unchunked else []):
                import os
                import subprocess

                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
                out = subprocess.run(
                    [sys.executable, __file__, "--device", args.device, "--one", method, str(B), str(P), mp],
                    capture_output=True, text=True, env=env,
                )
                if out.returncode != 0:
                    print(f"| {case} | {method} | {'all' if mp != 'none' else 'default'} | failed | {out.stderr.strip().splitlines()[-1][:80] if out.stderr.strip() else out.returncode} |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                label = "all in one batch" if mp != "none" else "default (128)"
                print(f"| {case} | {method} | {label} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
