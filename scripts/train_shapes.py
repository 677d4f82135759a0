"""Train the small CLIP shipped in ``src/cliplens/assets/shapes-clip`` on the shapes world.

CPU only, seeded, two threads. Run ``scripts/build_tokenizer.py`` first: the tokenizer is
read from the output folder, and the model, its config and ``preprocessor_config.json``
are written next to it::

    .venv/bin/python scripts/train_shapes.py            # defaults = the shipped model
    nohup .venv/bin/python scripts/train_shapes.py > /tmp/train_shapes.log 2>&1 &

Model: a standard Hugging Face ``CLIPModel`` (ViT image tower, causal text tower with the
real 49,408-token CLIP vocabulary and 77 positions). Weights are stored as float16 (the
token embedding dominates the size); ``config.json`` says float32 so that a plain
``CLIPModel.from_pretrained`` computes in float32.

Data: scenes drawn by :mod:`cliplens.worlds.shapes` at 128 px (``--draw-size``) and
resized to the model's 64-px input the way its image processor resizes (PIL bicubic), so
edges are anti-aliased as in any resized image; from training seeds
``scene_seed(TRAIN_SEED, i)``. Each step samples its scenes from a pool, with a random flip
/ quarter turn (labels do not change). With ``--pool-start`` the pool grows during the run:
the first scenes are drawn up front, and one process draws the rest beside the training
(which then runs on one thread fewer); they join the pool a chunk at a time, on steps fixed
by ``--draw-rate``, so the run is reproducible whatever the machine's speed.
Each image is paired with one caption: its only object, one present object of a multi-
object scene, or (sometimes) two present objects joined by "and".

Loss: the symmetric contrastive loss over the batch's image-caption similarities, with
ground-truth positives (a caption is a positive for every image in the batch that holds
its objects, so repeated captions are not treated as negatives); each positive is
contrasted against the negatives only. A second image-to-text term of the same form
ranks each image against the caption of every label (positives: the objects present),
which is what zero-shot use and the "present above absent" evaluation ask of the model.
A third, training-only term gives each final-layer patch token a linear head that names
the object covering its patch (or background), from the world's masks. The same term on
the patch tokens that leave the next-to-last block (``--mid-blocks``, with a head of its
own) has them name their object before the last block, whose class token gathers them; it
lifted the multi-object ranking. No head is saved.

Image tower: 5 blocks with an MLP 3x the width (``--vision-layers``, ``--mlp-ratio``); a step
costs about 7% more than with 4 blocks and 4x, and in equal time they learnt to rank scenes
of several objects better (probes in docs/shapes-model.md).

Optimiser (``--optimizer``): Muon for the weight matrices inside both towers' transformer
blocks (their momentum-averaged gradient is orthogonalised before the step), AdamW for the
rest. It learnt about three times as much per step as AdamW alone on this task (probes in
docs/shapes-model.md), which is what lifted the multi-object ranking within the budget.

Speed (what decides the quality reached in the 20-minute budget): the image tower sees
only ``--keep-patches`` of its 64 patch tokens per image for most of the run (every patch
that an object touches, then random background ones; the class token always), which
makes a step ~1.8x cheaper; the last ``--full-tail`` share of the steps sees all tokens so
that the model is used the way it is trained. The token embedding gets a sparse gradient
and a sparse Adam, since the captions use a few dozen of its 49,408 rows. The first
``--pool-start`` training scenes are drawn by one process per thread (``--threads``), the
rest by one process beside the training: a second thread makes a step only ~1.5x faster
(0.17 s on one thread, 0.11-0.12 s on two), so drawing on that core while training on the
other gives the run three times the distinct scenes for about 15% fewer steps, and the
distinct scenes are what lifted the multi-object ranking last (docs/shapes-model.md).
"""

from __future__ import annotations

import argparse
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

from cliplens.worlds import shapes  # noqa: E402

DEFAULT_OUT = ROOT / "src" / "cliplens" / "assets" / "shapes-clip"
TRAIN_SEED = 1  # dataset seed of the training scenes (scene_seed(TRAIN_SEED, i))
VAL_SEED = 2  # a small held-out set watched during training: single objects ...
VAL_MULTI_SEEDS = {2: 12, 3: 13, 4: 14}  # ... and scenes of 2, 3 and 4 objects
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Share of scenes with 1, 2, 3, 4 objects in the training pool.
N_OBJECTS_P = (0.25, 0.25, 0.25, 0.25)
# A patch is labelled with an object when that object covers at least this share of it.
PATCH_COVER = 0.3


def build_config(image_size: int, patch_size: int, vision_width: int = 64, mlp_ratio: int = 3, layers: int = 5):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="gelu",
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=128,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=mlp_ratio * vision_width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        hidden_act="gelu",
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=128,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=128)


def reinit_vision_tower(model) -> None:
    """Give the image tower's linear layers and patch embedding PyTorch's default init.

    transformers initialises CLIP's linear layers as normal(0, small std) with zero biases.
    With that init this small ViT learnt colour at once but sat at chance on shape for
    hundreds of steps; with ``reset_parameters()`` (Kaiming-uniform weights, uniform biases)
    it started learning shape within ~150 steps in the same setting (measured while
    building this script). The architecture stays a standard ``CLIPModel``.
    """
    for module in model.vision_model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.reset_parameters()


def patch_labels(scene, patch: int, label_index: dict[str, int]) -> np.ndarray:
    """G x G uint8 map: 1 + the label index of the object covering most of each patch,
    or 0 (background) where no object covers at least PATCH_COVER of it."""
    g = scene.size // patch
    cover = np.stack([o.mask.reshape(g, patch, g, patch).mean(axis=(1, 3)) for o in scene.objects])
    best = cover.argmax(0)
    ids = np.array([label_index[o.label] + 1 for o in scene.objects], np.uint8)
    return np.where(cover.max(0) >= PATCH_COVER, ids[best], 0).astype(np.uint8)


def _draw_range(out, start: int, stop: int, counts, dataset_seed: int, size: int, patch: int, draw_size: int,
                report: bool) -> list[list[str]]:
    """Draw scenes start..stop-1 into the (images, grids, touched) arrays ``out``; return their labels."""
    from PIL import Image

    images, grids, touched = out
    g = size // patch
    draw_patch = draw_size // g
    label_index = {label: i for i, label in enumerate(shapes.all_labels())}
    labels: list[list[str]] = []
    t0 = time.time()
    for i in range(start, stop):
        scene = shapes.make_scene(shapes.scene_seed(dataset_seed, i), n_objects=int(counts[i]), size=draw_size)
        image = scene.image if draw_size == size else scene.image.resize((size, size), Image.BICUBIC)
        images[i] = np.asarray(image)
        grids[i] = patch_labels(scene, draw_patch, label_index)
        touched[i] = np.any([o.mask for o in scene.objects], axis=0).reshape(g, draw_patch, g, draw_patch).any((1, 3))
        labels.append(scene.labels)
        if report and (i + 1 - start) % 4000 == 0:
            print(f"  drew {i + 1 - start}/{stop - start} scenes of this process's share ({time.time() - t0:.0f}s)",
                  flush=True)
    return labels


def _draw_child(conn, *args) -> None:
    conn.send(_draw_range(*args))
    conn.close()


def pool_counts(rng: np.random.Generator, n: int, n_objects=None) -> np.ndarray:
    """Objects per scene for a pool of n scenes: N_OBJECTS_P from ``rng``, or all ``n_objects``."""
    return rng.choice(4, size=n, p=N_OBJECTS_P) + 1 if n_objects is None else np.full(n, n_objects)


def pool_arrays(n: int, size: int, patch: int, shared: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty (images, grids, touched) for n scenes; ``shared``: anonymous shared memory that
    forked drawing processes write into."""
    import mmap

    g = size // patch
    shapes_dtypes = [((n, size, size, 3), np.uint8), ((n, g, g), np.uint8), ((n, g, g), np.bool_)]
    if not shared:
        return tuple(np.empty(shp, dt) for shp, dt in shapes_dtypes)
    return tuple(
        np.frombuffer(mmap.mmap(-1, max(1, int(np.prod(shp)) * np.dtype(dt).itemsize)), dt)[: int(np.prod(shp))]
        .reshape(shp)
        for shp, dt in shapes_dtypes
    )


def draw_into(out, start: int, stop: int, counts, dataset_seed: int, size: int, patch: int, draw_size: int,
              workers: int = 1) -> list[list[str]]:
    """Draw scenes start..stop-1 into ``out`` (from :func:`pool_arrays`, shared when workers > 1)
    with ``workers`` processes (contiguous shares, forked); return their labels."""
    import multiprocessing

    workers = max(1, min(workers, stop - start))
    bounds = np.linspace(start, stop, workers + 1).astype(int)
    ctx = multiprocessing.get_context("fork")
    children = []
    for w in range(1, workers):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_draw_child, args=(send, out, bounds[w], bounds[w + 1], counts, dataset_seed, size,
                                                     patch, draw_size, False))
        proc.start()
        children.append((proc, recv))
    labels = _draw_range(out, bounds[0], bounds[1], counts, dataset_seed, size, patch, draw_size, True)
    for proc, recv in children:
        try:
            labels += recv.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"a scene-drawing process failed (exit code {proc.exitcode})") from None
        proc.join()
    return labels


def render_pool(
    n: int, size: int, patch: int, dataset_seed: int, rng: np.random.Generator, n_objects=None, draw_size=None,
    workers: int = 1,
):
    """Draw n scenes; returns (uint8 N x H x W x 3, list of label lists, uint8 N x G x G patch
    labels, bool N x G x G "some object pixel lies in this patch").

    Scenes are drawn at ``draw_size`` (None or 0: ``size``) and, when that differs, resized to
    ``size`` the way the model's image processor resizes (PIL bicubic). With ``workers`` > 1
    the scenes are split into contiguous shares drawn by forked processes into shared memory;
    every scene depends only on its seed, so the result is the same for any ``workers``."""
    draw_size = draw_size or size
    if draw_size % (size // patch):
        raise ValueError(f"draw size {draw_size} is not a multiple of the {size // patch}-patch grid")
    counts = pool_counts(rng, n, n_objects)
    out = pool_arrays(n, size, patch, shared=min(workers, n) > 1)
    labels = draw_into(out, 0, n, counts, dataset_seed, size, patch, draw_size, workers)
    images, grids, touched = out
    return images, labels, grids, touched


def release_steps(start: int, n: int, chunk: int, rate: float) -> list[int]:
    """The step at which each chunk of a growing pool joins it: scenes start..n-1 come in
    chunks of ``chunk`` (the last may be smaller), chunk k at step ceil(scenes drawn by then / rate).

    Fixed by the arguments, not by how fast the drawing process is, so that a run is
    reproducible: if a chunk is late, training waits for it."""
    ends = list(range(start + chunk, n, chunk)) + [n] if n > start else []
    return [math.ceil((end - start) / rate) for end in ends]


class PoolDrawer:
    """Draws scenes start..n-1 of a pool in one forked process, ``chunk`` at a time, into the
    shared arrays ``out`` (see :func:`pool_arrays`), while the parent trains on the scenes
    it already has. ``next_chunk()`` returns the labels of the next chunk, waiting for it."""

    def __init__(self, out, start: int, n: int, chunk: int, counts, dataset_seed: int, size: int, patch: int,
                 draw_size: int):
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_draw_chunks, args=(send, out, start, n, chunk, counts, dataset_seed, size,
                                                            patch, draw_size))
        self._proc.daemon = True  # ends with the parent (an interrupted run leaves no process drawing on)
        self._proc.start()
        send.close()
        self.waited = 0.0  # seconds the parent spent waiting for late chunks

    def next_chunk(self) -> list[list[str]]:
        t0 = time.time()
        try:
            labels = self._recv.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"the scene-drawing process failed (exit code {self._proc.exitcode})") from None
        self.waited += time.time() - t0
        return labels

    def close(self, stop: bool = False) -> None:
        """Wait for the process to end (``stop``: end it now, leaving the rest undrawn)."""
        if stop:
            self._proc.terminate()
        self._recv.close()
        self._proc.join()


def _draw_chunks(conn, out, start: int, n: int, chunk: int, *args) -> None:
    for a in range(start, n, chunk):
        conn.send(_draw_range(out, a, min(a + chunk, n), *args, False))
    conn.close()


def to_pixels(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 B x H x W x 3 -> normalised float B x 3 x H x W (CLIP mean/std)."""
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(imgs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips / quarter turns (``codes``, 0..7) to each B x H x W [x C] array."""
    out = torch.empty_like(imgs)
    for code in range(8):
        sel = codes == code
        if sel.any():
            x = imgs[sel]
            if code >= 4:
                x = x.flip(2)
            out[sel] = torch.rot90(x, code % 4, dims=(1, 2))
    return out


def vision_forward(vision_model, pixels: torch.Tensor, keep: torch.Tensor | None = None, with_hidden: bool = False):
    """The image tower's forward pass as ``CLIPVisionModel`` computes it, optionally on a subset
    of the patch tokens (``keep``: B x K patch indices; the class token is always kept).
    Returns (last hidden states B x (1 + K) x D, pooled class token B x D), and with
    ``with_hidden`` also the list of the encoder input and every block's output.

    Dropping tokens after the position embedding is what FLIP does to cut the cost of a step;
    the trainer drops background tokens first, so object pixels are seen unless an image has
    more object patches than it keeps."""
    h = vision_model.embeddings(pixels)
    if keep is not None:
        patches = h[:, 1:].gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :1], patches], dim=1)
    hidden = [vision_model.pre_layrnorm(h)]
    for layer in vision_model.encoder.layers:
        hidden.append(layer(hidden[-1], None))
    last = hidden[-1]
    pooled = vision_model.post_layernorm(last[:, 0])
    return (last, pooled, hidden) if with_hidden else (last, pooled)


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Push every matrix of a stack (N x R x C, R <= C) towards the nearest semi-orthogonal
    matrix, U V^T of its SVD U S V^T, by a quintic Newton-Schulz iteration on the
    Frobenius-normalised matrix. The coefficients trade exactness for speed: the singular
    values land roughly in [0.7, 1.2] after five steps rather than at exactly 1, which is all
    Muon needs."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.flatten(1).norm(dim=1)[:, None, None] + 1e-7)
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


class Muon(torch.optim.Optimizer):
    """Muon (momentum, orthogonalised): SGD with Nesterov momentum in which each weight
    matrix's update is replaced by its orthogonalised form, so that every direction of the
    update moves at the same rate instead of a few dominant ones; scaled by
    sqrt(max(1, rows / cols)). Meant for the 2-D weights inside transformer blocks; the
    embeddings, norms, biases and output heads stay with AdamW. Matrices of one shape (up to
    a transpose) are orthogonalised together as a batch. (Keller Jordan et al., 2024.)"""

    def __init__(self, params, lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=group["momentum"])  # Nesterov
            by_shape: dict[tuple[int, int], list[int]] = {}  # (short side, long side) -> params
            for i, p in enumerate(params):
                by_shape.setdefault((min(p.shape), max(p.shape)), []).append(i)
            for idx in by_shape.values():
                wide = [updates[i] if updates[i].shape[0] <= updates[i].shape[1] else updates[i].T for i in idx]
                ortho = orthogonalise(torch.stack(wide)).unbind(0)
                for i, o in zip(idx, ortho):
                    p = params[i]
                    rows, cols = p.shape
                    p.add_(o if rows <= cols else o.T, alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


def multi_positive_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean over each row's positives p of
    -log(exp(s_p) / (exp(s_p) + sum_negatives exp(s_n))). Every row needs a positive."""
    neg = logits.masked_fill(pos, float("-inf")).logsumexp(dim=1, keepdim=True)
    per = F.softplus(neg - logits)
    return ((per * pos).sum(1) / pos.sum(1)).mean()


class CaptionBank:
    """Every caption the trainer can use, tokenised once, and which labels each one needs."""

    def __init__(self, tokenizer, labels: list[str]):
        self.labels = labels
        self.label_index = {label: i for i, label in enumerate(labels)}
        texts, needs = [], []
        for a in labels:  # single-object captions first: rows 0..L-1 follow `labels`
            texts.append(shapes.caption(a))
            needs.append([self.label_index[a]])
        for a in labels:
            for b in labels:
                if a != b:
                    texts.append(shapes.compositional_caption([a, b]))
                    needs.append([self.label_index[a], self.label_index[b]])
        self.texts = texts
        self.index = {t: i for i, t in enumerate(texts)}
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.needs = torch.zeros(len(texts), len(labels), dtype=torch.bool)
        for i, need in enumerate(needs):
            self.needs[i, need] = True


def sample_captions(rng: np.random.Generator, labels: list[list[str]], p_comp: float) -> list[str]:
    out = []
    for present in labels:
        if len(present) >= 2 and rng.random() < p_comp:
            a, b = rng.choice(len(present), size=2, replace=False)
            out.append(shapes.compositional_caption([present[a], present[b]]))
        else:
            out.append(shapes.caption(present[int(rng.integers(len(present)))]))
    return out


@torch.no_grad()
def validate(model, single: torch.Tensor, truth: torch.Tensor, multi: torch.Tensor, multi_present: torch.Tensor,
             bank: CaptionBank) -> dict[str, float]:
    """Zero-shot accuracy (and its colour / shape parts) on single-object scenes, and the
    share of multi-object scenes whose present captions all score above every absent one."""
    model.eval()
    n_lab = len(bank.labels)
    text = model.get_text_features(input_ids=bank.input_ids[:n_lab], attention_mask=bank.attention_mask[:n_lab])
    text = F.normalize(getattr(text, "pooler_output", text), dim=-1)

    def sims(pixels):
        img = model.get_image_features(pixel_values=pixels)
        return F.normalize(getattr(img, "pooler_output", img), dim=-1) @ text.T

    pred = sims(single).argmax(1)
    s = sims(multi)
    ranked = s.masked_fill(~multi_present, float("inf")).amin(1) > s.masked_fill(multi_present, float("-inf")).amax(1)
    pair_ok = (s[:, :, None] > s[:, None, :]) & multi_present[:, :, None] & ~multi_present[:, None, :]
    pairs = pair_ok.sum() / (multi_present.sum(1) * (~multi_present).sum(1)).sum()
    model.train()
    n_shapes = len(shapes.SHAPES)  # labels are colour-major
    return {
        "zero-shot": (pred == truth).float().mean().item(),
        "colour": (pred // n_shapes == truth // n_shapes).float().mean().item(),
        "shape": (pred % n_shapes == truth % n_shapes).float().mean().item(),
        "multi": ranked.float().mean().item(),
        "pairs": pairs.item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the shapes-world CLIP on CPU.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    ap.add_argument("--optimizer", choices=["muon", "adamw"], default="muon",
                    help="muon: Muon for the weight matrices inside the transformer blocks, AdamW for the rest; "
                         "adamw: AdamW for everything (the recipe of the models before Muon, though the fused "
                         "AdamW used now rounds differently, so not their exact weights)")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="peak learning rate of Muon")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--pool", type=int, default=131072, help="training scenes in all")
    ap.add_argument("--pool-start", type=int, default=16384,
                    help="draw this many training scenes up front (one process per thread; at most --pool), and "
                         "the rest in one process beside the training, which uses one thread fewer until they "
                         "are all drawn")
    ap.add_argument("--pool-chunk", type=int, default=2048,
                    help="with --pool-start: scenes drawn beside the training join the pool this many at a time")
    ap.add_argument("--draw-rate", type=float, default=28.0,
                    help="with --pool-start: scenes the drawing process is expected to draw per training step; a "
                         "chunk joins the pool at the step this rate predicts (training waits if it is late), so "
                         "the run does not depend on the machine's speed")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=64)
    ap.add_argument("--mlp-ratio", type=int, default=3, help="image tower MLP width / model width")
    ap.add_argument("--vision-layers", type=int, default=5)
    ap.add_argument("--mid-patch-loss", type=float, default=1.0,
                    help="weight of the same patch-naming term on the outputs of earlier blocks (--mid-blocks), "
                         "each with its own training-only head")
    ap.add_argument("--mid-blocks", default="4",
                    help="comma-separated image-tower blocks (1 = first) whose patch tokens get that term")
    ap.add_argument("--draw-size", type=int, default=128,
                    help="draw the scenes at this size and resize them to --image-size (0: draw at that size)")
    ap.add_argument("--p-comp", type=float, default=0.25, help="share of compositional captions (multi-object)")
    ap.add_argument("--label-loss", type=float, default=1.0, help="weight of the image-vs-all-labels term")
    ap.add_argument("--patch-loss", type=float, default=1.0,
                    help="weight of the training-only term where each patch token names the object covering it")
    ap.add_argument("--keep-patches", type=int, default=32,
                    help="train on this many patch tokens per image (every patch an object touches first, then "
                         "random background ones); 0 = all")
    ap.add_argument("--full-tail", type=float, default=0.05,
                    help="with --keep-patches: share of the last steps that see every patch token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="keep the drawn training scenes here (e.g. /tmp) to skip drawing on a rerun")
    args = ap.parse_args()
    try:
        mid_blocks = sorted({int(b) for b in args.mid_blocks.split(",") if b.strip()})
    except ValueError:
        mid_blocks = [0]
    if any(not 1 <= b < args.vision_layers for b in mid_blocks):
        ap.error(f"--mid-blocks must name blocks 1..{args.vision_layers - 1} of the image tower, "
                 f"got {args.mid_blocks!r}")
    if args.mid_patch_loss <= 0:
        mid_blocks = []
    args.pool_start = min(args.pool_start, args.pool)
    if args.pool_start < args.batch or args.pool_chunk < 1 or args.draw_rate <= 0:
        ap.error(f"need min(--pool-start, --pool) >= --batch, --pool-chunk >= 1 and --draw-rate > 0, got "
                 f"--pool {args.pool}, --pool-start {args.pool_start}, --batch {args.batch}, "
                 f"--pool-chunk {args.pool_chunk}, --draw-rate {args.draw_rate}")
    grid_side = args.image_size // args.patch_size
    if args.draw_size and (args.draw_size < args.image_size or args.draw_size % grid_side):
        ap.error(f"--draw-size must be at least --image-size and a multiple of the {grid_side}-patch grid side, "
                 f"got {args.draw_size}")

    from transformers import CLIPModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    tokenizer = CLIPTokenizer.from_pretrained(args.out)
    labels = shapes.all_labels()
    bank = CaptionBank(tokenizer, labels)
    n_lab = len(labels)

    cache = None
    if args.cache_dir is not None:
        import hashlib

        world = hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()[:12]  # any world change
        cache = args.cache_dir / (
            f"shapes-pool-{world}-seed{TRAIN_SEED}-rng{args.seed}-n{args.pool}-{args.image_size}px"
            f"-p{args.patch_size}-d{args.draw_size}-k{'-'.join(map(str, N_OBJECTS_P))}-v2.npz"
        )
    drawn = args.draw_size or args.image_size
    growing = args.pool_start < args.pool
    drawer = None
    if cache is not None and cache.is_file():
        print(f"reading the training scenes from {cache}", flush=True)
        with np.load(cache) as z:
            pool_u8 = z["images"]
            pool_labels = json.loads(str(z["labels"]))
            pool_grids = z["grids"]
            pool_touched = z["touched"]
        pool_counts(rng, args.pool)  # keep the random stream as if drawn
        late_labels = pool_labels[args.pool_start:]  # joins the pool on the same steps as when drawn
        pool_labels = pool_labels[: args.pool_start]
    else:
        counts = pool_counts(rng, args.pool)
        pool_u8, pool_grids, pool_touched = pool_arrays(args.pool, args.image_size, args.patch_size,
                                                        shared=args.threads > 1 or growing)
        print(f"drawing {args.pool_start} training scenes at {drawn}px for a {args.image_size}px input ...",
              flush=True)
        pool_labels = draw_into((pool_u8, pool_grids, pool_touched), 0, args.pool_start, counts, TRAIN_SEED,
                                args.image_size, args.patch_size, drawn, workers=args.threads)
        if growing:
            print(f"drawing the other {args.pool - args.pool_start} in a process beside the training: "
                  f"{args.pool_chunk} scenes join the pool every {args.pool_chunk / args.draw_rate:.0f} steps",
                  flush=True)
            drawer = PoolDrawer((pool_u8, pool_grids, pool_touched), args.pool_start, args.pool, args.pool_chunk,
                                counts, TRAIN_SEED, args.image_size, args.patch_size, drawn)
        late_labels = None
    releases = release_steps(args.pool_start, args.pool, args.pool_chunk, args.draw_rate)
    pool = torch.from_numpy(pool_u8)
    grids = torch.from_numpy(pool_grids)
    touched = torch.from_numpy(pool_touched)
    val_u8, val_labels, _, _ = render_pool(
        10 * n_lab, args.image_size, args.patch_size, VAL_SEED, rng, n_objects=1, draw_size=args.draw_size
    )
    val_pixels = to_pixels(torch.from_numpy(val_u8))
    val_truth = torch.tensor([bank.label_index[v[0]] for v in val_labels])
    val_multi = []
    for k, seed in VAL_MULTI_SEEDS.items():  # 100 scenes each
        u8, labs, _, _ = render_pool(100, args.image_size, args.patch_size, seed, rng, n_objects=k,
                                  draw_size=args.draw_size)
        val_multi.append((u8, labs))
    val_multi_pixels = to_pixels(torch.from_numpy(np.concatenate([u8 for u8, _ in val_multi])))
    val_multi_present = torch.zeros(len(val_multi_pixels), n_lab, dtype=torch.bool)
    for i, labs in enumerate(labs for _, ls in val_multi for labs in ls):
        val_multi_present[i, [bank.label_index[a] for a in labs]] = True
    present = torch.zeros(args.pool, n_lab, dtype=torch.bool)

    def join_pool(new_labels: list[list[str]]) -> None:
        """Scenes len(pool_labels).. (already in the arrays) join the pool."""
        for i, labs in enumerate(new_labels, start=len(pool_labels)):
            present[i, [bank.label_index[a] for a in labs]] = True
        pool_labels.extend(new_labels)

    first_labels, pool_labels = pool_labels, []
    join_pool(first_labels)
    t_data = time.time() - t_start
    print(f"data ready in {t_data:.0f}s", flush=True)

    config = build_config(args.image_size, args.patch_size, args.vision_width, args.mlp_ratio, args.vision_layers)
    model = CLIPModel(config)
    # Eager attention and exact GELU: at 65 tokens of width 64 this trains ~30% faster on
    # CPU than SDPA with QuickGELU (measured: vision forward+backward, batch 128, 2 threads,
    # 0.17 s against 0.25 s). The attention choice is not saved with the model.
    model.set_attn_implementation("eager")
    reinit_vision_tower(model)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIPModel with {n_params / 1e6:.2f}M parameters", flush=True)
    # Training-only heads: each final-layer patch token predicts which object covers it
    # (or background), and so does each patch token leaving the --mid-blocks (these have
    # no final layer norm, hence their own). Not saved; the shipped model is a plain CLIPModel.
    patch_head = torch.nn.Linear(config.vision_config.hidden_size, n_lab + 1)
    mid_heads = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.LayerNorm(config.vision_config.hidden_size),
                            torch.nn.Linear(config.vision_config.hidden_size, n_lab + 1)) for _ in mid_blocks)

    # The captions use a few dozen of the 49,408 vocabulary rows: a sparse gradient and a
    # sparse Adam for the token embedding update only those, where a dense AdamW step over
    # all 4.7 M weights cost ~15% of a step (measured at batch 64).
    token_embedding = model.text_model.embeddings.token_embedding
    token_embedding.sparse = True
    opt_tokens = torch.optim.SparseAdam([token_embedding.weight], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    # With --optimizer muon the 2-D weights inside both towers' transformer blocks go to Muon
    # (no weight decay); everything else (embeddings, norms, biases, projections, heads) to AdamW.
    decay, no_decay, block_matrices = [], [], []
    for name, p in list(model.named_parameters()) + list(patch_head.named_parameters(prefix="patch_head")) + list(
        mid_heads.named_parameters(prefix="mid_heads")):
        if p is token_embedding.weight:
            continue
        if args.optimizer == "muon" and p.ndim == 2 and ".encoder.layers." in name:
            block_matrices.append(p)
        else:
            (no_decay if p.ndim < 2 or name == "logit_scale" else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=True,
    )
    optimisers = [opt, opt_tokens] + ([Muon(block_matrices, lr=args.muon_lr)] if block_matrices else [])
    base_lr = {id(group): group["lr"] for o in optimisers for group in o.param_groups}

    def schedule(step: int) -> float:
        """Linear warm-up, then cosine decay to 0: the factor on every optimiser's lr."""
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    max_scale = math.log(100.0)
    if releases:  # one core draws, the other trains, until the pool is whole
        torch.set_num_threads(max(1, args.threads - 1))
    t_train = time.time()
    running = None
    for step in range(args.steps):
        while releases and releases[0] <= step:
            releases.pop(0)
            if drawer is not None:
                join_pool(drawer.next_chunk())
            else:  # read from the cache
                a = len(pool_labels) - args.pool_start
                join_pool(late_labels[a : a + args.pool_chunk])
            if not releases:
                torch.set_num_threads(args.threads)
                if drawer is not None:
                    drawer.close()
                print(f"  the pool is whole ({len(pool_labels)} scenes) at step {step}"
                      + (f"; waited {drawer.waited:.0f}s for late scenes" if drawer is not None else ""), flush=True)
        for o in optimisers:
            for group in o.param_groups:
                group["lr"] = base_lr[id(group)] * schedule(step)
        idx = torch.from_numpy(rng.choice(len(pool_labels), size=args.batch, replace=False))
        codes = torch.from_numpy(rng.integers(0, 8, size=args.batch))
        imgs = augment(pool[idx], codes)
        grid = augment(grids[idx], codes).flatten(1).long()  # B x G*G
        keep = None
        n_patches = grid.shape[1]
        if 0 < args.keep_patches < n_patches and step < args.steps * (1.0 - args.full_tail):
            # object patches first (in random order), then random background ones
            score = augment(touched[idx], codes).flatten(1).float() + torch.rand(grid.shape)
            keep = score.topk(args.keep_patches, dim=1).indices
            grid = grid.gather(1, keep)
        pixels = to_pixels(imgs)
        caps = sample_captions(rng, [pool_labels[i] for i in idx.tolist()], args.p_comp)
        rows = torch.tensor([bank.index[c] for c in caps])
        # Encode each distinct caption once: the batch's captions and every label's caption
        # (bank rows 0..L-1), then gather the columns.
        uniq = torch.unique(torch.cat([rows, torch.arange(n_lab)]))  # sorted
        ids, mask = bank.input_ids[uniq], bank.attention_mask[uniq]
        width = int(mask.sum(1).max())
        txt = model.get_text_features(input_ids=ids[:, :width], attention_mask=mask[:, :width]).pooler_output
        tokens, pooled, hidden = vision_forward(model.vision_model, pixels, keep, with_hidden=True)
        img = model.visual_projection(pooled)
        sims = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # B x U
        batch_logits = sims[:, torch.searchsorted(uniq, rows)]  # B images x B captions
        label_logits = sims[:, :n_lab]  # uniq starts with rows 0..L-1
        img_present = present[idx]  # B x L
        # caption c is a positive for image i iff i holds every label c needs
        needs = bank.needs[rows].float()  # B x L
        pos = (img_present.float() @ needs.T) >= needs.sum(1)[None, :]  # B x B
        loss_i2t = multi_positive_loss(batch_logits, pos)
        loss_t2i = multi_positive_loss(batch_logits.T, pos.T)
        loss_lab = multi_positive_loss(label_logits, img_present)
        loss = 0.5 * (loss_i2t + loss_t2i) + args.label_loss * loss_lab
        if args.patch_loss > 0:
            patch_logits = patch_head(model.vision_model.post_layernorm(tokens[:, 1:]))
            loss_patch = F.cross_entropy(patch_logits.flatten(0, 1), grid.flatten())
            loss = loss + args.patch_loss * loss_patch
        else:
            loss_patch = torch.zeros(())
        mid_losses = [F.cross_entropy(head(hidden[block][:, 1:]).flatten(0, 1), grid.flatten())
                      for block, head in zip(mid_blocks, mid_heads)]
        for term in mid_losses:
            loss = loss + args.mid_patch_loss * term
        loss_mid = torch.stack(mid_losses).mean() if mid_losses else torch.zeros(())

        for o in optimisers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay + block_matrices, 1.0, foreach=True)
        for o in optimisers:
            o.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_scale)

        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 20 == 0 or step == 0:
            el = time.time() - t_train
            print(
                f"step {step + 1}/{args.steps} loss {loss.item():.3f} (avg {running:.3f}) "
                f"i2t {loss_i2t.item():.3f} t2i {loss_t2i.item():.3f} labels {loss_lab.item():.3f} patches {loss_patch.item():.3f} "
                f"(earlier blocks {loss_mid.item():.3f}) "
                f"scale {model.logit_scale.exp().item():.1f} lr {args.lr * schedule(step):.2e} "
                f"{el:.0f}s ({el / (step + 1):.2f}s/step)",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            v = validate(model, val_pixels, val_truth, val_multi_pixels, val_multi_present, bank)
            print(f"  val: zero-shot {v['zero-shot']:.3f} on {len(val_truth)} single-object scenes "
                  f"(colour {v['colour']:.3f}, shape {v['shape']:.3f}); all present above all absent "
                  f"{v['multi']:.3f} on {len(val_multi_pixels)} scenes of 2-4 objects ({v['pairs']:.4f} of the "
                  "(present, absent) pairs)", flush=True)

    t_total = time.time() - t_start
    print(f"trained {args.steps} steps in {time.time() - t_train:.0f}s (total {t_total:.0f}s)", flush=True)
    if len(pool_labels) < args.pool:
        print(f"  note: the run ended before the pool was whole ({len(pool_labels)} of {args.pool} scenes joined)",
              flush=True)
        if drawer is not None:
            drawer.close(stop=True)
    elif cache is not None and late_labels is None:  # drawn in this run
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=pool_u8, labels=json.dumps(pool_labels), grids=pool_grids, touched=pool_touched)
    token_embedding.sparse = False
    save(model, args, t_total, time.time() - t_train, t_data, n_params, drawer.waited if drawer is not None else 0.0)


def save(model, args, t_total: float, t_train: float, t_data: float, n_params: int, t_waited: float = 0.0) -> None:
    out: Path = args.out
    model.eval()
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # Weights are stored in float16 to keep the package small; compute in float32.
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    pre = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": args.image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": args.image_size, "width": args.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    info = {
        "trained_by": "scripts/train_shapes.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "train_seed": TRAIN_SEED,
        "n_parameters": n_params,
        "seconds_total": round(t_total),
        "seconds_training_steps": round(t_train),
        "seconds_drawing_data": round(t_data),
        "seconds_waiting_for_scenes": round(t_waited, 1),
        "torch": torch.__version__,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"saved to {out} ({size / 1e6:.1f} MB on disk)", flush=True)


if __name__ == "__main__":
    main()
