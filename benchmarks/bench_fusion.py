"""Fusion models: time and peak memory of chefer's bi-modal rules (and of raw attention and
LAVIS-style Grad-CAM) per explained pair, as ratios to a plain forward+backward of the same
model on the same pairs (pixels requiring grad, parameters frozen, backward of the summed ITM
log-odds). Models (``--model``): a random ``BlipForImageTextRetrieval`` with BLIP-base sizes
(ViT-B/16 at 384 px: 577 image tokens, 12 + 12 layers, text 768 wide), or a random
``BridgeTowerForImageAndTextRetrieval`` with BridgeTower-base sizes (RoBERTa-base and ViT-B/16
at 288 px: 325 image tokens, 12 uni-modal layers each, 6 cross-modal layers); ``--size tiny``
for a quick run.

    python benchmarks/bench_fusion.py                      # BLIP-base sizes, 1 image x 1 and x 4 prompts
    python benchmarks/bench_fusion.py --size tiny --pairs 1,8
    python benchmarks/bench_fusion.py --pairs 4 --methods "chefer,chefer rows"
    python benchmarks/bench_fusion.py --model bridgetower --pairs 4 --methods "chefer,chefer rows"

A method named "M rows" runs M with every encoder once per pair (pixels repeated, prompts
tiled: the path before ``shares_image`` / ``shares_text``, which run an encoder that reads one
input alone once per distinct input and batch its per-pair gradients).

Peak memory on CPU: resident memory sampled in a fresh process per case (see _common.PeakRSS).
The relevance matrices are full (n x n per stream and pair); the image stream's
R (577 x 577) costs 577^3 multiply-adds per image self-attention event and pair, about 4% of
a ViT-B/16 layer's forward at that size: the rules are not the cost, the per-pair forward is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import cliplens  # noqa: E402

WORDS = "a an and the of photo red green blue yellow cat dog car tree on in with".split()


def _tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def build(model: str, size: str):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = _tokenizer()
    torch.manual_seed(0)
    if model == "bridgetower":
        from transformers import BridgeTowerConfig, BridgeTowerForImageAndTextRetrieval

        from cliplens.adapters.hf_bridgetower import HFBridgeTowerITMAdapter

        text = {"vocab_size": len(tok), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
        vision, cross = {}, {}
        if size == "tiny":
            text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=34)
            vision = dict(hidden_size=128, num_hidden_layers=2, image_size=64, patch_size=8)
            cross = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
        config = BridgeTowerConfig(text_config=text, vision_config=vision, **cross)
        net = BridgeTowerForImageAndTextRetrieval(config).eval()
        return HFBridgeTowerITMAdapter(net, tok, name=f"random-bridgetower-{size}")
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from cliplens.adapters.hf_blip import HFBlipITMAdapter

    if size == "base":
        text = {"vocab_size": len(tok), "pad_token_id": 0}
        vision = {"initializer_range": 0.02}
    else:
        text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, encoder_hidden_size=64, pad_token_id=0, max_position_embeddings=32)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=64, patch_size=8, initializer_range=0.02)
    net = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision)).eval()
    return HFBlipITMAdapter(net, tok, name=f"random-blip-{size}")


def plain(adapter, image, texts) -> None:
    """One forward over the P pair rows, one backward of the summed log-odds to the pixels."""
    model = adapter.model
    batch = adapter.tokenize(texts)
    pixels = adapter.prepare_images([image])[0].pixel_values.repeat(len(texts), 1, 1, 1).requires_grad_(True)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        out = model(input_ids=batch.input_ids, pixel_values=pixels, attention_mask=batch.attention_mask)
        itm = out.itm_score if hasattr(out, "itm_score") else out.logits
        (itm[:, 1] - itm[:, 0]).sum().backward()
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def runner(adapter, image, texts, method: str):
    """The plain pass, or ``explain`` with ``method`` ("M rows": every encoder once per pair)."""
    if method == "plain":
        return lambda: plain(adapter, image, texts)
    name, _, rows = method.partition(" ")

    def fn():
        if rows == "rows":
            adapter.shares_image = adapter.shares_text = False
        try:
            cliplens.explain(adapter, image, texts, method=name)
        finally:
            adapter.__dict__.pop("shares_image", None)  # back to the class's
            adapter.__dict__.pop("shares_text", None)

    return fn


def case(model: str, size: str, method: str, P: int, repeats: int) -> dict:
    adapter = build(model, size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    texts = [f"a photo of a {WORDS[5 + i % 8]} {WORDS[13 + i % 4]}" for i in range(P)]
    fn = runner(adapter, image, texts, method)
    t_fn, t_plain, ratio = C.paired_ratio(fn, lambda: plain(adapter, image, texts), repeats=repeats)
    return {"seconds": t_fn, "plain_seconds": t_plain, "ratio": ratio}


def peak(model: str, size: str, method: str, P: int) -> dict:
    adapter = build(model, size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    texts = [f"a photo of a {WORDS[5 + i % 8]} {WORDS[13 + i % 4]}" for i in range(P)]
    fn = runner(adapter, image, texts, method)
    fn()  # warm-up: allocator pools and lazy imports are not the method's memory
    with C.PeakRSS() as p:
        fn()
    return {"peak_mb": p.peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("blip", "bridgetower"), default="blip")
    ap.add_argument("--size", choices=("base", "tiny"), default="base")
    ap.add_argument("--pairs", default="1,4", help="prompts per image (comma-separated)")
    ap.add_argument("--methods", default="chefer,raw_attention,gradcam")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        model, size, method, P = args.measure
        print(json.dumps(peak(model, size, method, int(P))))
        return
    name = {"blip": "BLIP ITM", "bridgetower": "BridgeTower ITM"}[args.model]
    print(f"random {name} ({args.size} sizes), torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    print("| pairs | method | s / pair | plain s / pair | time ratio | peak MB | plain peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for P in [int(x) for x in args.pairs.split(",")]:
        base_mem = C.measure_peak_in_subprocess(__file__, [args.model, args.size, "plain", str(P)], args.threads)["peak_mb"]
        for method in args.methods.split(","):
            t = case(args.model, args.size, method, P, args.repeats)
            mem = C.measure_peak_in_subprocess(__file__, [args.model, args.size, method, str(P)], args.threads)["peak_mb"]
            print(
                f"| {P} | {method} | {t['seconds'] / P:.3f} | {t['plain_seconds'] / P:.3f} | {t['ratio']:.2f} "
                f"| {mem:.0f} | {base_mem:.0f} | {mem / base_mem:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
