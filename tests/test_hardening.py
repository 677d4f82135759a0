"""Hardening against bad and large input (issue 19): each test fails without its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cliplens
from cliplens.adapters import load_model
from cliplens.errors import CliplensError, ImageError, InputError, ModelLoadError


def run_cli(args, capsys=None):
    from cliplens.cli import main

    return main([str(a) for a in args])


# ---- 1. a checkpoint without its tokenizer -------------------------------------------------------


def test_checkpoint_without_tokenizer_files_is_refused(tiny_checkpoint):
    for f in tiny_checkpoint.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    with pytest.raises(ModelLoadError, match="tokenizer") as info:
        load_model(tiny_checkpoint)
    assert "\n" not in str(info.value)


def test_tokenizer_that_encodes_prompts_alike_is_refused(tiny_checkpoint):
    from cliplens.adapters.hf_encoder import check_tokenizer_fits

    class Same:
        def __len__(self):
            return 49408

        def __call__(self, text):
            return {"input_ids": [49406, 320, 49407]}

    model = load_model(tiny_checkpoint).model
    with pytest.raises(ModelLoadError, match="alike"):
        check_tokenizer_fits(Same(), model.text_model, "x")
    load_model(tiny_checkpoint)  # its own tokenizer fits


# ---- 2. the checkpoint's own CLIP processor, every variant ---------------------------------------

PROCESSOR_VARIANTS = {
    "shortest_edge+crop": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    "squash": {"size": {"height": 32, "width": 40}, "do_center_crop": False},
    "squash+crop": {"size": {"height": 40, "width": 48}, "crop_size": {"height": 32, "width": 32}},
    "squash+uneven crop": {"size": {"height": 45, "width": 37}, "crop_size": {"height": 24, "width": 32}},
}


@pytest.mark.parametrize("variant", list(PROCESSOR_VARIANTS))
@pytest.mark.parametrize("shape", [(53, 37), (30, 70)])
def test_clip_processor_variants_match_transformers(variant, shape):
    import warnings

    from cliplens.preprocess import preprocess_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

    cfg = {"do_center_crop": True, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25], "resample": 3}
    cfg.update(PROCESSOR_VARIANTS[variant])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8))
    want = CLIPImageProcessor(**cfg)(images=image, return_tensors="np")["pixel_values"][0]
    got, geometry = preprocess_from_config(cfg, 32)(image)
    assert tuple(got.shape) == want.shape, variant
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4)
    assert geometry.input_size == (want.shape[2], want.shape[1])


# ---- 3. the token count of resize="full" ---------------------------------------------------------


def test_thin_image_full_resize_is_refused_by_token_count(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLIPLENS_MAX_TOKENS", raising=False)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1000, 3), (200, 10, 10)).save(thin)
    with pytest.raises(InputError, match="CLIPLENS_MAX_TOKENS") as info:
        cliplens.explain("shapes", str(thin), ["a red square"], resize="full")
    assert "patch tokens" in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()
    code = run_cli(["explain", thin, "-m", "shapes", "-t", "a red square", "--resize", "full", "--out", tmp_path / "o"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_max_tokens_option_and_env_raise_the_limit(tmp_path, monkeypatch):
    from cliplens.preprocess import Preprocess

    monkeypatch.setenv("CLIPLENS_MAX_TOKENS", "3")
    recipe = Preprocess(size=32, crop=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(InputError, match="limit of 3"):
        recipe(Image.new("RGB", (64, 32)), resize="full", patch_size=8)
    monkeypatch.setenv("CLIPLENS_MAX_TOKENS", "32")
    pixels, _ = recipe(Image.new("RGB", (64, 32)), resize="full", patch_size=8)
    assert tuple(pixels.shape) == (3, 32, 64)


# ---- 4. overlays at display size -----------------------------------------------------------------


def _overlay_peak(size):
    import tracemalloc

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ex = cliplens.explain("shapes", image, ["a red square"])
    tracemalloc.start()
    picture = ex.overlay(0, 0, max_side=128)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return picture, peak


def test_overlay_at_display_size_uses_memory_independent_of_the_source():
    small, small_peak = _overlay_peak((160, 120))
    big, big_peak = _overlay_peak((2400, 1800))
    assert small.size == (128, 96) and big.size == (128, 96)
    # the source is 4.3 million pixels: a full-size float map alone would be 35 MB
    assert big_peak < 4 * small_peak + 2_000_000, (small_peak, big_peak)


def test_cli_overlays_are_display_size_unless_asked(tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (1500, 600), (30, 60, 90)).save(image)
    assert run_cli(["explain", image, "-m", "shapes", "-t", "a red square", "--out", tmp_path / "a"]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    assert Image.open(png).size == (1024, 410)
    assert run_cli(["explain", image, "-m", "shapes", "-t", "x", "--overlay-size", "0", "--out", tmp_path / "b"]) == 0
    (png,) = (tmp_path / "b").glob("*.png")
    assert Image.open(png).size == (1500, 600)
