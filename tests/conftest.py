"""Fixtures for the tests. The tiny-model factories live in tests/families.py (imported here
too, so that ``from conftest import make_tiny_clip`` keeps working)."""

from __future__ import annotations

import pytest

from families import (  # noqa: F401  (re-exported for the test modules)
    ADAPTER_FACTORIES,
    ASSET_TOKENIZER,
    clip_tokenizer,
    hf_clip_factory,
    hf_siglip2_factory,
    hf_siglip_factory,
    make_tiny_clip,
    make_tiny_open_clip,
    make_tiny_siglip,
    make_tiny_siglip2,
    open_clip_factory,
    random_image,
    tiny_clip_config,
    tiny_open_clip_cfg,
    tiny_siglip_config,
)


@pytest.fixture
def tiny_adapter():
    from cliplens.adapters import HFClipAdapter

    return HFClipAdapter(make_tiny_clip(), clip_tokenizer(), name="tiny")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny CLIP saved like a real checkpoint (config, weights, tokenizer, processor)."""
    import json

    model = make_tiny_clip()
    path = tmp_path / "tiny-clip"
    model.save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 32},
                "crop_size": {"height": 32, "width": 32},
                "do_center_crop": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
                "resample": 3,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared machine: one torch thread is many times faster; restored after.
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
