"""Train the small BLIP image-text-matching model shipped in ``src/cliplens/assets/shapes-blip``.

CPU only, seeded, one training thread (``--threads``; see its help). Run ``scripts/build_blip_tokenizer.py`` first: the tokenizer
is read from the output folder, and the model, its config, ``preprocessor_config.json`` and
``training_info.json`` are written next to it::

    .venv/bin/python scripts/train_shapes_blip.py            # defaults = the shipped model
    nohup .venv/bin/python scripts/train_shapes_blip.py > /tmp/train_shapes_blip.log 2>&1 &

Model: a standard Hugging Face ``BlipForImageTextRetrieval`` built from a ``BlipConfig``: a
ViT image tower (64 x 64 input, patch 8: 64 patch tokens and a class token) and a BERT-style
text encoder whose every layer has bidirectional self-attention over the caption and then
cross-attention to all 65 image tokens. ``BlipTextLayer`` builds its cross-attention only
when ``text_config.is_decoder`` is true (the BlipTextConfig default, kept); the retrieval
model still runs the text encoder with ``is_decoder=False``, i.e. a bidirectional, non-causal
mask. The ITM head (``itm_head``, 2-way, class 1 = match) reads the text encoder's output at
position 0, the [CLS] token. Weights are stored as float16; ``config.json`` says float32 so
that a plain ``from_pretrained`` computes in float32.

Data: scenes drawn by :mod:`cliplens.worlds.shapes` at 128 px (``--draw-size``) and resized to
64 px the way the image processor resizes (PIL bicubic), from training dataset seed 1, with
a random flip / quarter turn per step. A pool of 65,536 scenes that grows while the model
trains (machinery of ``scripts/train_shapes.py``): the first 16,384 are drawn up front by two
processes, the rest by one process beside the training (which uses one thread), joining the
pool 2,048 at a time on steps fixed in advance (20 scenes a step: whole after step 2,458), so
a run does not depend on the machine's speed (training waits for a late chunk).

Captions: each image gets ``K = 6`` captions per step, always in this order:

0. a positive: one present object (``shapes.caption``: "a red triangle"; sometimes
   "a photo of a red triangle." or "red triangle", the templates the evaluation offers);
1. its colour swap: the same object with a colour that makes a label absent from the scene
   (half the time, where one exists, a colour another object of the scene has: a binding
   negative, "a blue triangle" when there is a red triangle and a blue circle);
2. its shape swap, likewise (same template as 0);
3. a second positive: two present objects joined by "and" (``shapes.compositional_caption``),
   or for a one-object scene the plain caption of its object;
4. that caption with one of its objects swapped in colour or shape (two-object captions), or
   "its object and an absent one" (one-object scenes);
5. a caption of an absent label, or half the time a swap of another present object.

Losses (``--*-loss`` weights):

- ITM: cross-entropy of the 2-way ``itm_head`` on all 6 pairs, positives weighted 2 so that
  both classes weigh the same (2 positives, 4 negatives per image);
- ranking: ``softplus(s_neg - s_pos)`` on the ITM logit ``s = logit_match - logit_no_match``
  for (0, 1), (0, 2) and (3, 4): the per-scene comparison the evaluation measures;
- ITC: the ``use_itm_head=False`` path (``vision_proj`` of the image [CLS] token against
  ``text_proj`` of the text-only encoding of each of the 30 label captions), a contrastive
  term in which every present label is a positive, with a learnt temperature (not saved:
  the shipped model returns plain cosine similarities on that path);
- patches: a training-only linear head on the image tower's output patch tokens (what the
  cross-attention reads) names the object covering each patch, or background, from the
  world's masks (as in ``scripts/train_shapes.py``); and one more head (layer norm + linear)
  does the same on the patch tokens leaving block 4 (``--mid-block``), which helped the
  shapes CLIP. Not saved.

Speed: the text encoder runs on ``B * K`` captions but there are only ``B`` images; the
cross-attention's key and value projections of the image tokens are computed once per image
(forward hooks on those two linear layers during training, checked equal to the plain
forward at start-up) instead of once per caption (the key / value projections of 65 image
tokens cost about as much as the rest of a text layer on 9 caption tokens). The text encoder
still costs more than the image tower (one thread, batch 64: 0.135 s a step with 2 text
layers, 0.21 s with 3, against 0.11 s for the image tower), hence 2 layers.

Optimiser: Muon (from ``scripts/train_shapes.py``) for the weight matrices inside both
towers' transformer blocks (lr 0.02 in the image tower, as for the shapes CLIP; 0.01 in the
post-LayerNorm text encoder), AdamW (lr 1.5e-3) for the rest; 200 warm-up steps, then cosine
decay. (All at 0.02 / 2e-3, the losses turned up after ~600 steps.) PyTorch's default
initialisation for the image tower's linear layers (transformers' BLIP vision init has std
1e-10, which leaves all image tokens nearly equal at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import cliplens  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from train_shapes import (
    Muon,
    PoolDrawer,
    augment,
    draw_into,
    multi_positive_loss,
    pool_arrays,
    pool_counts,
    release_steps,
    render_pool,
)

from cliplens.worlds import shapes

DEFAULT_OUT = ROOT / "src" / "cliplens" / "assets" / "shapes-blip"
TRAIN_SEED = 1  # dataset seed of the training scenes (scene_seed(TRAIN_SEED, i))
VAL_SEED = 31  # held-out scenes watched during training (they choose nothing): 1 object ...
VAL_MULTI_SEED = 32  # ... and 2-4 objects
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # = transformers' OPENAI_CLIP_MEAN, BLIP's default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
K = 6  # captions per image and step (layout in the module docstring)
MAX_TEXT = 32  # text positions; the longest training caption has 10 tokens with [CLS] and [SEP]
# Variants of a single-object caption: (share, template); compositional captions stay plain.
SINGLE_TEMPLATES = ((0.7, "a {}"), (0.15, "a photo of a {}."), (0.15, "{}"))


# ----------------------------------------------------------------------------- captions


def colour_swaps(label: str, present: set[str]) -> list[str]:
    """Labels with ``label``'s shape and another colour, absent from the scene (``present``)."""
    _, shape = label.split()
    return [f"{c} {shape}" for c in shapes.COLOURS if f"{c} {shape}" not in present]


def shape_swaps(label: str, present: set[str]) -> list[str]:
    """Labels with ``label``'s colour and another shape, absent from the scene."""
    colour, _ = label.split()
    return [f"{colour} {s}" for s in shapes.SHAPES if f"{colour} {s}" not in present]


def binding_swaps(swaps: list[str], present: set[str], part: int) -> list[str]:
    """The swaps whose new colour (``part`` 0) or shape (1) another present object has."""
    used = {p.split()[part] for p in present}
    return [s for s in swaps if s.split()[part] in used]


def pick_swap(rng: np.random.Generator, label: str, present: set[str], part: int, p_binding: float) -> str:
    swaps = colour_swaps(label, present) if part == 0 else shape_swaps(label, present)
    hard = binding_swaps(swaps, present, part)
    pool = hard if hard and rng.random() < p_binding else swaps
    return pool[int(rng.integers(len(pool)))]


def single(label: str, template: str) -> str:
    return template.format(label)


def image_captions(
    rng: np.random.Generator, labels: list[str], p_binding: float, templates: bool
) -> list[str]:
    """The K captions of one image with objects ``labels`` (order in the module docstring)."""
    present = set(labels)
    template = "a {}"
    if templates:
        shares = np.array([s for s, _ in SINGLE_TEMPLATES])
        template = SINGLE_TEMPLATES[int(rng.choice(len(shares), p=shares / shares.sum()))][1]
    obj = labels[int(rng.integers(len(labels)))]
    caps = [
        single(obj, template),
        single(pick_swap(rng, obj, present, 0, p_binding), template),
        single(pick_swap(rng, obj, present, 1, p_binding), template),
    ]
    absent = [a for a in shapes.all_labels() if a not in present]
    if len(labels) >= 2:
        a, b = (labels[i] for i in rng.choice(len(labels), size=2, replace=False))
        caps.append(shapes.compositional_caption([a, b]))
        pair = [a, b]
        k = int(rng.integers(2))
        pair[k] = pick_swap(rng, pair[k], present, int(rng.integers(2)), p_binding)
        caps.append(shapes.compositional_caption(pair))
    else:
        caps.append(shapes.caption(obj))
        other = absent[int(rng.integers(len(absent)))]
        caps.append(shapes.compositional_caption([obj, other] if rng.random() < 0.5 else [other, obj]))
    if len(labels) >= 2 and rng.random() < 0.5:
        other = [lab for lab in labels if lab != obj][int(rng.integers(len(labels) - 1))]
        caps.append(shapes.caption(pick_swap(rng, other, present, int(rng.integers(2)), p_binding)))
    else:
        caps.append(shapes.caption(absent[int(rng.integers(len(absent)))]))
    return caps


MATCH = torch.tensor([1, 0, 0, 1, 0, 0])  # ITM target of the K captions
RANK_PAIRS = ((0, 1), (0, 2), (3, 4))  # (positive, negative) positions ranked against each other


class Tokens:
    """Tokenises captions once each (a cache) and pads a list of them as the tokenizer would:
    [CLS] ... [SEP], right-padded with [PAD] to the longest, attention mask 1 on real tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            for t, ids in zip(new, self.tokenizer(new)["input_ids"]):
                self.cache[t] = ids
        seqs = [self.cache[t] for t in texts]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask


# ----------------------------------------------------------------------------- model


def build_config(vocab_size: int, args):
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=args.vision_width,
        intermediate_size=args.mlp_ratio * args.vision_width,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    text = BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=args.text_width,
        intermediate_size=4 * args.text_width,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT,
        encoder_hidden_size=args.vision_width,
        is_decoder=True,  # what makes BlipTextLayer build its cross-attention (BLIP's own setting)
        use_cache=False,
        pad_token_id=0,  # [PAD]
        bos_token_id=2,  # [CLS]
        sep_token_id=3,  # [SEP]
        eos_token_id=3,
        hidden_act="gelu",
    )
    return BlipConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_text_hidden_size=args.proj_dim,
        projection_dim=args.proj_dim,
    )


def reinit_vision_tower(model) -> None:
    """PyTorch's default init for the image tower's linear layers and patch embedding, and
    normal(0, 0.02) position and class embeddings (transformers gives the BLIP image tower
    std 1e-10, which leaves every image token nearly equal at the start)."""
    for module in model.vision_model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.reset_parameters()
    emb = model.vision_model.embeddings
    with torch.no_grad():
        emb.position_embedding.normal_(0.0, 0.02)
        emb.class_embedding.normal_(0.0, 0.02)


@contextlib.contextmanager
def shared_cross_kv(model, k: int):
    """While active, the cross-attention key / value layers see the image tokens only once per
    image: their input (B*k x T x D, each image repeated k times in a row) is cut to every k-th
    row and their output repeated back. Same values and gradients, k times fewer FLOPs."""
    handles = []

    def pre(_module, args):
        return (args[0][::k],)

    def post(_module, _args, out):
        return out.repeat_interleave(k, dim=0)

    for layer in model.text_encoder.encoder.layer:
        for lin in (layer.crossattention.self.key, layer.crossattention.self.value):
            handles += [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def itm_logits(
    model, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, k: int
) -> torch.Tensor:
    """``itm_score`` of ``BlipForImageTextRetrieval.forward(use_itm_head=True)`` for B images
    (their ``vision_model`` output) x k captions each (rows of ``ids``: image-major)."""
    rep = image_embeds.repeat_interleave(k, dim=0)
    out = model.text_encoder(
        input_ids=ids,
        attention_mask=mask,
        encoder_hidden_states=rep,
        encoder_attention_mask=torch.ones(rep.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    return model.itm_head(out[:, 0, :])


def to_pixels(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 B x H x W x 3 -> normalised float B x 3 x H x W (what preprocessor_config.json does)."""
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- validation


def swap_pairs(labels: list[str]) -> list[tuple[str, str, str]]:
    """Every (true caption, swapped caption, "colour" | "shape") of a scene: each present
    object against each of its colour and shape swaps to a label absent from the scene."""
    present = set(labels)
    out = []
    for obj in labels:
        out += [(shapes.caption(obj), shapes.caption(s), "colour") for s in colour_swaps(obj, present)]
        out += [(shapes.caption(obj), shapes.caption(s), "shape") for s in shape_swaps(obj, present)]
    return out


@torch.no_grad()
def match_probs(
    model, tokens: Tokens, pixels: torch.Tensor, captions: list[list[str]], chunk: int = 512
) -> list[torch.Tensor]:
    """P(match) of each image (pixels[i]) with each of its captions (captions[i]), through the
    plain ``model(input_ids, pixel_values, attention_mask, use_itm_head=True)``."""
    embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    flat = [(i, c) for i, caps in enumerate(captions) for c in caps]
    probs = []
    for a in range(0, len(flat), chunk):
        part = flat[a : a + chunk]
        ids, mask = tokens([c for _, c in part])
        rows = torch.tensor([i for i, _ in part])
        # the retrieval model's forward, with the image tower's output computed once above
        out = model.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=embeds[rows],
            encoder_attention_mask=torch.ones(len(part), embeds.shape[1], dtype=torch.long),
        )
        probs.append(model.itm_head(out.last_hidden_state[:, 0]).softmax(-1)[:, 1])
    probs = torch.cat(probs)
    out, a = [], 0
    for caps in captions:
        out.append(probs[a : a + len(caps)])
        a += len(caps)
    return out


def validate(model, tokens: Tokens, pixels: torch.Tensor, labels: list[list[str]]) -> dict[str, float]:
    """Swap ranking (true caption above each colour / shape swap) and ITM accuracy at 0.5."""
    model.eval()
    caps, kinds = [], []
    for labs in labels:
        pairs = swap_pairs(labs)
        true = [shapes.caption(o) for o in labs]
        caps.append(true + [s for _, s, _ in pairs])
        kinds.append((true, pairs))
    probs = match_probs(model, tokens, pixels, caps)
    hits = {"colour": [], "shape": []}
    pos, neg = [], []
    for p, (true, pairs) in zip(probs, kinds):
        score = dict(zip(true + [s for _, s, _ in pairs], p.tolist()))
        for t, s, kind in pairs:
            hits[kind].append(score[t] > score[s])
        pos += p[: len(true)].tolist()
        neg += p[len(true) :].tolist()
    model.train()
    return {
        "colour": float(np.mean(hits["colour"])),
        "shape": float(np.mean(hits["shape"])),
        "pos@0.5": float(np.mean(np.array(pos) > 0.5)),
        "neg@0.5": float(np.mean(np.array(neg) < 0.5)),
    }


# ----------------------------------------------------------------------------- training


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the shapes-world BLIP (image-text matching) on CPU.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=64, help="images per step (each with K=6 captions)")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate of AdamW")
    ap.add_argument(
        "--muon-lr", type=float, default=0.02, help="peak learning rate of Muon in the image tower"
    )
    ap.add_argument(
        "--muon-lr-text",
        type=float,
        default=0.01,
        help="peak learning rate of Muon in the text encoder (post-LayerNorm BERT layers; at 0.02 with AdamW at "
        "2e-3 the losses turned up after ~600 steps)",
    )
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--pool", type=int, default=65536, help="training scenes in all")
    ap.add_argument(
        "--pool-start",
        type=int,
        default=16384,
        help="draw this many training scenes up front (one process per thread; at most --pool), the "
        "rest in one process beside the training, which uses one thread fewer until they are all "
        "drawn",
    )
    ap.add_argument("--pool-chunk", type=int, default=2048)
    ap.add_argument(
        "--draw-rate",
        type=float,
        default=20.0,
        help="scenes the drawing process is expected to draw per training step; a chunk joins the "
        "pool at the step this rate predicts (training waits if it is late)",
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=64)
    ap.add_argument("--mlp-ratio", type=int, default=3)
    ap.add_argument("--vision-layers", type=int, default=5)
    ap.add_argument("--text-width", type=int, default=96)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--proj-dim", type=int, default=128, help="image_text_hidden_size (the ITC projections)")
    ap.add_argument("--draw-size", type=int, default=128)
    ap.add_argument(
        "--p-binding",
        type=float,
        default=0.5,
        help="share of swaps that take their new colour / shape from another object of the scene",
    )
    ap.add_argument("--rank-loss", type=float, default=1.0)
    ap.add_argument("--itc-loss", type=float, default=0.5)
    ap.add_argument("--patch-loss", type=float, default=1.0)
    ap.add_argument(
        "--mid-block",
        type=int,
        default=4,
        help="image-tower block (1 = first) whose output patch tokens get the same patch term with a head of "
        "their own (0: none)",
    )
    ap.add_argument("--no-templates", action="store_true", help="single-object captions always 'a {label}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the training (2 is faster on an idle machine, but with another job "
        "on one of its two cores every step waits on the descheduled thread: 10 s for a 0.3 s "
        "step, measured)",
    )
    ap.add_argument(
        "--draw-workers", type=int, default=2, help="processes drawing the first --pool-start scenes"
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="keep the drawn training scenes here (e.g. /tmp) to skip drawing on a rerun",
    )
    ap.add_argument("--eval-every", type=int, default=900)
    ap.add_argument("--val-scenes", type=int, default=300, help="held-out scenes watched (1/4 of one object)")
    args = ap.parse_args()
    args.pool_start = min(args.pool_start, args.pool)
    if args.pool_start < args.batch:
        ap.error("need min(--pool-start, --pool) >= --batch")

    from transformers import AutoTokenizer, BlipForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.out)
    tokens = Tokens(tokenizer)
    labels = shapes.all_labels()
    label_index = {label: i for i, label in enumerate(labels)}
    n_lab = len(labels)
    label_ids, label_mask = tokens([shapes.caption(a) for a in labels])

    counts = pool_counts(rng, args.pool)
    growing = args.pool_start < args.pool
    cache = None
    if args.cache_dir is not None and not growing:
        import hashlib

        world = hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()[:12]  # any world change
        cache = args.cache_dir / (
            f"shapes-blip-pool-{world}-seed{TRAIN_SEED}-rng{args.seed}-n{args.pool}-"
            f"{args.image_size}px-p{args.patch_size}-d{args.draw_size}.npz"
        )
    if cache is not None and cache.is_file():
        print(f"reading the training scenes from {cache}", flush=True)
        with np.load(cache) as z:
            pool_u8, pool_grids, pool_touched = z["images"], z["grids"], z["touched"]
            pool_labels = json.loads(str(z["labels"]))
    else:
        pool_u8, pool_grids, pool_touched = pool_arrays(
            args.pool, args.image_size, args.patch_size, shared=args.draw_workers > 1 or growing
        )
        print(
            f"drawing {args.pool_start} training scenes at {args.draw_size}px for a {args.image_size}px input "
            f"({args.draw_workers} processes) ...",
            flush=True,
        )
        pool_labels = draw_into(
            (pool_u8, pool_grids, pool_touched),
            0,
            args.pool_start,
            counts,
            TRAIN_SEED,
            args.image_size,
            args.patch_size,
            args.draw_size,
            workers=args.draw_workers,
        )
        if cache is not None:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            np.savez(
                cache, images=pool_u8, grids=pool_grids, touched=pool_touched, labels=json.dumps(pool_labels)
            )
    drawer = None
    if growing:
        print(
            f"drawing the other {args.pool - args.pool_start} beside the training: {args.pool_chunk} scenes "
            f"join the pool every {args.pool_chunk / args.draw_rate:.0f} steps",
            flush=True,
        )
        drawer = PoolDrawer(
            (pool_u8, pool_grids, pool_touched),
            args.pool_start,
            args.pool,
            args.pool_chunk,
            counts,
            TRAIN_SEED,
            args.image_size,
            args.patch_size,
            args.draw_size,
        )
    releases = release_steps(args.pool_start, args.pool, args.pool_chunk, args.draw_rate)
    pool = torch.from_numpy(pool_u8)
    grids = torch.from_numpy(pool_grids)
    present = torch.zeros(args.pool, n_lab, dtype=torch.bool)

    def join_pool(new_labels: list[list[str]]) -> None:
        for i, labs in enumerate(new_labels, start=len(pool_labels)):
            present[i, [label_index[a] for a in labs]] = True
        pool_labels.extend(new_labels)

    first, pool_labels = pool_labels, []
    join_pool(first)
    n_single = args.val_scenes // 4
    v1, l1, _, _ = render_pool(
        n_single, args.image_size, args.patch_size, VAL_SEED, rng, n_objects=1, draw_size=args.draw_size
    )
    vm, lm, _, _ = render_pool(
        args.val_scenes - n_single,
        args.image_size,
        args.patch_size,
        VAL_MULTI_SEED,
        rng,
        draw_size=args.draw_size,
    )
    keep = [i for i, labs in enumerate(lm) if len(labs) >= 2]  # the multi-object scenes of the pool
    val_single = (to_pixels(torch.from_numpy(v1)), l1)
    val_multi = (to_pixels(torch.from_numpy(vm[keep])), [lm[i] for i in keep])
    t_data = time.time() - t_start
    print(f"data ready in {t_data:.0f}s", flush=True)

    config = build_config(len(tokenizer), args)
    model = BlipForImageTextRetrieval(config)
    reinit_vision_tower(model)
    model.train()
    assert all(hasattr(layer, "crossattention") for layer in model.text_encoder.encoder.layer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"BlipForImageTextRetrieval with {n_params / 1e6:.3f}M parameters", flush=True)

    # The shared key / value trick gives the plain forward's values (checked once).
    with torch.no_grad():
        px = to_pixels(pool[:4])
        emb = model.vision_model(pixel_values=px).last_hidden_state
        caps = [c for labs in pool_labels[:4] for c in image_captions(rng, labs, args.p_binding, False)]
        ids, mask = tokens(caps)
        plain = itm_logits(model, emb, ids, mask, K)
        with shared_cross_kv(model, K):
            fast = itm_logits(model, emb, ids, mask, K)
        ref = model(
            input_ids=ids[:K], attention_mask=mask[:K], pixel_values=px[:1].expand(K, -1, -1, -1)
        ).itm_score
        if not (torch.allclose(plain, fast, atol=1e-5) and torch.allclose(plain[:K], ref, atol=1e-5)):
            raise SystemExit("the shared cross-attention keys / values change the ITM logits")

    vision_width = config.vision_config.hidden_size
    patch_head = torch.nn.Linear(vision_width, n_lab + 1)  # training only: the object under each patch
    mid_head = torch.nn.Sequential(torch.nn.LayerNorm(vision_width), torch.nn.Linear(vision_width, n_lab + 1))
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))  # ITC temperature, training only

    decay, no_decay, block_matrices, text_matrices = [], [], [], []
    named = (
        list(model.named_parameters())
        + list(patch_head.named_parameters(prefix="patch_head"))
        + (list(mid_head.named_parameters(prefix="mid_head")) if args.mid_block else [])
    )
    for name, p in named:
        if p.ndim == 2 and (".encoder.layers." in name or ".encoder.layer." in name):
            (text_matrices if name.startswith("text_encoder.") else block_matrices).append(p)
        else:
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    no_decay.append(log_scale)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=True,
    )
    optimisers = [opt, Muon(block_matrices, lr=args.muon_lr), Muon(text_matrices, lr=args.muon_lr_text)]
    base_lr = {id(group): group["lr"] for o in optimisers for group in o.param_groups}
    print(
        f"Muon: {len(block_matrices)} + {len(text_matrices)} matrices; AdamW: {len(decay) + len(no_decay)} tensors",
        flush=True,
    )

    def schedule(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    match = MATCH.repeat(args.batch)
    weight = torch.where(match == 1, 2.0, 1.0)
    if releases:
        torch.set_num_threads(max(1, args.threads - 1))
    t_train = time.time()
    running = None
    history = []
    for step in range(args.steps):
        while releases and releases[0] <= step:
            releases.pop(0)
            join_pool(drawer.next_chunk())
            if not releases:
                torch.set_num_threads(args.threads)
                drawer.close()
                print(
                    f"  the pool is whole ({len(pool_labels)} scenes) at step {step}; "
                    f"waited {drawer.waited:.0f}s for late scenes",
                    flush=True,
                )
        for o in optimisers:
            for group in o.param_groups:
                group["lr"] = base_lr[id(group)] * schedule(step)
        idx = torch.from_numpy(rng.choice(len(pool_labels), size=args.batch, replace=False))
        codes = torch.from_numpy(rng.integers(0, 8, size=args.batch))
        pixels = to_pixels(augment(pool[idx], codes))
        grid = augment(grids[idx], codes).flatten(1).long()
        caps = [
            c
            for i in idx.tolist()
            for c in image_captions(rng, pool_labels[i], args.p_binding, not args.no_templates)
        ]
        ids, mask = tokens(caps)

        vision_out = model.vision_model(pixel_values=pixels, output_hidden_states=bool(args.mid_block))
        image_embeds = vision_out.last_hidden_state  # B x 65 x D
        with shared_cross_kv(model, K):
            logits = itm_logits(model, image_embeds, ids, mask, K)  # B*K x 2
        loss_itm = (F.cross_entropy(logits, match, reduction="none") * weight).sum() / weight.sum()
        s = (logits[:, 1] - logits[:, 0]).view(args.batch, K)
        loss_rank = torch.stack([F.softplus(s[:, n] - s[:, p]) for p, n in RANK_PAIRS]).mean()
        loss = loss_itm + args.rank_loss * loss_rank
        if args.itc_loss > 0:
            text = model.text_encoder(input_ids=label_ids, attention_mask=label_mask).last_hidden_state[:, 0]
            t_feat = F.normalize(model.text_proj(text), dim=-1)
            i_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
            loss_itc = multi_positive_loss(log_scale.exp() * i_feat @ t_feat.T, present[idx])
            loss = loss + args.itc_loss * loss_itc
        else:
            loss_itc = torch.zeros(())
        if args.patch_loss > 0:
            loss_patch = F.cross_entropy(patch_head(image_embeds[:, 1:]).flatten(0, 1), grid.flatten())
            if args.mid_block:  # hidden_states[k] is the output of block k
                mid = vision_out.hidden_states[args.mid_block][:, 1:]
                loss_patch = loss_patch + F.cross_entropy(mid_head(mid).flatten(0, 1), grid.flatten())
            loss = loss + args.patch_loss * loss_patch
        else:
            loss_patch = torch.zeros(())

        for o in optimisers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay + block_matrices + text_matrices, 1.0, foreach=True)
        for o in optimisers:
            o.step()
        with torch.no_grad():
            log_scale.clamp_(0.0, math.log(100.0))

        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 20 == 0 or step == 0:
            el = time.time() - t_train
            acc = ((logits.argmax(1) == match).float().mean()).item()
            print(
                f"step {step + 1}/{args.steps} loss {loss.item():.3f} (avg {running:.3f}) itm {loss_itm.item():.3f} "
                f"(acc {acc:.3f}) rank {loss_rank.item():.3f} itc {loss_itc.item():.3f} "
                f"patches {loss_patch.item():.3f} lr {args.lr * schedule(step):.2e} "
                f"{el:.0f}s ({el / (step + 1):.3f}s/step)",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r1 = validate(model, tokens, *val_single)
            rm = validate(model, tokens, *val_multi)
            history.append({"step": step + 1, "single": r1, "multi": rm})
            print(
                f"  val swaps, 1 object ({len(val_single[1])} scenes): colour {r1['colour']:.3f} shape "
                f"{r1['shape']:.3f}; 2-4 objects ({len(val_multi[1])}): colour {rm['colour']:.3f} shape "
                f"{rm['shape']:.3f}; ITM@0.5 on 2-4 objects: positives {rm['pos@0.5']:.3f} negatives "
                f"{rm['neg@0.5']:.3f}",
                flush=True,
            )

    t_total = time.time() - t_start
    print(f"trained {args.steps} steps in {time.time() - t_train:.0f}s (total {t_total:.0f}s)", flush=True)
    if drawer is not None and len(pool_labels) < args.pool:
        print(
            f"  note: the run ended before the pool was whole ({len(pool_labels)} of {args.pool} scenes)",
            flush=True,
        )
        drawer.close(stop=True)
    save(
        model,
        args,
        t_total,
        time.time() - t_train,
        t_data,
        n_params,
        drawer.waited if drawer is not None else 0.0,
        len(pool_labels),
        history,
    )


def save(
    model,
    args,
    t_total: float,
    t_train: float,
    t_data: float,
    n_params: int,
    t_waited: float,
    n_scenes: int,
    history: list,
) -> None:
    out: Path = args.out
    model.eval()
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"  # stored in float16 to keep the package small; compute in float32
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    pre = {
        "image_processor_type": "BlipImageProcessor",
        "do_resize": True,
        "size": {"height": args.image_size, "width": args.image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    info = {
        "trained_by": "scripts/train_shapes_blip.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "train_seed": TRAIN_SEED,
        "scenes_seen_in_pool": n_scenes,
        "n_parameters": n_params,
        "text_input": "[CLS] caption [SEP], right-padded with [PAD]=0, attention_mask 1 on real tokens; "
        "ITM reads position 0",
        "seconds_total": round(t_total),
        "seconds_training_steps": round(t_train),
        "seconds_drawing_data": round(t_data),
        "seconds_waiting_for_scenes": round(t_waited, 1),
        "validation": history,
        "torch": torch.__version__,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"saved to {out} ({size / 1e6:.2f} MB on disk)", flush=True)


if __name__ == "__main__":
    main()
