"""`cliplens demo` end to end: every method, a page whose references all exist."""

from __future__ import annotations

import re

import numpy as np

from cliplens.adapters import HFClipAdapter
from cliplens.demo import peak_object, run_demo
from cliplens.methods import REGISTRY
from cliplens.worlds import shapes
from conftest import clip_tokenizer, make_tiny_clip


def test_demo_writes_complete_page(tmp_path):
    adapter = HFClipAdapter(make_tiny_clip(), clip_tokenizer(), name="tiny")
    out = tmp_path / "demo"
    rows = run_demo(out, model=adapter, seed=5, progress=False)
    methods = [m for m in REGISTRY if not m.startswith("_")]
    assert [r.method for r in rows] == methods
    page = (out / "index.html").read_text()
    refs = re.findall(r"src='([^']+)'", page)
    assert "scene.png" in refs
    assert len(refs) == 1 + len(methods) * 4  # 3 objects + 1 absent prompt per method
    for ref in refs:
        assert (out / ref).is_file(), ref
    scene = shapes.make_scene(5, n_objects=3, size=224)
    for label in scene.labels:
        assert f"a {label}" in page
    for r in rows:
        assert r.hits[-1] is None and all(h in (True, False) for h in r.hits[:-1])


def test_peak_object_reads_the_masks():
    scene = shapes.make_scene(2, n_objects=2, size=96)
    obj = scene.objects[-1]  # drawn last: never occluded
    heat = np.zeros((96, 96))
    ys, xs = np.nonzero(obj.mask)
    heat[ys[0], xs[0]] = 1.0
    assert peak_object(heat, scene) == obj.label
    background = ~np.any([o.mask for o in scene.objects], axis=0)
    by, bx = np.argwhere(background)[0]
    heat2 = np.zeros((96, 96))
    heat2[by, bx] = 1.0
    assert peak_object(heat2, scene) == "background"
    assert peak_object(np.full((96, 96), np.nan), scene) == "nothing"
