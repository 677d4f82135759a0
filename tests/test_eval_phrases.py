"""The per-phrase pointing game: items are reproducible and name their objects' tokens, a
whole-caption map can hit at most one named object per scene, a map equal to the object's
mask always hits, and the baselines score as computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cliplens.eval import phrases
from cliplens.eval.metrics import centre_prior, pointing_game
from cliplens.tokens import find_phrase


def test_items_are_reproducible_and_phrases_are_found():
    a = list(phrases.phrase_items(4, seed=3, size=64))
    b = list(phrases.phrase_items(4, seed=3, size=64))
    assert [x.caption for x in a] == [x.caption for x in b]
    for item in a:
        assert 2 <= len(item.phrases) <= 3 and len(item.masks) == len(item.phrases)
        assert all(m.shape == (64, 64) and m.any() for m in item.masks)
        assert item.alone == [f"a {p}" for p in item.phrases]
        assert item.caption == " and ".join(f"a {p}" for p in item.phrases)
        tokens = ["<start>", *item.caption.split(), "<end>"]
        start = 0
        for phrase in item.phrases:
            idx = find_phrase(tokens, phrase, start)
            assert " ".join(tokens[i] for i in idx) == phrase
            start = idx[-1] + 1


def test_mask_map_always_hits_and_centre_is_as_computed():
    item = next(phrases.phrase_items(1, seed=5, size=64))
    from cliplens.images import Geometry

    # the identity geometry: a 64 x 64 grid is the 64 x 64 scene
    geom = Geometry.from_dict(
        {"width": 64, "height": 64, "scale_x": 1.0, "scale_y": 1.0, "crop": [0, 0], "input_size": [64, 64]}
    )
    for mask in item.masks:
        assert phrases._hit(geom, mask.astype(float), mask)
        assert phrases._hit(geom, centre_prior((64, 64)), mask) == pointing_game(centre_prior((64, 64)), mask)


def test_whole_caption_hits_at_most_one_object_per_scene():
    res = phrases.evaluate_phrases("shapes", 3, seed=1, size=64, interaction_methods=("interactions",),
                                   first_order=("decomposition",))
    rows = {r["source"]: r for r in res.rows}
    assert list(rows) == ["interactions", "decomposition", "decomposition (phrase alone)", "random", "centre"]
    assert all(r["n"] == res.n_phrases for r in rows.values())
    assert rows["decomposition"]["hits"] <= res.n_scenes
    assert "| `interactions` |" in res.markdown()


def test_bad_arguments():
    from cliplens.errors import InputError

    with pytest.raises(InputError):
        phrases.evaluate_phrases("shapes", 0)
    with pytest.raises(InputError, match="unknown method"):
        phrases.evaluate_phrases("shapes", 1, first_order=("nope",))


def test_mosaics_tile_four_classes_with_quadrant_masks(tmp_path):
    """A folder dataset of 5 classes: each mosaic names 4 distinct classes, its caption has each
    class once, and class q's mask is quadrant q, where that class's image was pasted."""
    from PIL import Image

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = {"cat": (250, 0, 0), "dog": (0, 250, 0), "car": (0, 0, 250), "tree": (250, 250, 0), "boat": (0, 250, 250)}
    for name, rgb in colours.items():
        Image.new("RGB", (40, 30), rgb).save(root / "images" / f"{name}1.png")
        Image.new("L", (40, 30), 255).save(root / "masks" / f"{name}1__{name}.png")
    items = list(phrases.mosaic_items(f"folder:{root}", 3, seed=2, side=64))
    assert len(items) == 3
    for item in items:
        assert len(set(item.phrases)) == 4 and item.image.size == (64, 64)
        for name, mask in zip(item.phrases, item.masks):
            assert item.caption.count(f"a {name}") == 1
            assert mask.sum() == 32 * 32
            pixels = np.asarray(item.image)[mask]
            assert (np.abs(pixels.astype(int) - colours[name]).max(axis=1) < 8).all()
    res = phrases.evaluate_phrases("shapes", 1, items=items, interaction_methods=("interactions",), first_order=())
    assert res.n_scenes == 3 and res.n_phrases == 12
    for extra in ("dog1", "car1"):  # three classes left: too few for a mosaic
        (root / "images" / f"{extra}.png").unlink()
        (root / "masks" / f"{extra}__{extra[:-1]}.png").unlink()
    from cliplens.errors import InputError

    with pytest.raises(InputError, match="four classes"):
        list(phrases.mosaic_items(f"folder:{root}", 1, side=64))
