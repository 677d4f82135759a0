"""Shared pieces of the benchmarks: a ViT-B/16-sized random CLIP and the plain gradient pass
every explanation is compared with.

The baseline ("plain pass") for P prompts on one image: one forward of the model with the
image repeated P times and the P texts, the sum of the P pair logits back-propagated once to
the input (parameters frozen, as an explainer runs), in the model's default attention path.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

VOCAB = 49408


def build_clip(size: str = "b16", seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    if size == "b16":
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                    vocab_size=VOCAB, max_position_embeddings=77)
        proj = 512
    elif size == "quick":
        vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      image_size=112, patch_size=16)
        text = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    vocab_size=VOCAB, max_position_embeddings=77)
        proj = 128
    else:
        raise ValueError(size)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=proj))
    return model.eval()


def tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parent.parent / "src" / "cliplens" / "assets" / "shapes-clip"
    return AutoTokenizer.from_pretrained(root)


PROMPTS = [f"a photo of a {c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
           for s in ("cat", "dog", "car", "tree")]


def plain_pass(adapter, image, texts):
    """Forward with the image repeated P times, backward of the summed pair logits."""
    model = adapter.model
    batch = adapter.tokenize(texts)
    pixels = adapter.prepare_images([image])[0].pixel_values
    P = len(texts)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        px = pixels.repeat(P, 1, 1, 1).requires_grad_(True)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=px)
        out.logits_per_image.diagonal().sum().backward()
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def score_forward(adapter, image, texts):
    """The floor under any explanation: the model's own scoring of the one image against the P
    prompts (each tower once over its distinct inputs, default attention path, no graph)."""
    model = adapter.model
    batch = adapter.tokenize(texts)
    pixels = adapter.prepare_images([image])[0].pixel_values
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)


def paired_ratio(fn, base, repeats: int = 3) -> tuple[float, float, float]:
    """(median time of fn, median time of base, median of the per-repeat ratios fn / base).

    The two are timed back to back in each repeat, so load from other processes hits both
    and the per-repeat ratio stays steady even when absolute times drift."""
    fn(), base()
    tf, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base()
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn()
        tf.append(time.perf_counter() - t0)
    ratios = [f / b for f, b in zip(tf, tb)]
    return statistics.median(tf), statistics.median(tb), statistics.median(ratios)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples this process's resident memory every millisecond inside a ``with`` block;
    ``.peak_mb`` is the highest reading above the level at entry. Run it in a process whose
    malloc returns large blocks to the OS (MALLOC_MMAP_THRESHOLD_ pinned, see
    :func:`measure_peak_in_subprocess`) so the readings follow live tensors."""

    def __enter__(self):
        import threading

        self.base = current_rss_mb()
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, current_rss_mb())
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())
        self.peak_mb = self.peak - self.base
        return False


def measure_peak_in_subprocess(script: str, args: list[str], threads: int = 0) -> dict:
    """Run ``script --measure ...`` in a fresh interpreter; it prints one JSON line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, script, "--measure", *args] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def on_device(fn, device: torch.device):
    """``fn`` itself on the CPU; on CUDA, ``fn`` followed by a synchronisation, so that a timer
    around it measures the work and not the launch."""
    if device.type != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize()

    return synced


def cuda_peak_mb(run) -> float:
    """Peak CUDA allocation of one run (after a warm-up run) above what was allocated before it."""
    run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def random_photo(side_h: int = 256, side_w: int = 320):
    """A seeded random RGB image (PIL) of the given size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side_h, side_w, 3), dtype=np.uint8))


def plain_forward(adapter, image, texts):
    """One no-grad forward of the model over the image and the P texts (default attention)."""
    batch = adapter.tokenize(texts)
    pixels = adapter.prepare_images([image])[0].pixel_values
    with torch.no_grad():
        adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)
