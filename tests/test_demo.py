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
    # every method on the model, then the embedded shapes BLIP (a fusion model) with its own
    fusion = ["shapes-blip: chefer", "shapes-blip: raw_attention", "shapes-blip: gradcam"]
    methods = [m for m in REGISTRY if not m.startswith("_")] + fusion
    assert [r.method for r in rows] == methods
    page = (out / "index.html").read_text()
    refs = re.findall(r"src='([^']+)'", page)
    assert "scene.png" in refs
    assert len(refs) == 1 + len(methods) * 4  # 3 objects + 1 absent prompt per method
    for ref in refs:
        assert (out / ref).is_file(), ref
    assert len(set(refs)) == len(refs)  # one file per card
    assert page.count("class='bar'") + page.count("class='nomap'") == len(methods) * 4  # a colour bar or a note under each
    scene = shapes.make_scene(5, n_objects=3, size=224)
    for label in scene.labels:
        assert f"a {label}" in page
    for r in rows:
        assert r.hits[-1] is None and all(h in (True, False) for h in r.hits[:-1])


def test_peak_object_reads_the_masks():
    from cliplens.images import Geometry

    scene = shapes.make_scene(2, n_objects=2, size=96)
    geom = Geometry(96, 96, 64 / 96, 64 / 96, (0.0, 0.0), (64, 64))  # 96 px scene -> 64 px input, 8 x 8 grid
    obj = scene.objects[-1]  # drawn last: never occluded
    cy, cx = (np.array(np.nonzero(obj.mask)).mean(1) / 12).astype(int)  # 12 original px per patch
    grid = np.zeros((8, 8))
    grid[cy, cx] = 1.0
    assert peak_object(grid, geom, scene) == obj.label
    covered = np.zeros((8, 8), dtype=bool)
    for o in scene.objects:
        covered |= o.mask.reshape(8, 12, 8, 12).any((1, 3))
    by, bx = np.argwhere(~covered)[0]
    grid2 = np.zeros((8, 8))
    grid2[by, bx] = 1.0
    assert peak_object(grid2, geom, scene) == "background"
    assert peak_object(np.full((8, 8), np.nan), geom, scene) == "nothing"


def test_the_demo_shapes_blip_points_at_the_named_objects(tmp_path):
    """The embedded shapes BLIP explained by the bi-modal rules: on the demo's default scene
    chefer's peak lies on each named object (ground truth from the world's masks)."""
    rows = run_demo(tmp_path / "demo", seed=0, methods=["chefer"], progress=False)
    by = {r.method: r for r in rows}
    assert by["shapes-blip: chefer"].hits[:-1] == [True, True, True]
    page = (tmp_path / "demo" / "index.html").read_text()
    assert "bi-modal and encoder-decoder relevance rules" in page
