"""DETR: the detector once per image for every class asked (``shares_image``) against once per
(image, class) pair, on a random DETR with ResNet-50 / DETR-base sizes (transformers' own ResNet,
no timm), one 512 x 512 image x P class names. Time ratios of medians of interleaved repeats,
the same call both ways in one run.

    python benchmarks/bench_detr.py                    # P = 4
    python benchmarks/bench_detr.py --classes 1,4,16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import cliplens  # noqa: E402
from cliplens.adapters.hf_detr import HFDetrAdapter  # noqa: E402


def build() -> HFDetrAdapter:
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    backbone = ResNetConfig(
        num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
        layer_type="bottleneck", out_features=["stage4"],
    )
    labels = {i: f"class{i}" for i in range(91)}
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, id2label=labels)
    torch.manual_seed(0)
    return HFDetrAdapter(DetrForObjectDetection(config).eval(), name="random-detr-r50")


def runner(adapter: HFDetrAdapter, image, texts, method: str, share: bool):
    def fn():
        adapter.shares_image = share
        try:
            cliplens.explain(adapter, image, texts, method=method)
        finally:
            del adapter.shares_image  # back to the class's

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="4", help="class names per image (comma-separated)")
    ap.add_argument("--methods", default="chefer,raw_attention")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = build()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    print(f"random DETR (ResNet-50, DETR-base sizes), 512 px, torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    print("| classes | method | once per image s | once per pair s | ratio |")
    print("|---|---|---|---|---|")
    for P in [int(x) for x in args.classes.split(",")]:
        texts = [f"class{i}" for i in range(1, 1 + P)]
        for method in args.methods.split(","):
            t_s, t_r, ratio = C.paired_ratio(
                runner(adapter, image, texts, method, True), runner(adapter, image, texts, method, False), args.repeats
            )
            print(f"| {P} | {method} | {t_s:.2f} | {t_r:.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
