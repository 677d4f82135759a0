"""Measure the shipped shapes-world BLIP (image-text matching) on fresh scenes.

    .venv/bin/python scripts/eval_shapes_blip.py [--model DIR] [--json out.json]

Training used dataset seeds 1 (training pool), 31 and 32 (watched during training); this
script draws from seeds 2000 (one-object scenes), 2001 (2-4 objects, in turn) and, for the
numbers the test checks, ``TEST_SEED`` (the scenes of ``tests/test_shapes_blip.py``). Scenes
are drawn at the world's default size (224 px) and resized by the model's own image
processor (``BlipImageProcessor.from_pretrained``), the way any image reaches the model; the
captions are tokenized by its own tokenizer, and every score is ``softmax(itm_score)[:, 1]``
(P(match)) of a plain ``BlipForImageTextRetrieval(input_ids, pixel_values, attention_mask,
use_itm_head=True)`` call.

Numbers:

(a) swap ranking. For every present object ("a red triangle") and every *colour swap*
    (same shape, another colour, a label absent from the scene: "a blue triangle") and
    every *shape swap* (same colour, another shape, absent): is P(match) of the true
    caption above that of the swap? Reported as the share of such pairs that are right,
    separately for colour and shape swaps and for one-object and multi-object scenes; for
    multi-object scenes also the *binding* swaps alone (the new colour, or shape, belongs
    to another object of the scene, so only the pairing of colour and shape is wrong), and
    the share of scenes in which every pair is right. Also for a two-object caption ("a red
    triangle and a blue circle", objects 0 and 1 of the scene) against each caption with
    one of its two objects swapped.
(b) ITM binary accuracy at P(match) = 0.5: positives are the captions of the present
    objects, negatives every absent label's caption, split into swaps (the label is a
    colour or shape swap of a present object) and unrelated (it shares neither colour nor
    shape with any present object); and the two-object captions and their swaps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import cliplens  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT / "src"))

from cliplens.worlds import shapes

DEFAULT_MODEL = ROOT / "src" / "cliplens" / "assets" / "shapes-blip"
SINGLE_SEED, MULTI_SEED = 2000, 2001
TRAINING_SEEDS = (1, 31, 32)  # train_shapes_blip.py: training pool and validation
TEST_SEED = 787  # tests/test_shapes_blip.py draws these scenes ...
TEST_COUNTS = (1, 1, 1, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4)  # ... with these object counts


def load(model_dir: Path):
    from transformers import AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the PIL fallback of BlipImageProcessor without torchvision
    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = BlipImageProcessor.from_pretrained(model_dir)
    return model, tokenizer, processor


def colour_swaps(label: str, present: set[str]) -> list[str]:
    """Labels with ``label``'s shape and another colour that the scene (``present``) lacks."""
    shape = label.split()[1]
    return [f"{c} {shape}" for c in shapes.COLOURS if f"{c} {shape}" not in present]


def shape_swaps(label: str, present: set[str]) -> list[str]:
    """Labels with ``label``'s colour and another shape that the scene lacks."""
    colour = label.split()[0]
    return [f"{colour} {s}" for s in shapes.SHAPES if f"{colour} {s}" not in present]


def swap_pairs(labels: list[str]) -> list[tuple[str, str, str, bool]]:
    """(true label, swapped label, "colour" | "shape", binding) for every present object and
    each of its swaps; ``binding``: another object of the scene has the new colour / shape."""
    present = set(labels)
    out = []
    for obj in labels:
        others = [o for o in labels if o != obj]
        colours, shapes_ = {o.split()[0] for o in others}, {o.split()[1] for o in others}
        out += [(obj, s, "colour", s.split()[0] in colours) for s in colour_swaps(obj, present)]
        out += [(obj, s, "shape", s.split()[1] in shapes_) for s in shape_swaps(obj, present)]
    return out


def pair_swaps(pair: list[str], present: set[str]) -> list[tuple[list[str], str]]:
    """Each two-object caption's objects with one of them swapped (label absent), and the kind."""
    out = []
    for k in range(2):
        for kind, swaps in (
            ("colour", colour_swaps(pair[k], present)),
            ("shape", shape_swaps(pair[k], present)),
        ):
            for s in swaps:
                out.append(([s, pair[1]] if k == 0 else [pair[0], s], kind))
    return out


@torch.no_grad()
def match_probs(
    model, tokenizer, processor, images, captions: list[list[str]], rows: int = 768
) -> list[np.ndarray]:
    """P(match) of images[i] with each of captions[i] (plain forward calls, ``rows`` pairs each)."""
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    flat = [(i, c) for i, caps in enumerate(captions) for c in caps]
    probs = []
    for a in range(0, len(flat), rows):
        part = flat[a : a + rows]
        enc = tokenizer([c for _, c in part], padding=True, return_tensors="pt")
        idx = torch.tensor([i for i, _ in part])
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values=pixels[idx],
            use_itm_head=True,
        )
        probs.append(out.itm_score.softmax(-1)[:, 1].numpy())
    probs = np.concatenate(probs) if probs else np.zeros(0)
    out, a = [], 0
    for caps in captions:
        out.append(probs[a : a + len(caps)])
        a += len(caps)
    return out


def score_scenes(
    model, tokenizer, processor, scenes, compositional: bool = True, template: str = "a {}"
) -> list[dict]:
    """Per scene: P(match) of every label's caption, and of a two-object caption and its swaps."""
    labels = shapes.all_labels()
    captions, comps = [], []
    for scene in scenes:
        caps = [template.format(a) for a in labels]  # "a {}": shapes.caption
        comp = None
        if compositional and len(scene.objects) >= 2:
            pair = scene.labels[:2]
            comp = [(pair, "true")] + pair_swaps(pair, set(scene.labels))
            caps += [shapes.compositional_caption(p) for p, _ in comp]
        captions.append(caps)
        comps.append(comp)
    probs = match_probs(model, tokenizer, processor, [s.image for s in scenes], captions)
    out = []
    for scene, p, comp in zip(scenes, probs, comps):
        rec = {"labels": scene.labels, "single": dict(zip(labels, p[: len(labels)].tolist()))}
        if comp is not None:
            rec["comp"] = [(kind, float(q)) for (_, kind), q in zip(comp, p[len(labels) :])]
        out.append(rec)
    return out


def _share(hits: list[bool]) -> dict:
    n = len(hits)
    acc = float(np.mean(hits)) if n else float("nan")
    return {
        "accuracy": acc,
        "n": n,
        "standard_error": float(np.sqrt(acc * (1 - acc) / n)) if n else float("nan"),
    }


def swap_ranking(records: list[dict]) -> dict:
    """(a): shares of (true, swap) pairs with P(match) of the true caption above the swap's."""
    hits: dict[str, list[bool]] = {
        "colour": [],
        "shape": [],
        "colour_binding": [],
        "shape_binding": [],
        "all": [],
        "compositional": [],
    }
    scenes_ok = []
    for rec in records:
        p = rec["single"]
        ok_scene = True
        for true, swap, kind, binding in swap_pairs(rec["labels"]):
            hit = p[true] > p[swap]
            hits[kind].append(hit)
            hits["all"].append(hit)
            if binding:
                hits[f"{kind}_binding"].append(hit)
            ok_scene &= hit
        if "comp" in rec:
            true = rec["comp"][0][1]
            hits["compositional"] += [true > q for _, q in rec["comp"][1:]]
        scenes_ok.append(ok_scene)
    out = {k: _share(v) for k, v in hits.items() if v}
    out["scenes_all_pairs_right"] = _share(scenes_ok)
    return out


def binary_accuracy(records: list[dict]) -> dict:
    """(b): ITM accuracy at P(match) = 0.5 on positives and on each kind of negative."""
    hits: dict[str, list[bool]] = {
        "positives": [],
        "negatives_swap": [],
        "negatives_unrelated": [],
        "compositional_positives": [],
        "compositional_negatives": [],
    }
    for rec in records:
        labs = rec["labels"]
        colours, shapes_ = {a.split()[0] for a in labs}, {a.split()[1] for a in labs}
        for label, q in rec["single"].items():
            if label in labs:
                hits["positives"].append(q > 0.5)
            elif label.split()[0] in colours or label.split()[1] in shapes_:
                hits["negatives_swap"].append(q < 0.5)
            else:
                hits["negatives_unrelated"].append(q < 0.5)
        if "comp" in rec:
            hits["compositional_positives"].append(rec["comp"][0][1] > 0.5)
            hits["compositional_negatives"] += [q < 0.5 for _, q in rec["comp"][1:]]
    out = {k: _share(v) for k, v in hits.items() if v}
    neg = hits["negatives_swap"] + hits["negatives_unrelated"]
    out["negatives"] = _share(neg)
    out["balanced"] = 0.5 * (out["positives"]["accuracy"] + out["negatives"]["accuracy"])
    return out


def test_scene_numbers(model, tokenizer, processor) -> dict:
    """What tests/test_shapes_blip.py checks, on its own scenes: (true, swap) pairs right."""
    scenes = [
        shapes.make_scene(shapes.scene_seed(TEST_SEED, i), n_objects=k) for i, k in enumerate(TEST_COUNTS)
    ]
    records = score_scenes(model, tokenizer, processor, scenes, compositional=False)
    pairs = [(rec, t, s) for rec in records for t, s, _, _ in swap_pairs(rec["labels"])]
    right = sum(rec["single"][t] > rec["single"][s] for rec, t, s in pairs)
    per_scene = [
        all(rec["single"][t] > rec["single"][s] for t, s, _, _ in swap_pairs(rec["labels"]))
        for rec in records
    ]
    return {
        "pairs_right": int(right),
        "pairs": len(pairs),
        "scenes_all_right": int(sum(per_scene)),
        "scenes": len(scenes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Evaluate the shapes-world BLIP on fresh seeds.")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--single", type=int, default=500, help="one-object scenes (dataset seed 2000)")
    ap.add_argument("--multi", type=int, default=600, help="scenes of 2, 3, 4 objects in turn (seed 2001)")
    ap.add_argument("--draw-size", type=int, default=shapes.DEFAULT_SIZE)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 stall when the other core is busy)"
    )
    ap.add_argument(
        "--template",
        default="a {}",
        help='one-object captions as this template of the label ("a {}" = shapes.caption; e.g. '
        '"a photo of a {}." or "{}"); two-object captions stay as shapes.compositional_caption',
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer, processor = load(args.model)
    results: dict = {"model": str(args.model), "draw_size": args.draw_size, "template": args.template}
    parts = [
        ("single", SINGLE_SEED, [1] * args.single),
        ("multi", MULTI_SEED, [2 + i % 3 for i in range(args.multi)]),
    ]
    for name, seed, counts in parts:
        if not counts:
            continue
        scenes = [
            shapes.make_scene(shapes.scene_seed(seed, i), n_objects=k, size=args.draw_size)
            for i, k in enumerate(counts)
        ]
        records = score_scenes(model, tokenizer, processor, scenes, template=args.template)
        results[name] = {
            "dataset_seed": seed,
            "scenes": len(scenes),
            "swap_ranking": swap_ranking(records),
            "binary": binary_accuracy(records),
        }
        if name == "multi":
            by_count = {}
            for k in (2, 3, 4):
                sub = [r for r in records if len(r["labels"]) == k]
                by_count[k] = {
                    "colour": swap_ranking(sub)["colour"]["accuracy"],
                    "shape": swap_ranking(sub)["shape"]["accuracy"],
                }
            results[name]["swap_ranking_by_objects"] = by_count
    results["test_scenes"] = {"dataset_seed": TEST_SEED, **test_scene_numbers(model, tokenizer, processor)}
    results["seconds"] = round(time.time() - t0, 1)

    for name in ("single", "multi"):
        if name not in results:
            continue
        r = results[name]
        sr, b = r["swap_ranking"], r["binary"]
        print(f"{name} ({r['scenes']} scenes, dataset seed {r['dataset_seed']}):")
        line = "  swap ranking (true caption above swap): " + ", ".join(
            f"{k} {v['accuracy']:.2%} (n={v['n']})" for k, v in sr.items()
        )
        print(line)
        if "swap_ranking_by_objects" in r:
            print(
                "  by objects: "
                + "; ".join(
                    f"{k}: colour {v['colour']:.2%} shape {v['shape']:.2%}"
                    for k, v in r["swap_ranking_by_objects"].items()
                )
            )
        print(
            "  ITM accuracy at 0.5: "
            + ", ".join(f"{k} {v['accuracy']:.2%} (n={v['n']})" for k, v in b.items() if isinstance(v, dict))
            + f"; balanced {b['balanced']:.2%}"
        )
    t = results["test_scenes"]
    print(
        f"test scenes (seed {TEST_SEED}, {t['scenes']} scenes): {t['pairs_right']}/{t['pairs']} (true, swap) "
        f"pairs right, {t['scenes_all_right']}/{t['scenes']} scenes with every pair right"
    )
    print(f"{results['seconds']:.0f}s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
