"""The reference loops of ``benchmarks/bench_speed.py`` (re-implementations of Chefer's CLIP
notebook ``interpret`` and legrad-torch's wrapper, timed beside cliplens) compute what cliplens
computes: the benchmark's "x reference" column compares the same maps, not cheaper or dearer
work. Tiny CLIP in float64 (the loops read transformers' eager attention, which runs its
softmax in float32: the oracle swaps in a float64 one), every pair of one image and three
prompts of different lengths, to 1e-10 of the scale."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter
from families import clip_tokenizer, make_tiny_clip, random_image
from helpers import exact_eager_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_speed as bench  # noqa: E402

IMAGE = random_image(3)
TEXTS = ["a red triangle", "a photo of a small dog", "cat"]


@pytest.fixture
def adapter(monkeypatch):
    exact_eager_attention(monkeypatch)
    return HFClipAdapter(make_tiny_clip(seed=0, dtype=torch.float64), clip_tokenizer(), name="tiny")


def _reference(adapter, loop, *args):
    """A reference loop as the benchmark runs it: every parameter requiring grad, the model's
    attention implementation restored after."""
    model = adapter.model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    attn = model.config._attn_implementation
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        return loop(adapter, IMAGE, TEXTS, *args)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.set_attn_implementation(attn)


def _close(have, want):
    np.testing.assert_allclose(have, want, rtol=0, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_legrad_reference_loop_computes_cliplens_legrad(adapter, layers):
    """legrad-torch's cosine target is cliplens's logit target over the logit scale."""
    want = cliplens.explain(adapter, IMAGE, TEXTS, method="legrad", layers=layers, towers=("image",))
    have = _reference(adapter, bench.legrad_reference, layers).detach().numpy()
    scale = float(adapter.logit_scale())
    _close(have * scale, np.asarray(want.image_maps).reshape(len(TEXTS), -1))


@pytest.mark.parametrize("start", [-1, 0])
def test_chefer_reference_loop_computes_cliplens_chefer(adapter, start):
    """The image relevance row and the text relevance at the end-of-text row (its token
    scores), from the last block (the default) or every block."""
    want = cliplens.explain(adapter, IMAGE, TEXTS, method="chefer", start_layer=start)
    image_row, text_row = (t.detach().numpy() for t in _reference(adapter, bench.chefer_reference, start))
    _close(image_row, np.asarray(want.image_maps).reshape(len(TEXTS), -1))
    for p, scores in enumerate(want.token_scores[0]):
        scores = np.asarray(scores, dtype=np.float64)
        _close(text_row[p, : len(scores)][np.isfinite(scores)], scores[np.isfinite(scores)])
