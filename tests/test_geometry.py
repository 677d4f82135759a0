"""Maps come back onto the original image where the model saw the content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cliplens
from cliplens.adapters import HFClipAdapter
from cliplens.images import Geometry, Preprocess
from cliplens.methods.base import REGISTRY, Method, MethodResult, register
from conftest import clip_tokenizer, make_tiny_clip

PRE = Preprocess(size=32, crop=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_preprocess_geometry_landscape():
    img = Image.new("RGB", (300, 200))
    pixels, g = PRE(img)
    assert pixels.shape == (3, 32, 32)
    # shortest edge 200 -> 32, long edge int(32 * 300 / 200) = 48, centre crop 32: left 8
    assert (g.width, g.height) == (300, 200)
    assert g.scale_x == pytest.approx(48 / 300) and g.scale_y == pytest.approx(32 / 200)
    assert g.crop == (8.0, 0.0)
    seen = g.seen_mask()
    # columns whose centres map outside [0, 32) of the input are unseen: x*0.16 - 8 < 0 -> x < 50
    assert not seen[:, :49].any() and seen[:, 51:249].all() and not seen[:, 251:].any()


def test_grid_to_original_one_hot_lands_on_its_patch():
    g = Geometry(300, 200, 48 / 300, 32 / 200, (8.0, 0.0), (32, 32))
    grid = np.zeros((4, 4))
    grid[1, 2] = 1.0  # input pixels x in [16, 24), y in [8, 16)
    up = g.grid_to_original(grid)
    assert up.shape == (200, 300)
    y, x = np.unravel_index(np.nanargmax(up), up.shape)
    # back in the original: x = (u + 8) / 0.16 in [150, 200), y = v / 0.16 in [50, 100)
    assert 150 <= x < 200 and 50 <= y < 100
    assert np.isnan(up[:, :49]).all() and np.isfinite(up[:, 51:249]).all()


@pytest.fixture
def brightness_method():
    """A test-only method whose map is each patch's mean input value: its answer is known."""

    @register
    class Brightness(Method):
        name = "_brightness"
        summary = "test only"
        towers = ("image",)

        def compute(self, adapter, images, texts, target, *, towers, **_):
            px = images.pixel_values.mean(1)  # (B, h, w)
            ph, pw = adapter.patch_size
            B, h, w = px.shape
            grid = px.reshape(B, h // ph, ph, w // pw, pw).mean((2, 4))
            maps = grid[:, None].expand(B, len(texts), -1, -1)
            zeros = torch.zeros(B, len(texts))
            return MethodResult(maps, None, zeros, zeros, zeros)

    yield "_brightness"
    REGISTRY.pop("_brightness")


def test_map_lands_on_bright_square_in_non_square_image(brightness_method):
    adapter = HFClipAdapter(make_tiny_clip(), clip_tokenizer(), preprocess=PRE)
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[60:95, 155:195] = 255  # a bright square inside the centre crop, off-centre
    ex = cliplens.explain(adapter, arr, "anything", method=brightness_method)
    up = ex.map_on_original(0, 0)
    assert up.shape == (200, 300)
    y, x = np.unravel_index(np.nanargmax(up), up.shape)
    assert 60 <= y < 95 and 155 <= x < 195
    assert np.isnan(up[:, :40]).all()  # cut off by the centre crop: marked, not filled
    overlay = ex.overlay(0, 0)
    assert overlay.size == (300, 200)


def test_portrait_image_full_resize_keeps_everything(brightness_method):
    adapter = HFClipAdapter(make_tiny_clip(), clip_tokenizer(), preprocess=PRE)
    arr = np.zeros((300, 160, 3), dtype=np.uint8)
    arr[240:290, 10:60] = 255
    ex = cliplens.explain(adapter, arr, "x", method=brightness_method, resize="full")
    assert ex.image_maps.shape == (1, 1, 8, 4)  # 160 -> 32 wide, 300 -> 60 -> 64 tall
    up = ex.map_on_original(0, 0)
    assert np.isfinite(up).all()
    square = np.zeros(up.shape, dtype=bool)
    square[240:290, 10:60] = True
    # the map's mass sits on the square (patch-level blur allows some spill)
    assert up[square].mean() > 4 * up[~square].mean()
    assert up[250:280, 20:50].min() > up[:200].max()
