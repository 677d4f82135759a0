"""Tiny models built from configs: no network anywhere in the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ASSET_TOKENIZER = Path(__file__).resolve().parent.parent / "src" / "cliplens" / "assets" / "shapes-clip"


def tiny_clip_config(image_size=32, patch_size=8, vision_layers=3, text_layers=2, width=32, heads=4):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            vocab_size=49408,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=16,
    )


def clip_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSET_TOKENIZER)


def make_tiny_clip(seed=0, dtype=torch.float32, **kw):
    """A random CLIPModel, with weights scaled up so attention is far from uniform."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
        model.logit_scale.fill_(np.log(10.0))
    return model.to(dtype)


@pytest.fixture
def tiny_adapter():
    from cliplens.adapters import HFClipAdapter

    return HFClipAdapter(make_tiny_clip(), clip_tokenizer(), name="tiny")


def random_image(seed=0, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


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
