"""The shapes world: procedurally drawn coloured shapes with exact, occlusion-correct masks.

A scene holds 1 to 4 objects (one of :data:`COLOURS` x one of :data:`SHAPES`, never the
same colour-and-shape twice) drawn in order on a textured, noisy background; later objects
occlude earlier ones. Every object carries its *visible* mask: exactly the pixels where
that object shows in the final image. Objects of different colours may overlap; two of the
same colour keep a small gap, so that the pixels always show where one ends and the other
begins (otherwise they would merge into one blob whose parts no model could name).

Everything is deterministic by seed and uses only numpy and PIL. Geometry (which objects,
where, how big, how rotated) and appearance (background texture, colour jitter, pixel
noise) come from two independent random streams, so ``make_scene(s, clean=True)`` has the
same objects and masks as ``make_scene(s)`` but is drawn in flat, exact colours on a flat
grey background: every pixel of an object's visible mask then has exactly that object's
nominal colour, and every other pixel is background. The tests check masks that way.

Dataset layout written by :func:`write_dataset` (paths relative to the dataset folder)::

    dataset.json        {"kind": "shapes", "version": 2, "seed", "n", "size", ...}
    index.jsonl         one JSON object per scene (see :func:`scene_record`)
    images/000000.png   RGB
    masks/000000_0.png  mode "L", 255 where object 0 is visible, else 0
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cliplens.masks import dilate_disk

__all__ = [
    "COLOURS",
    "SHAPES",
    "CLEAN_BACKGROUND",
    "ShapeObject",
    "Scene",
    "make_scene",
    "scene_seed",
    "caption",
    "compositional_caption",
    "all_labels",
    "all_captions",
    "absent_labels",
    "absent_captions",
    "scene_record",
    "write_dataset",
    "DATASET_VERSION",
]

DATASET_VERSION = 2

#: Nominal RGB of each colour name: well-separated hues, all saturated, none grey.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 15),
    "yellow": (240, 220, 25),
    "green": (30, 170, 50),
    "blue": (30, 75, 230),
    "purple": (145, 45, 200),
}

#: Shape names, in a fixed order (labels are colour-major over COLOURS x SHAPES).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Background of ``clean=True`` scenes; differs from every colour in COLOURS.
CLEAN_BACKGROUND: tuple[int, int, int] = (128, 128, 128)

# Object diameter as a fraction of the image side.
_MIN_DIAMETER = 0.3
_MAX_DIAMETER = 0.42
# An object must keep at least this fraction of its own pixels visible after occlusion.
_MIN_VISIBLE_FRACTION = 0.6
# Two objects of the same colour keep at least this gap (a fraction of the image side)
# between their whole shapes, so that they never merge into one blob of that colour.
_SAME_COLOUR_GAP = 0.03
_MAX_OBJECTS = 4

#: Side in pixels of scenes drawn without a ``size``; models resize them to their input.
DEFAULT_SIZE = 224


@dataclass(frozen=True, eq=False)
class ShapeObject:
    """One drawn object.

    ``mask`` is the visible mask (bool, H x W): the pixels where this object shows in the
    final image. ``shape_mask`` is the whole shape before occlusion. ``bbox`` is
    ``(x0, y0, x1, y1)`` of the visible mask with exclusive ends (``mask[y0:y1, x0:x1]``
    holds every visible pixel).
    """

    colour: str
    shape: str
    mask: np.ndarray
    shape_mask: np.ndarray
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]
    diameter: float
    rotation: float
    rgb: tuple[int, int, int]

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True, eq=False)
class Scene:
    """A drawn scene: ``image`` (PIL RGB, size x size) and its ``objects`` in drawing order."""

    image: Image.Image
    objects: list[ShapeObject]
    seed: int
    size: int
    clean: bool = False
    captions: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.objects]


def all_labels() -> list[str]:
    """Every ``"colour shape"`` label, colour-major (``"red circle"``, ``"red square"``, ...)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def caption(obj: ShapeObject | str) -> str:
    """``"a red triangle"`` for an object or a label."""
    label = obj if isinstance(obj, str) else obj.label
    return f"a {label}"


def all_captions() -> list[str]:
    """``caption(label)`` for every label in :func:`all_labels` order."""
    return [caption(label) for label in all_labels()]


def compositional_caption(objs: Sequence[ShapeObject | str]) -> str:
    """``"a red triangle and a blue circle"`` (objects in the given order)."""
    if not objs:
        raise ValueError("need at least one object")
    return " and ".join(caption(o) for o in objs)


def absent_labels(scene: Scene) -> list[str]:
    """Labels (in :func:`all_labels` order) of which the scene holds no object."""
    present = set(scene.labels)
    return [label for label in all_labels() if label not in present]


def absent_captions(scene: Scene) -> list[str]:
    return [caption(label) for label in absent_labels(scene)]


def scene_seed(dataset_seed: int, index: int) -> int:
    """The seed of scene ``index`` in a dataset drawn with ``dataset_seed`` (63-bit int)."""
    state = np.random.SeedSequence([int(dataset_seed), int(index), 0x5BA9E5]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ----------------------------------------------------------------------------- geometry


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray | None:
    """Vertices (K x 2, x/y) of a shape of nominal radius ``r``; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        half = 0.82 * r
        pts = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    elif shape == "triangle":
        big = 1.2 * r
        ang = np.deg2rad([-90.0, 30.0, 150.0])
        pts = np.stack([big * np.cos(ang), big * np.sin(ang)], axis=1)
    elif shape == "star":
        outer, inner = 1.15 * r, 0.46 * 1.15 * r
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, outer, inner)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    elif shape == "cross":
        a, w = 1.0 * r, 0.34 * r
        pts = np.array(
            [[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w], [-a, w], [-a, -w],
             [-w, -w]]
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    t = np.deg2rad(rot)
    rotm = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return pts @ rotm.T + np.array([cx, cy])


def _shape_mask(shape: str, cx: float, cy: float, r: float, rot: float, size: int) -> np.ndarray | None:
    """Bool mask of the whole shape, or None if any of it would leave the image."""
    poly = _polygon(shape, cx, cy, r, rot)
    if poly is None:
        x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
    else:
        x0, y0 = poly.min(axis=0)
        x1, y1 = poly.max(axis=0)
    if x0 < 1 or y0 < 1 or x1 > size - 2 or y1 > size - 2:
        return None
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if poly is None:
        draw.ellipse([x0, y0, x1, y1], fill=255)
    else:
        draw.polygon([tuple(p) for p in poly.tolist()], fill=255)
    return np.asarray(canvas) > 0


def _visible_masks(shape_masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Visible mask of each object: its shape minus the union of all later shapes."""
    visible: list[np.ndarray] = [np.zeros(0, bool)] * len(shape_masks)
    covered = np.zeros_like(shape_masks[0]) if shape_masks else None
    for k in range(len(shape_masks) - 1, -1, -1):
        visible[k] = shape_masks[k] & ~covered
        covered = covered | shape_masks[k]
    return visible


def _layout(rng: np.random.Generator, n: int, size: int) -> list[tuple[str, str, float, float, float, float, np.ndarray]]:
    """Pick n distinct (colour, shape) pairs and place them so that each stays visible enough
    and no two of the same colour touch."""
    colours = list(COLOURS)
    picks = rng.choice(len(colours) * len(SHAPES), size=n, replace=False)
    gap = max(1, round(_SAME_COLOUR_GAP * size))
    # A crowded scene can paint itself into a corner (about 1 four-object scene in 10,000
    # leaves no room for its last object); the whole layout then starts again, drawing on.
    for _restart in range(50):
        placed = _place(rng, [(colours[p // len(SHAPES)], SHAPES[p % len(SHAPES)]) for p in picks.tolist()], size,
                        gap)
        if placed is not None:
            return placed
    raise RuntimeError("could not place the objects; scene too crowded")  # pragma: no cover - never seen


def _place(rng: np.random.Generator, objects: list[tuple[str, str]], size: int,
           gap: int) -> list[tuple[str, str, float, float, float, float, np.ndarray]] | None:
    """Place ``objects`` (colour, shape) in order, or None if one of them finds no room."""
    placed: list[tuple[str, str, float, float, float, float, np.ndarray]] = []
    keep_out: dict[str, np.ndarray] = {}  # per colour: its shapes grown by the gap
    for colour, shape in objects:
        for attempt in range(400):
            # Crowded scenes: after many failed tries, lower the largest allowed size.
            hi = max(_MIN_DIAMETER, _MAX_DIAMETER * (1.0 - 0.4 * min(attempt / 300.0, 1.0)))
            d = rng.uniform(_MIN_DIAMETER, hi) * size
            r = d / 2.0
            cx, cy = rng.uniform(0, size, size=2)
            rot = float(rng.uniform(0.0, 360.0))
            m = _shape_mask(shape, float(cx), float(cy), r, rot, size)
            if m is None or (colour in keep_out and (m & keep_out[colour]).any()):
                continue
            # Every object so far (earlier ones counting everything on top of them) must
            # keep enough of its pixels in view.
            trial = [p[6] for p in placed] + [m]
            if all(v.sum() >= _MIN_VISIBLE_FRACTION * t.sum() for v, t in zip(_visible_masks(trial), trial)):
                placed.append((colour, shape, float(cx), float(cy), d, rot, m))
                grown = dilate_disk(m, gap)
                keep_out[colour] = grown if colour not in keep_out else keep_out[colour] | grown
                break
        else:
            return None
    return placed


# ----------------------------------------------------------------------------- appearance


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation textured background (float32, H x W x 3, 0..255)."""
    base = rng.uniform(85.0, 185.0)
    tint = rng.uniform(-10.0, 10.0, size=3)
    img = np.full((size, size, 3), base, np.float32) + tint.astype(np.float32)
    # Smooth blotches: a coarse random grid upsampled bicubically (shared by the channels,
    # so they stay grey-ish).
    cells = int(rng.integers(3, 9))
    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    blot = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    img += (rng.uniform(8.0, 22.0) * blot)[..., None]
    # Faint stripes at a random angle and period: sin(a x + b y + c), built from 1-D
    # factors as sin(a x + c) cos(b y) + cos(a x + c) sin(b y).
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(6.0, 24.0) * size / 128.0
    phase = rng.uniform(0.0, 2.0 * np.pi)
    k = 2.0 * np.pi / period
    axis = np.arange(size, dtype=np.float32)
    u = axis * np.float32(k * np.cos(theta)) + np.float32(phase)
    v = axis * np.float32(k * np.sin(theta))
    stripes = np.outer(np.cos(v), np.sin(u)) + np.outer(np.sin(v), np.cos(u))
    img += (np.float32(rng.uniform(0.0, 9.0)) * stripes)[..., None]
    return img


def make_scene(
    seed: int,
    n_objects: int | None = None,
    size: int = DEFAULT_SIZE,
    *,
    clean: bool = False,
) -> Scene:
    """Draw one scene; the same arguments always give the same pixels and masks.

    Parameters
    ----------
    seed : any non-negative int; selects the scene.
    n_objects : 1..4; by default drawn uniformly from 1..4 by the seed.
    size : side of the square image in pixels (object sizes scale with it).
    clean : flat grey background, exact nominal colours, no noise. Geometry and masks are
        the same as for ``clean=False`` with the same seed, n_objects and size.
    """
    if seed < 0:
        raise ValueError("seed must be non-negative")
    if size < 32:
        raise ValueError("size must be at least 32")
    geo = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    look = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    n = int(geo.integers(1, _MAX_OBJECTS + 1)) if n_objects is None else int(n_objects)
    if not 1 <= n <= _MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{_MAX_OBJECTS}")
    placed = _layout(geo, n, size)
    shape_masks = [p[6] for p in placed]
    visible = _visible_masks(shape_masks)

    if clean:
        img = np.empty((size, size, 3), np.float32)
        img[...] = np.array(CLEAN_BACKGROUND, np.float32)
    else:
        img = _background(look, size)
    objects: list[ShapeObject] = []
    for (colour, shape, cx, cy, d, rot, smask), vis in zip(placed, visible):
        nominal = np.array(COLOURS[colour], np.float32)
        rgb = nominal if clean else np.clip(nominal + look.uniform(-14.0, 14.0, size=3), 0, 255)
        rgb = np.round(rgb)
        img[smask] = rgb
        ys, xs = np.nonzero(vis)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(
            ShapeObject(
                colour=colour,
                shape=shape,
                mask=vis,
                shape_mask=smask,
                bbox=bbox,
                center=(cx, cy),
                diameter=d,
                rotation=rot,
                rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
            )
        )
    if not clean:
        img += np.float32(look.uniform(2.0, 7.0)) * look.standard_normal(img.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), mode="RGB")
    return Scene(
        image=image,
        objects=objects,
        seed=int(seed),
        size=size,
        clean=clean,
        captions=[caption(o) for o in objects],
    )


# ----------------------------------------------------------------------------- dataset


def _stem(i: int) -> str:
    return f"{i:06d}"


def scene_record(scene: Scene, stem: str) -> dict:
    """The ``index.jsonl`` record of a scene whose files are named after ``stem``.

    ``captions[k]`` is the caption of ``objects[k]``; ``compositional`` joins all of them
    (drawing order); ``absent`` holds the captions of every label not in the scene.
    """
    return {
        "id": stem,
        "seed": scene.seed,
        "image": f"images/{stem}.png",
        "width": scene.image.width,
        "height": scene.image.height,
        "objects": [
            {
                "label": o.label,
                "colour": o.colour,
                "shape": o.shape,
                "mask": f"masks/{stem}_{k}.png",
                "bbox": list(o.bbox),
                "area": o.area,
            }
            for k, o in enumerate(scene.objects)
        ],
        "captions": [caption(o) for o in scene.objects],
        "compositional": compositional_caption(scene.objects),
        "absent": absent_captions(scene),
    }


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    size: int = DEFAULT_SIZE,
    *,
    n_objects: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Draw ``n`` scenes and write them as a dataset folder (layout in the module docstring).

    Scene ``i`` is ``make_scene(scene_seed(seed, i), n_objects, size)``. The files are written
    into a temporary sibling folder that is renamed to ``out_dir`` only when complete, so an
    interrupted run leaves no half dataset behind. An existing ``out_dir`` raises
    ``FileExistsError`` unless ``overwrite`` is true.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..files import sweep_stale

    sweep_stale(out.parent)  # what killed runs left behind (their pid is in the name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        indices: Iterable[int] = range(n)
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="shapes", unit="scene")
        with open(tmp / "index.jsonl", "w", encoding="utf-8") as index:
            for i in indices:
                stem = _stem(i)
                scene = make_scene(scene_seed(seed, i), n_objects=n_objects, size=size)
                scene.image.save(tmp / "images" / f"{stem}.png")
                for k, o in enumerate(scene.objects):
                    Image.fromarray(o.mask.astype(np.uint8) * 255, mode="L").save(tmp / "masks" / f"{stem}_{k}.png")
                index.write(json.dumps(scene_record(scene, stem)) + "\n")
        meta = {
            "kind": "shapes",
            "version": DATASET_VERSION,
            "seed": int(seed),
            "n": int(n),
            "size": int(size),
            "n_objects": n_objects,
            "labels": all_labels(),
            "bbox": "x0, y0, x1, y1 of the visible mask, ends exclusive",
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
