"""The small CLIP shipped in cliplens/assets/shapes-clip: loads offline, tokenises like
open_clip, preprocesses like training, and tells the shapes apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cliplens.worlds import shapes

ASSET = Path(__file__).resolve().parent.parent / "src" / "cliplens" / "assets" / "shapes-clip"
GOLDEN = Path(__file__).resolve().parent / "data" / "clip_token_ids.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEST_SEED = 777  # dataset seeds 777-779 are used neither in training (1, 2, 12-14) nor in the evaluation script


def _golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSET)


@pytest.fixture(scope="module")
def model():
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(ASSET).eval()


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(ASSET)


def test_checkpoint_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json"):
        assert (ASSET / name).is_file(), name
    total = sum(p.stat().st_size for p in ASSET.iterdir() if p.is_file())
    assert total <= 20_000_000, f"shapes-clip is {total / 1e6:.1f} MB"


def test_model_contract(model):
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    assert model.dtype == torch.float32  # stored as float16, computed in float32
    assert v.image_size // v.patch_size >= 8
    assert t.vocab_size == 49408 and t.max_position_embeddings == 77
    assert t.eos_token_id == 49407
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tokenizer_matches_golden_ids(tokenizer):
    golden = _golden()
    assert len(golden["cases"]) >= 15
    for case in golden["cases"]:
        ids = tokenizer(case["text"], truncation=True, max_length=golden["context_length"])["input_ids"]
        assert ids == case["ids"], case["text"]
    # The documented divergences stay what they were (a change means the tokenizer changed).
    for case in golden["known_divergences"]["cases"]:
        ids = tokenizer(case["text"], truncation=True, max_length=golden["context_length"])["input_ids"]
        assert ids == case["transformers_ids"], case["text"]


@pytest.mark.open_clip
def test_tokenizer_matches_open_clip(tokenizer):
    oc = pytest.importorskip("open_clip.tokenizer")
    texts = [c["text"] for c in _golden()["cases"]] + shapes.all_captions()[:5] + [
        shapes.compositional_caption(["purple star", "orange cross", "green circle"])
    ]
    ref = oc.tokenize(texts, context_length=77)
    for text, row in zip(texts, ref.tolist()):
        expected = row[: row.index(49407) + 1]
        assert tokenizer(text, truncation=True, max_length=77)["input_ids"] == expected, text


def test_every_caption_tokenises_without_truncation(tokenizer):
    longest = shapes.compositional_caption(shapes.all_labels()[:4])
    ids = tokenizer(longest)["input_ids"]
    assert len(ids) < 77 and ids[0] == 49406 and ids[-1] == 49407


def test_preprocessor_matches_training_input(model, processor):
    size = model.config.vision_config.image_size
    scene = shapes.make_scene(1, size=size)
    got = processor(images=[scene.image], return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(np.array(scene.image)).permute(2, 0, 1).float()[None] / 255.0
    want = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert got.shape == (1, 3, size, size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def _similarities(model, tokenizer, processor, scenes) -> tuple[list[str], torch.Tensor]:
    """Every colour x shape caption, and the cosine similarity of each scene with each
    (scenes drawn at the world's default size, resized by the model's processor)."""
    captions = shapes.all_captions()
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    text = torch.nn.functional.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
    x = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    img = torch.nn.functional.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
    return captions, img @ text.T


def _single_object_predictions(model, tokenizer, processor, n=12):
    scenes = [shapes.make_scene(shapes.scene_seed(TEST_SEED, i), n_objects=1) for i in range(n)]
    captions, sims = _similarities(model, tokenizer, processor, scenes)
    return [captions[p] for p in sims.argmax(1).tolist()], scenes


def test_colour_of_single_objects_is_known(model, tokenizer, processor):
    """What the shipped model has learned: the colour of the caption it picks is right."""
    preds, scenes = _single_object_predictions(model, tokenizer, processor)
    right = sum(p.split()[1] == s.objects[0].colour for p, s in zip(preds, scenes))
    assert right >= 11, f"colour right in {right}/12"


def test_zero_shot_on_fresh_single_object_scenes(model, tokenizer, processor):
    preds, scenes = _single_object_predictions(model, tokenizer, processor)
    correct = sum(p == s.captions[0] for p, s in zip(preds, scenes))
    assert correct >= 11, f"{correct}/12 correct"


def _scenes_ranked_right(model, tokenizer, processor, counts: list[int], dataset_seed: int) -> int:
    """How many scenes (one per entry of counts, with that many objects) have every present
    object's caption above every absent one."""
    scenes = [shapes.make_scene(shapes.scene_seed(dataset_seed, i), n_objects=k) for i, k in enumerate(counts)]
    captions, sims = _similarities(model, tokenizer, processor, scenes)
    ok = 0
    for scene, row in zip(scenes, sims):
        present = torch.tensor([c in scene.captions for c in captions])
        ok += bool(row[present].min() > row[~present].max())
    return ok


def test_both_objects_of_two_object_scenes_outrank_absent_ones(model, tokenizer, processor):
    ok = _scenes_ranked_right(model, tokenizer, processor, [2] * 10, TEST_SEED + 1)
    assert ok >= 8, f"{ok}/10 two-object scenes ranked correctly"


def test_present_objects_outrank_absent_ones(model, tokenizer, processor):
    """A quick check of the issue's multi-object target on scenes of 2, 3 and 4 objects. 18
    scenes cannot tell 94% from 95%: the target itself (every present caption above every
    absent one in >= 95% of scenes) is measured by scripts/eval_shapes_model.py, and the
    shipped model reaches 95.6% on its 3,000 scenes (docs/shapes-model.md)."""
    ok = _scenes_ranked_right(model, tokenizer, processor, [2, 3, 4] * 6, TEST_SEED + 2)
    assert ok >= 17, f"{ok}/18 scenes of 2-4 objects ranked correctly"


def test_eval_script_skips_a_part_given_zero_scenes_and_ranks_like_a_direct_count(
        model, tokenizer, processor, tmp_path, monkeypatch):
    """`scripts/eval_shapes_model.py --single 0 --chefer 0` measures only the multi-object
    ranking, and its share is the one counted directly on the same scenes."""
    import importlib.util
    import sys

    script = ASSET.parents[3] / "scripts" / "eval_shapes_model.py"
    spec = importlib.util.spec_from_file_location("eval_shapes_model", script)
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    out = tmp_path / "numbers.json"
    monkeypatch.setattr(sys, "argv", ["eval_shapes_model.py", "--single", "0", "--multi", "6", "--chefer", "0",
                                      "--threads", "1", "--json", str(out)])
    ev.main()
    got = json.loads(out.read_text())
    assert "single" not in got and "chefer" not in got
    counts = [2 + i % 3 for i in range(6)]  # the script's scenes: 2, 3, 4 objects in turn
    ok = _scenes_ranked_right(model, tokenizer, processor, counts, ev.MULTI_SEED)
    assert got["multi"]["n"] == 6
    assert got["multi"]["scenes_all_present_above_all_absent"] == pytest.approx(ok / 6)
    assert got["multi"]["standard_error"] == pytest.approx(((ok / 6) * (1 - ok / 6) / 6) ** 0.5)
