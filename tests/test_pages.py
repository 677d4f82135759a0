"""viz.pages: overlay files, cards and results entries from an Explanation (hand-built, no model)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from cliplens.explanation import Explanation
from cliplens.images import Geometry
from cliplens.viz import pages
from cliplens.viz.colors import colorize
from cliplens.viz.html import write_page
from test_explanation import P, first_prompt_only, make


def test_overlay_names_unique_whatever_the_labels():
    labels = ["a/cat.jpg", "b/cat.jpg", "cat-2.png", "cat.png"]
    texts = ["a cat", "a cat!", "A CAT"]  # the same slug three times
    names = {
        pages.overlay_name(b, label, p, t) for b, label in enumerate(labels) for p, t in enumerate(texts)
    }
    assert len(names) == len(labels) * len(texts)
    assert pages.overlay_name(1, "b/cat.jpg", 2, "a cat") == "001-cat__02-a-cat.png"


def test_display_range_per_mode():
    grid = np.array([[-1.0, 0.5], [np.nan, 2.0]])
    assert pages.display_range(grid, "minmax") == (-1.0, 2.0)
    assert pages.display_range(grid, "positive") == (0.0, 2.0)
    assert pages.display_range(grid, "signed") == (-2.0, 2.0)
    assert pages.display_range(np.full((2, 2), np.nan)) is None
    with pytest.raises(ValueError):
        pages.display_range(grid, "log")


@pytest.mark.parametrize("mode", pages.MODES)
def test_overlay_palette_pinned_to_the_bar(tmp_path, mode):
    """The patch holding the map's maximum is drawn in the bar's right-hand colour."""
    ex = make()  # 2 x 3 grids; on 9 x 6 pixel images each patch is 3 x 3 pixels
    rng = np.random.default_rng(0)
    ex = Explanation(
        **{
            **ex.__dict__,
            "geometries": [Geometry(9, 6, 1.0, 1.0, (0.0, 0.0), (9, 6))] * 2,
            "images": [rng.integers(0, 256, (6, 9, 3), dtype=np.uint8) for _ in range(2)],
        }
    )
    names = pages.write_overlays(ex, tmp_path, ["x.png", "y.png"], mode=mode)
    grid = ex.grid_map(1, 2)
    signed = mode == "signed"
    i, j = np.unravel_index(np.argmax(np.abs(grid) if signed else grid), grid.shape)
    img = np.asarray(Image.open(tmp_path / names[1][2]), dtype=float)
    y, x = 3 * i + 1, 3 * j + 1  # the patch's centre pixel: the map's own value there
    end = np.sign(grid[i, j]) if signed else 1.0  # the bar's end that this value stands at
    top = colorize(np.array([end]), signed=signed)[0].astype(float)
    want = 0.5 * ex.images[1][y, x] + 0.5 * top
    np.testing.assert_allclose(img[y, x], want, atol=1.01)
    card = pages.pair_card(ex, 1, 2, names[1][2], mode=mode)
    lo, hi = pages.display_range(grid, mode)
    ends = re.findall(r"<span>([^<]*)</span>", card.below)
    assert ends[0] == pages.number(lo) and ends[-1] == pages.number(hi)


def test_constant_and_flat_pairs_drawn_plain_with_a_note(tmp_path):
    ex = make(target="contrast:1")
    maps = ex.image_maps.copy()
    maps[0, 2] = 0.25 + 1e-9 * np.arange(6).reshape(2, 3)  # rounding noise: flat
    ex = Explanation(**{**ex.__dict__, "image_maps": maps})
    notes = pages.pair_notes(ex)
    assert [[n is not None for n in row] for row in notes] == [[False, True, True], [False, True, False]]
    assert "contrast of a prompt with itself" in notes[0][1] and "flat map" in notes[0][2]
    names = pages.write_overlays(ex, tmp_path, ["x.png", "y.png"])
    for b, p in [(0, 1), (0, 2), (1, 1)]:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / names[b][p])), ex.images[b])
        card = pages.pair_card(ex, b, p, names[b][p], note=notes[b][p])
        assert "nomap" in card.below and "bar" not in card.below
    assert not np.array_equal(np.asarray(Image.open(tmp_path / names[0][0])), ex.images[0])
    constant_tokens = pages.pair_card(ex, 0, 1, "", note=notes[0][1]).tokens
    assert "rgb(225,225,225)" in constant_tokens  # grey chips: their scores explain nothing
    assert "rgb(225,225,225)" not in pages.pair_card(ex, 0, 0, "").tokens


def test_card_reads_numbers_folds_long_prompts_and_labels_one_prompt_softmax():
    ex = make()
    long = "a very long prompt " * 6
    ex = Explanation(**{**ex.__dict__, "texts": [ex.texts[0], long, ex.texts[2]]})
    card = pages.pair_card(ex, 0, 1, "f.png", extra="<i>verdict</i>")
    assert "<details class='fold'>" in card.caption and "<i>verdict</i>" in card.caption
    assert f"logit {pages.number(ex.logits[0, 1])}" in card.caption
    for tok, score in ex.token_table(0, 1):
        assert f"{tok}<small>{pages.number(score)}</small>" in card.tokens
    assert "prompt truncated" in pages.pair_card(ex, 0, 2, "").caption
    table = pages.prompt_table(ex, 1)
    for p in range(P):
        assert pages.number(ex.logits[1, p]) in table and pages.number(ex.probs[1, p]) in table
    best = int(np.argmax(ex.probs[1]))
    assert table.split("<tr")[best + 2].startswith(" class=best")
    one = first_prompt_only(ex)
    assert "one-prompt softmax: 1 by construction" in pages.pair_card(one, 0, 0, "").caption
    assert "one-prompt softmax" in pages.prompt_table(one, 0)


def test_sections_and_results_agree(tmp_path):
    ex = make(((2, 3), (3, 2)))
    images = tmp_path / "in"
    images.mkdir()
    labels = [str(images / "a.png"), str(images / "b.png")]
    out = tmp_path / "out"
    out.mkdir()
    overlays = pages.write_overlays(ex, out, labels)
    sections = pages.image_sections(ex, labels, overlays)
    assert [s.heading for s in sections] == labels
    assert [[c.image for c in s.cards] for s in sections] == overlays
    write_page(out / "index.html", "t", sections)
    page = (out / "index.html").read_text()
    assert sorted(re.findall(r"src='([^']+)'", page)) == sorted(n for row in overlays for n in row)
    d = json.loads(json.dumps(pages.results(ex, labels, overlays, out), allow_nan=False))
    assert [im["path"] for im in d["images"]] == ["../in/a.png", "../in/b.png"]
    for e in d["pairs"]:
        assert e["overlay"] == overlays[e["image_index"]][e["prompt_index"]]
        assert e["image"] == d["images"][e["image_index"]]["path"]
    assert d["display"] == {"normalise": "minmax"}


def test_signed_overlay_leaves_zero_regions_as_the_photo():
    """A signed map is white at 0 in its palette; blended by magnitude, zero pixels show the
    photo unchanged and the extreme pixels carry the palette's ends."""
    from cliplens.viz import overlay

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    heat = np.zeros((20, 30))
    heat[5, 5], heat[10, 10] = 2.0, -2.0
    out = np.asarray(overlay(photo, heat, mode="signed", alpha=0.5)).astype(int)
    zero = heat == 0
    assert np.abs(out[zero] - photo[zero]).max() <= 1
    from cliplens.viz import colorize

    # the extremes are blended with the full alpha with the palette's ends
    for (y, x), end in (((5, 5), 1.0), ((10, 10), -1.0)):
        want = 0.5 * photo[y, x] + 0.5 * colorize(np.array([end]), signed=True)[0]
        assert np.abs(out[y, x] - want).max() <= 1


def test_image_scale_shares_the_palette_across_an_images_prompts():
    """--scale image: every prompt of an image uses one colour range (the range of all its
    maps), so a weak map is drawn weak; --scale pair stretches each map on its own."""
    import cliplens
    from cliplens.viz import pages
    from conftest import hf_clip_factory, random_image

    ex = cliplens.explain(hf_clip_factory(seed=0), [random_image(1)], ["a cat", "a red dog", "x"], method="chefer")
    shared = [pages.pair_range(ex, 0, p, "minmax", "image") for p in range(3)]
    assert shared[0] == shared[1] == shared[2]
    values = np.concatenate([np.ravel(ex.grid_map(0, p)) for p in range(3)])
    assert shared[0] == (values.min(), values.max())
    own = pages.pair_range(ex, 0, 1, "minmax", "pair")
    assert own == (ex.grid_map(0, 1).min(), ex.grid_map(0, 1).max())
