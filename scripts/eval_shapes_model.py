"""Measure the shipped shapes-world CLIP on fresh scenes (seeds never used in training).

    .venv/bin/python scripts/eval_shapes_model.py [--model DIR] [--json out.json]

Three numbers, each on its own fresh dataset seed (training used dataset seeds 1, 2 and 12-14):

1. zero-shot accuracy on single-object scenes: the image is assigned the caption
   ("a red triangle") with the highest similarity among all colour x shape captions;
2. multi-object ranking on scenes of 2 to 4 objects: a scene counts as correct when every
   present object's caption scores above every absent label's caption (3,000 scenes by
   default, for a standard error of about 0.4 points near 95%; it is printed with the share);
3. Chefer relevance on scenes of 2 or 3 objects, through ``cliplens.explain(...,
   method="chefer")`` with each present object's caption as a prompt: a (scene, object)
   pair is a hit when the object's visible mask covers at least one pixel of the patch
   with the largest relevance (argmax of the raw map). Also shown: the same with the
   stricter rule "the object covers at least half of that patch", and the chance rate (a
   patch drawn uniformly at random from the grid), for scale.

Scenes are drawn at the world's default size (224 px), the way ``cliplens demo`` and the
evaluation harness draw them, and the model's image processor resizes them to its input, as
it does any image; ``--draw-size`` draws them at another size (``--draw-size 64`` feeds the
64-px model its input size unresized, with the jagged edges of a small drawing). Patch
(i, j) covers scene pixels [i*p:(i+1)*p, j*p:(j+1)*p] with p = draw size / grid side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import cliplens  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT / "src"))

from cliplens.worlds import shapes  # noqa: E402

DEFAULT_MODEL = ROOT / "src" / "cliplens" / "assets" / "shapes-clip"
SINGLE_SEED, MULTI_SEED, CHEFER_SEED = 1000, 1001, 1002
TRAINING_SEEDS = (1, 2, 12, 13, 14)  # train_shapes.py: training and validation
DRAW_SIZE = shapes.DEFAULT_SIZE


def load(model_dir: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    return model, tokenizer, processor


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    out = model.get_text_features(**enc)
    out = getattr(out, "pooler_output", out)
    return torch.nn.functional.normalize(out, dim=-1)


@torch.no_grad()
def image_features(model, processor, images, batch: int = 100) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), batch):
        px = processor(images=images[i : i + batch], return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=px)
        out = getattr(out, "pooler_output", out)
        feats.append(torch.nn.functional.normalize(out, dim=-1))
    return torch.cat(feats)


def eval_single(model, tokenizer, processor, n: int, size: int) -> dict:
    labels = shapes.all_labels()
    text = text_features(model, tokenizer, shapes.all_captions())
    scenes = [shapes.make_scene(shapes.scene_seed(SINGLE_SEED, i), n_objects=1, size=size) for i in range(n)]
    sims = image_features(model, processor, [s.image for s in scenes]) @ text.T
    pred = sims.argmax(1).tolist()
    truth = [labels.index(s.labels[0]) for s in scenes]
    wrong = [(labels[t], labels[p]) for t, p in zip(truth, pred) if t != p]
    per_label = Counter(labels[t] for t in truth)
    return {
        "n": n,
        "correct": n - len(wrong),
        "accuracy": (n - len(wrong)) / n,
        "classes": len(labels),
        "min_scenes_per_label": min(per_label[label] for label in labels),
        "errors": Counter(f"{a} -> {b}" for a, b in wrong).most_common(10),
    }


def eval_multi(model, tokenizer, processor, n: int, size: int) -> dict:
    labels = shapes.all_labels()
    text = text_features(model, tokenizer, shapes.all_captions())
    scenes = [
        shapes.make_scene(shapes.scene_seed(MULTI_SEED, i), n_objects=2 + i % 3, size=size) for i in range(n)
    ]
    sims = (image_features(model, processor, [s.image for s in scenes]) @ text.T).numpy()
    ok_by_n: dict[int, list[bool]] = {}
    pair_total = pair_ok = 0
    for scene, row in zip(scenes, sims):
        present = np.zeros(len(labels), bool)
        present[[labels.index(a) for a in scene.labels]] = True
        ok = row[present].min() > row[~present].max()
        ok_by_n.setdefault(len(scene.objects), []).append(bool(ok))
        # pairwise view: share of (present, absent) pairs ordered correctly
        pair_ok += int((row[present][:, None] > row[~present][None, :]).sum())
        pair_total += int(present.sum() * (~present).sum())
    all_ok = [v for vs in ok_by_n.values() for v in vs]
    share = float(np.mean(all_ok))
    return {
        "n": n,
        "scenes_all_present_above_all_absent": share,
        # binomial standard error of that share: the 95% interval is about +- 1.96 of it
        "standard_error": math.sqrt(share * (1.0 - share) / n),
        "by_objects": {k: float(np.mean(v)) for k, v in sorted(ok_by_n.items())},
        "pairs_ordered": pair_ok / pair_total,
    }


def eval_chefer(model_dir: Path, n: int, size: int, options: dict) -> dict:
    from cliplens import explain, load_model

    adapter = load_model(str(model_dir)) if model_dir != DEFAULT_MODEL else load_model("shapes")
    hits = strict = 0
    chance = []
    total = 0
    by_objects: dict[int, list[bool]] = {}
    for i in range(n):
        scene = shapes.make_scene(shapes.scene_seed(CHEFER_SEED, i), n_objects=2 + i % 2, size=size)
        ex = explain(adapter, images=[scene.image], texts=scene.captions, method="chefer", **options)
        g = ex.geometries[0]
        if tuple(g.crop) != (0.0, 0.0) or g.scale_x != g.scale_y:
            raise SystemExit(f"expected a plain resize of the {size}px scene, got {g}")
        maps = np.asarray(ex.image_maps)[0]  # P x Gh x Gw
        gh, gw = maps.shape[-2:]
        ph, pw = size // gh, size // gw  # scene pixels per patch
        for obj, m in zip(scene.objects, maps):
            r, c = np.unravel_index(int(np.argmax(m)), m.shape)
            cell = obj.mask[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
            hit = bool(cell.any())
            hits += hit
            strict += bool(cell.mean() >= 0.5)
            touched = obj.mask.reshape(gh, ph, gw, pw).any(axis=(1, 3))
            chance.append(touched.mean())
            by_objects.setdefault(len(scene.objects), []).append(hit)
            total += 1
    return {
        "scenes": n,
        "pairs": total,
        "options": options,
        "top_patch_on_object": hits / total,
        "top_patch_half_covered_by_object": strict / total,
        "chance_any_pixel": float(np.mean(chance)),
        "by_objects": {k: float(np.mean(v)) for k, v in sorted(by_objects.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Evaluate the shapes-world CLIP on fresh seeds.")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--single", type=int, default=1500, help="single-object scenes (0: skip)")
    ap.add_argument("--multi", type=int, default=3000,
                    help="scenes of 2-4 objects (0: skip); 3,000 give the share a standard error of about 0.4 "
                         "points near 95%%")
    ap.add_argument("--chefer", type=int, default=300, help="scenes of 2-3 objects for Chefer relevance (0: skip)")
    ap.add_argument("--chefer-start-layer", type=int, nargs="*", default=[None, 0],
                    help="start_layer values to report (None = the method's default)")
    ap.add_argument("--draw-size", type=int, default=DRAW_SIZE,
                    help="draw the scenes at this size; the model's processor resizes them to its input "
                         f"(default {DRAW_SIZE}, the world's default size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    assert not {SINGLE_SEED, MULTI_SEED, CHEFER_SEED} & set(TRAINING_SEEDS)
    model, tokenizer, processor = load(args.model)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    size = args.draw_size
    if size <= 0 or size % grid:
        raise SystemExit(f"--draw-size must be a positive multiple of the {grid} x {grid} patch grid, got {size}")
    results: dict = {"model": str(args.model), "image_size": size}

    if args.single > 0:
        t = time.time()
        r = eval_single(model, tokenizer, processor, args.single, size)
        results["single"] = r
        print(f"single-object zero-shot ({r['classes']}-way, {r['n']} scenes, dataset seed {SINGLE_SEED}): "
              f"{r['accuracy']:.2%} ({r['correct']}/{r['n']})  [{time.time() - t:.0f}s]")
        if r["errors"]:
            print("  most common errors (truth -> predicted):", ", ".join(f"{e} x{c}" for e, c in r["errors"]))

    if args.multi > 0:
        t = time.time()
        r = eval_multi(model, tokenizer, processor, args.multi, size)
        results["multi"] = r
        by = ", ".join(f"{k} objects {v:.1%}" for k, v in r["by_objects"].items())
        print(f"multi-object ranking ({r['n']} scenes of 2-4 objects, dataset seed {MULTI_SEED}): every present "
              f"caption above every absent one in {r['scenes_all_present_above_all_absent']:.2%} of scenes "
              f"(+- {1.96 * r['standard_error']:.2%} for 95% confidence; {by}); (present, absent) pairs ordered: {r['pairs_ordered']:.2%}  [{time.time() - t:.0f}s]")

    if args.chefer > 0:
        results["chefer"] = []
        for start in args.chefer_start_layer:
            t = time.time()
            options = {} if start is None else {"start_layer": start}
            try:
                r = eval_chefer(args.model, args.chefer, size, options)
            except ImportError as e:
                print(f"Chefer relevance: cliplens API not available ({e})")
                break
            results["chefer"].append(r)
            by = ", ".join(f"{k} objects {v:.1%}" for k, v in r["by_objects"].items())
            name = "default start_layer" if start is None else f"start_layer={start}"
            print(f"Chefer relevance ({name}; {r['scenes']} scenes of 2-3 objects, {r['pairs']} prompts, "
                  f"dataset seed {CHEFER_SEED}): top patch on the object {r['top_patch_on_object']:.2%} "
                  f"({by}); object covers >= half the top patch {r['top_patch_half_covered_by_object']:.2%}; "
                  f"chance {r['chance_any_pixel']:.2%}  [{time.time() - t:.0f}s]")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
