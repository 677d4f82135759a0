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
