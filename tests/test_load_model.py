"""load_model: local directories, the Hugging Face cache in offline mode, model objects, errors."""

from __future__ import annotations

import shutil

import pytest
import torch

import cliplens
from cliplens.adapters import HFClipAdapter, load_model
from cliplens.errors import ModelLoadError
from conftest import make_tiny_clip


def test_local_directory(tiny_checkpoint):
    adapter = load_model(tiny_checkpoint)
    assert isinstance(adapter, HFClipAdapter)
    assert adapter.preprocess.size == 32 and adapter.preprocess.mean == (0.5, 0.5, 0.5)
    ref = make_tiny_clip()
    for (name, a), (_, b) in zip(adapter.model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_hub_name_from_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    """A hub name resolves from the HF cache layout with the hub switched off."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-clip" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_checkpoint, snap)
    (cache / "models--someone--tiny-clip" / "refs").mkdir()
    (cache / "models--someone--tiny-clip" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    adapter = load_model("someone/tiny-clip")
    assert adapter.name == "someone/tiny-clip"
    assert adapter.preprocess.std == (0.25, 0.25, 0.25)  # the cached processor config was read
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("someone/other-clip")


def test_model_object_with_and_without_tokenizer(tiny_checkpoint):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_checkpoint)  # knows where its tokenizer lives
    ex = cliplens.explain(model, cliplens_image(), ["a cat"])
    assert ex.image_maps.shape == (1, 1, 4, 4)
    bare = make_tiny_clip()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(bare)


def cliplens_image():
    from conftest import random_image

    return random_image(0)


def test_bad_specs(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(f)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable config"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot explain"):
        load_model(torch.nn.Linear(2, 2))


def test_clip_head_is_the_readout_of_the_readout_token(tiny_adapter):
    """ModelAdapter.head(tower, pooled): final norm + projection of the readout token; readout()
    is that token picked, then head()."""
    from conftest import random_image

    batch = tiny_adapter.tokenize(["a cat", "two red dogs"])
    pixels = tiny_adapter.prepare_images([random_image(3)])[0].pixel_values
    with tiny_adapter.explaining(), torch.no_grad():
        for run in (
            tiny_adapter.run_image(pixels),
            tiny_adapter.run_text(batch.input_ids, batch.attention_mask),
        ):
            last = run.block_outputs[-1]
            rows = torch.arange(last.shape[0])
            pooled = last[rows, run.layout.readout]
            torch.testing.assert_close(tiny_adapter.head(run.tower, pooled), run.embeds)
            torch.testing.assert_close(tiny_adapter.readout(run.tower, last, run.layout), run.embeds)


def test_adapt_and_load_model_loop_over_the_family_table(monkeypatch):
    """A family is one entry of adapters.families.FAMILIES: adapt() finds it by its matches(),
    load_model() by its spec prefix; no if-chain to extend."""
    from cliplens.adapters import families

    class Toy(torch.nn.Linear):
        pass

    toy = families.Family(
        "toy",
        matches=lambda model: isinstance(model, Toy),
        adapt=lambda model, tokenizer=None, **kw: ("adapted", model, tokenizer),
        load=lambda checkpoint: ("loaded", checkpoint),
        prefixes=("toy:",),
    )
    monkeypatch.setattr(families, "FAMILIES", [*families.FAMILIES, toy])
    model = Toy(2, 2)
    assert load_model(model, tokenizer="tok") == ("adapted", model, "tok")
    kind, checkpoint = load_model("toy:some/weights", dtype=torch.float64)
    assert kind == "loaded" and checkpoint.source == "some/weights" and checkpoint.name == "toy:some/weights"
    assert checkpoint.dtype == torch.float64
    with pytest.raises(ModelLoadError, match="cannot explain"):
        load_model(torch.nn.Linear(2, 2))


def test_a_given_tokenizer_is_used_for_a_checkpoint_directory(tiny_checkpoint):
    from conftest import clip_tokenizer

    tok = clip_tokenizer()
    assert load_model(tiny_checkpoint, tokenizer=tok).tokenizer is tok
