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

The multi-object pointing games of exCLIP and FIxLIP are of this kind (four ImageNet images
tiled 2x2); the shapes world gives exact masks and a model trained offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..adapters import ModelAdapter, adapt, load_model
from ..api import explain
from ..errors import InputError
from ..methods import REGISTRY
from ..tokens import find_phrase
from ..worlds import shapes
from .metrics import centre_prior, pointing_game, random_map

INTERACTION_METHODS = ("interactions", "jacobian_interactions")
FIRST_ORDER_METHODS = ("chefer", "legrad", "decomposition", "gradcam", "rollout")


@dataclass(frozen=True)
class PhraseItem:
    """One scene, its caption, and per named object: the phrase and the object."""

    scene: shapes.Scene
    caption: str
    phrases: list[str]
    objects: list[shapes.ShapeObject]


def phrase_items(n_scenes: int, *, seed: int = 0, size: int = shapes.DEFAULT_SIZE, named: Sequence[int] = (2, 3)):
    """Yield ``n_scenes`` items; the same arguments always give the same items."""
    for i in range(n_scenes):
        rng = np.random.default_rng([seed, i, 0xF1A5E])
        k = int(rng.choice(list(named)))
        scene = shapes.make_scene(shapes.scene_seed(seed, i), n_objects=int(rng.integers(max(k, 2), 5)), size=size)
        order = rng.permutation(len(scene.objects))[:k]
        objs = [scene.objects[j] for j in order]
        yield PhraseItem(scene, shapes.compositional_caption(objs), [o.label for o in objs], objs)


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


def _hit(geometry, grid_map: np.ndarray, obj: shapes.ShapeObject) -> bool:
    return bool(pointing_game(geometry.grid_to_original(np.asarray(grid_map, dtype=np.float64)), obj.mask))


def evaluate_phrases(
    model="shapes",
    n_scenes: int = 100,
    *,
    seed: int = 0,
    size: int = shapes.DEFAULT_SIZE,
    interaction_methods: Sequence[str] = INTERACTION_METHODS,
    first_order: Sequence[str] = FIRST_ORDER_METHODS,
    progress: bool = False,
) -> PhraseResults:
    """Score every source on ``n_scenes`` items (see the module docstring)."""
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
    items = phrase_items(n_scenes, seed=seed, size=size)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=n_scenes, desc="phrase pointing", unit="scene")
    for i, item in enumerate(items):
        image = item.scene.image
        for m in interaction_methods:
            ex = explain(adapter, image, item.caption, method=m)
            matrix = np.asarray(ex.extras["interactions"][0][0])  # (T, Gh, Gw)
            start = 0
            for phrase, obj in zip(item.phrases, item.objects):
                idx = find_phrase(ex.tokens[0], phrase, start)
                start = idx[-1] + 1
                hits[m] += _hit(ex.geometries[0], matrix[idx].sum(0), obj)
        for m in first_order:
            whole = explain(adapter, image, item.caption, method=m)
            alone = explain(adapter, image, [shapes.caption(p) for p in item.phrases], method=m)
            for p, obj in enumerate(item.objects):
                hits[m] += _hit(whole.geometries[0], whole.grid_map(0, 0), obj)
                hits[f"{m} (phrase alone)"] += _hit(alone.geometries[0], alone.grid_map(0, p), obj)
        geometry, grid = None, None
        ref = explain(adapter, image, item.caption, method="raw_attention", towers=("image",))
        geometry, grid = ref.geometries[0], ref.grid_map(0, 0).shape
        for p, obj in enumerate(item.objects):
            hits["random"] += _hit(geometry, random_map(grid, seed=seed * 100003 + i * 7 + p), obj)
            hits["centre"] += _hit(geometry, centre_prior(grid), obj)
        n += len(item.objects)
    rows = [{"source": s, "how": how, "hits": hits[s], "n": n, "accuracy": hits[s] / n} for s, how in keys]
    return PhraseResults(rows, n_scenes, n)
