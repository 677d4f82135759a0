"""Images per second of chefer and legrad against the plain forward+backward, one prompt per
image, a batch of images per call, on a ViT-B/16-sized random CLIP (the LeGrad paper reports
about 96 images/s for LeGrad and 21 for Chefer on one GPU). Also: how far bfloat16 maps are
from float32 maps on the same weights (relative to each map's largest magnitude).

    python benchmarks/bench_throughput.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
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

METHODS = {"chefer": {}, "legrad": {"layers": 2, "pooling": "mean", "towers": ("image",)}}


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)]


def plain(adapter, imgs, text):
    """Forward+backward of the batch's pair logits to the input, parameters frozen."""
    model = adapter.model
    batch = adapter.tokenize([text])
    pixels = adapter.prepare_images(imgs)[0].pixel_values.requires_grad_(True)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)
        out.logits_per_image.sum().backward()
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def timed(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best.append(time.perf_counter() - t0)
    return float(np.median(best))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    imgs = images(args.batch)
    text = "a photo of a cat"
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"random CLIP ViT-B/16 size, torch {torch.__version__}, {where}, batch {args.batch} images x 1 prompt")
    print("| dtype | pass | images/s | x plain time |")
    print("|---|---|---|---|")
    maps = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = C.build_clip("b16").to(device=args.device, dtype=dtype)
        adapter = HFClipAdapter(model, C.tokenizer(), name="random-b16")
        t_plain = timed(lambda: plain(adapter, imgs, text), args.device, args.repeats)
        name = str(dtype).split(".")[-1]
        print(f"| {name} | plain forward+backward | {args.batch / t_plain:.1f} | 1.00 |", flush=True)
        for method, opts in METHODS.items():
            t = timed(lambda: cliplens.explain(adapter, imgs, [text], method=method, **opts), args.device, args.repeats)
            print(f"| {name} | {method} | {args.batch / t:.1f} | {t / t_plain:.2f} |", flush=True)
            maps[method, name] = np.asarray(cliplens.explain(adapter, imgs[:4], [text], method=method, **opts).image_maps)
    print()
    print("| method | bfloat16 vs float32: max abs difference / max abs map | Pearson r |")
    print("|---|---|---|")
    for method in METHODS:
        a, b = maps[method, "float32"], maps[method, "bfloat16"]
        rel = np.abs(a - b).max() / np.abs(a).max()
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        print(f"| {method} | {rel:.3g} | {r:.4f} |")


if __name__ == "__main__":
    main()
