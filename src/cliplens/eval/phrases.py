"""Per-phrase pointing game on the shapes world: which word matches which region.

Each item is a scene of 2-4 objects with a caption that names 2 or 3 of them ("a red circle
and a blue star"). For every named object, a source gives one map, and it scores a hit when the
map's maximum (upsampled to the scene's pixels) lies on that object's visible mask (the pointing
game with tolerance 0). Sources:

- an interaction method (``interactions``, ``jacobian_interactions``): the word map of the
  object's phrase (``colour shape``): the sum of its tokens' rows of the token x patch matrix
  of the whole caption;
- a first-order method on the whole caption (what users do today): one map for the caption,
  the same for every phrase, so at most one named object per scene can be hit;
- a first-order method on the phrase alone as its own prompt ("a red circle"), the usual
  workaround of splitting the prompt;
- ``random`` (a seeded random map) and ``centre`` (a centred Gaussian).

The multi-object pointing games of exCLIP and FIxLIP are of this kind: :func:`mosaic_items`
builds theirs from any labelled dataset (four images of four classes tiled 2x2, a caption naming
the four classes, each class's quadrant as its mask); :func:`phrase_items` draws shapes scenes
with exact object masks, for a model trained offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from ..adapters import ModelAdapter, adapt, load_model
from ..api import explain
from ..errors import InputError
from ..methods import REGISTRY
from ..tokens import find_phrase
from ..worlds import shapes
from .datasets import EvalItem
from .metrics import centre_prior, pointing_game, random_map

INTERACTION_METHODS = ("interactions", "jacobian_interactions")
FIRST_ORDER_METHODS = ("chefer", "legrad", "decomposition", "gradcam", "rollout")


@dataclass(frozen=True)
class PhraseItem:
    """One image, its caption, and per named thing: the phrase (as it stands in the caption),
    where it is (a boolean mask of the image) and the prompt that asks for it alone."""

    image: Image.Image
    caption: str
    phrases: list[str]
    masks: list[np.ndarray]
    alone: list[str]


def phrase_items(n_scenes: int, *, seed: int = 0, size: int = shapes.DEFAULT_SIZE, named: Sequence[int] = (2, 3)):
    """Shapes-world items: ``n_scenes`` scenes of 2-4 objects, captions naming 2 or 3 of them;
    the same arguments always give the same items."""
    for i in range(n_scenes):
        rng = np.random.default_rng([seed, i, 0xF1A5E])
        k = int(rng.choice(list(named)))
        scene = shapes.make_scene(shapes.scene_seed(seed, i), n_objects=int(rng.integers(max(k, 2), 5)), size=size)
        order = rng.permutation(len(scene.objects))[:k]
        objs = [scene.objects[j] for j in order]
        yield PhraseItem(
            scene.image,
            shapes.compositional_caption(objs),
            [o.label for o in objs],
            [o.mask for o in objs],
            [shapes.caption(o) for o in objs],
        )


def mosaic_items(
    dataset: str, n_mosaics: int, *, seed: int = 0, side: int = 448, template: str = "a photo of a {}"
):
    """The mosaic protocol of exCLIP / FIxLIP on any labelled dataset (``"KIND:PATH"``, see
    :func:`cliplens.eval.open_dataset`; each item's first label is its class): per mosaic, four
    images of four different classes, each resized to ``side/2`` square and tiled 2x2, the
    caption ``"a photo of a A, a B, a C and a D"`` and each class's quadrant as its mask."""
    from .datasets import open_dataset

    by_class: dict[str, list[EvalItem]] = {}
    for item in open_dataset(dataset):
        if item.labels:
            by_class.setdefault(item.labels[0], []).append(item)
    classes = sorted(by_class)
    if len(classes) < 4:
        raise InputError(f"a mosaic needs four classes; {dataset} has {len(classes)} labelled")
    half = side // 2
    for i in range(n_mosaics):
        rng = np.random.default_rng([seed, i, 0x305A1C])
        chosen = [classes[j] for j in rng.choice(len(classes), 4, replace=False)]
        canvas = Image.new("RGB", (2 * half, 2 * half))
        masks = []
        for q, name in enumerate(chosen):
            pick = by_class[name][int(rng.integers(len(by_class[name])))]
            x, y = (q % 2) * half, (q // 2) * half
            canvas.paste(pick.image.convert("RGB").resize((half, half), Image.BICUBIC), (x, y))
            mask = np.zeros((2 * half, 2 * half), dtype=bool)
            mask[y : y + half, x : x + half] = True
            masks.append(mask)
        head = template.format(chosen[0])
        caption = head + ", " + ", ".join(f"a {c}" for c in chosen[1:3]) + f" and a {chosen[3]}"
        yield PhraseItem(canvas, caption, chosen, masks, [template.format(c) for c in chosen])


@dataclass
class PhraseResults:
    """Hits per source; ``rows`` in a fixed order (interaction methods, then per first-order
    method its whole-caption and phrase-alone rows, then the baselines)."""

    rows: list[dict] = field(default_factory=list)
    n_scenes: int = 0
    n_phrases: int = 0

    def markdown(self) -> str:
        lines = ["| source | map of a phrase | pointing accuracy | hits |", "|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| `{r['source']}` | {r['how']} | {r['accuracy']:.3f} | {r['hits']}/{r['n']} |")
        return "\n".join(lines)


def _hit(geometry, grid_map: np.ndarray, mask: np.ndarray) -> bool:
    return bool(pointing_game(geometry.grid_to_original(np.asarray(grid_map, dtype=np.float64)), mask))


def evaluate_phrases(
    model="shapes",
    n_scenes: int = 100,
    *,
    seed: int = 0,
    size: int = shapes.DEFAULT_SIZE,
    interaction_methods: Sequence[str] = INTERACTION_METHODS,
    first_order: Sequence[str] = FIRST_ORDER_METHODS,
    progress: bool = False,
    items=None,
) -> PhraseResults:
    """Score every source on ``n_scenes`` shapes items, or on ``items`` (an iterable of
    :class:`PhraseItem`, e.g. :func:`mosaic_items`) when given; see the module docstring."""
    if n_scenes < 1:
        raise InputError("n_scenes must be at least 1")
    for name in (*interaction_methods, *first_order):
        if name not in REGISTRY:
            raise InputError(f"unknown method {name!r}")
    adapter: ModelAdapter = load_model(model) if isinstance(model, str) else adapt(model)
    keys = [(m, "word map of the caption's token x patch matrix") for m in interaction_methods]
    for m in first_order:
        keys += [(m, "first-order map of the whole caption"), (f"{m} (phrase alone)", "first-order map of the phrase as its own prompt")]
    keys += [("random", "random map"), ("centre", "centred Gaussian")]
    hits = {k[0]: 0 for k in keys}
    n = 0
    if items is None:
        items = phrase_items(n_scenes, seed=seed, size=size)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=n_scenes, desc="phrase pointing", unit="scene")
    scenes = 0
    for i, item in enumerate(items):
        scenes += 1
        image = item.image
        for m in interaction_methods:
            ex = explain(adapter, image, item.caption, method=m)
            matrix = np.asarray(ex.extras["interactions"][0][0])  # (T, Gh, Gw)
            start = 0
            for phrase, mask in zip(item.phrases, item.masks):
                idx = find_phrase(ex.tokens[0], phrase, start)
                start = idx[-1] + 1
                hits[m] += _hit(ex.geometries[0], matrix[idx].sum(0), mask)
        for m in first_order:
            whole = explain(adapter, image, item.caption, method=m)
            alone = explain(adapter, image, item.alone, method=m)
            for p, mask in enumerate(item.masks):
                hits[m] += _hit(whole.geometries[0], whole.grid_map(0, 0), mask)
                hits[f"{m} (phrase alone)"] += _hit(alone.geometries[0], alone.grid_map(0, p), mask)
        ref = explain(adapter, image, item.caption, method="raw_attention", towers=("image",))
        geometry, grid = ref.geometries[0], ref.grid_map(0, 0).shape
        for p, mask in enumerate(item.masks):
            hits["random"] += _hit(geometry, random_map(grid, seed=seed * 100003 + i * 7 + p), mask)
            hits["centre"] += _hit(geometry, centre_prior(grid), mask)
        n += len(item.masks)
    if n == 0:
        raise InputError("no items to score")
    rows = [{"source": s, "how": how, "hits": hits[s], "n": n, "accuracy": hits[s] / n} for s, how in keys]
    return PhraseResults(rows, scenes, n)
