"""One dataset item -> one JSON-able record.

:meth:`ItemRunner.evaluate_item` is a function of (adapter, completed config, index, item): the
same arguments give the same record (everything random is seeded by config seed and item index;
the sanity check's randomised copy is restored after every item). It is the unit of work of
:func:`cliplens.eval.harness.evaluate`, and of any process that evaluates a shard of a dataset.

What is explained for each (image, labelled object) pair is chosen by ``config.target``
(:func:`explained_targets`). The maps of every source (the methods, then the baselines
``random``, ``centre`` and, where masks exist, ``oracle``) are patch maps of the model input
(:func:`source_maps`), scored by three independent scorers:

- :func:`localisation_scores`: segmentation counts, pointing game, point counts, on the map
  brought onto the original image;
- :func:`perturbation_scores`: Chefer's positive / negative curves and deletion / insertion,
  re-running the model on perturbed inputs;
- :func:`sanity_scores`: Spearman correlations with the maps of the cascadingly randomised model.

A record is ``{"index", "id", ["skipped"], ["refused"], ["unique_inputs"], ["pairs"]}``; each
pair is ``{"label", "text", "value", [class info], "scores": {source: {metric: value}}}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..adapters import ModelAdapter
from ..adapters.base import TextBatch
from ..api import explain
from ..errors import CliplensError
from ..images import Geometry
from ..methods import get_method
from ..targets import Target, resolve_target
from .classifier import ZeroShotClassifier, encode_images
from .config import BASELINES, TIE_DRAWS, EvalConfig
from .datasets import EvalItem
from .metrics import (
    centre_prior,
    deletion_curve,
    insertion_curve,
    perturbation_curve,
    point_counts,
    pointing_game,
    random_map,
    segmentation_counts,
    spearman_correlation,
    token_perturbation_curve,
)
from .perturbation import CurveBatch, PromptScorer, black_value, mask_to_grid
from .sanity import CascadingRandomization

__all__ = [
    "ItemRunner",
    "evaluate_item",
    "explained_targets",
    "item_seed",
    "localisation_scores",
    "perturbation_scores",
    "sanity_scores",
    "scored_labels",
    "source_maps",
]

#: (source, pair index) -> {metric key: JSON value}: what each scorer returns.
Scores = dict[tuple[str, int], dict[str, Any]]
LOCALISATION = frozenset({"segmentation", "pointing", "pmiou"})
PERTURBATION = frozenset({"perturbation", "deletion"})


class ItemRunner:
    """Evaluates items one at a time for one (adapter, completed config).

    Holds what is made once per run and only when first needed: the zero-shot classifier of
    the class targets and the sanity check's randomised copy of the model.
    """

    def __init__(
        self, adapter: ModelAdapter, config: EvalConfig, classifier: ZeroShotClassifier | None = None
    ):
        self.adapter = adapter
        self.config = config
        self._classifier = classifier
        self._randomizer: CascadingRandomization | None = None

    @property
    def classifier(self) -> ZeroShotClassifier | None:
        """The zero-shot classifier over ``config.classes`` (class targets only)."""
        cfg = self.config
        if self._classifier is None and cfg.target.startswith("class"):
            assert isinstance(cfg.classes, tuple) and isinstance(cfg.templates, tuple), "config not completed"
            self._classifier = ZeroShotClassifier.build(self.adapter, cfg.classes, cfg.templates)
        return self._classifier

    @property
    def randomizer(self) -> CascadingRandomization:
        """The sanity check's private copy of the model (seeded by ``config.seed``)."""
        if self._randomizer is None:
            self._randomizer = CascadingRandomization(self.adapter, seed=self.config.seed)
        return self._randomizer

    def evaluate_item(self, index: int, item: EvalItem) -> dict:
        """The record of item ``index`` (see the module docstring)."""
        cfg, adapter = self.config, self.adapter
        masks = item.masks or {}
        points = item.points or {}
        labels = scored_labels(item)
        record: dict[str, Any] = {"index": index, "id": item.id}
        if not labels:
            record["skipped"] = "no labelled object"
            return record
        group = adapter.prepare_images([item.image], resize="model")[0]
        if cfg.segmentation_protocol != "cliplens":
            h_in, w_in = group.pixel_values.shape[-2:]
            item = squashed_item(item, (int(w_in), int(h_in)))
            masks, points = item.masks or {}, item.points or {}
            group = adapter.prepare_images([item.image], resize="model")[0]
        pixels, geom = group.pixel_values[0], group.geometries[0]
        texts, target, info = explained_targets(adapter, cfg, labels, pixels, self.classifier)
        scorer = PromptScorer.of(adapter, texts, target)
        values = scorer(pixels[None])[0]
        maps, refused = source_maps(adapter, cfg, index, item, labels, texts, target, pixels, geom)
        if refused:
            record["refused"] = refused

        pairs = [
            {
                "label": label,
                "text": texts[p],
                "value": float(values[p]),
                **info[p],
                "scores": {s: {} for s in maps},
            }
            for p, label in enumerate(labels)
        ]
        found: list[Scores] = []
        metrics = set(cfg.metrics)
        if metrics & LOCALISATION:
            ignore = (item.extra or {}).get("ignore")
            found.append(localisation_scores(cfg, maps, labels, masks, points, geom, ignore=ignore))
        if metrics & PERTURBATION:
            top1 = None
            if cfg.perturbation_protocol == "chefer":
                clf = self.classifier
                assert clf is not None  # the config requires a class target
                top1 = (clf, [clf.class_index(rec["class"]) for rec in info])
            curves, record["unique_inputs"] = perturbation_scores(
                adapter, cfg, pixels, maps, scorer, index=index, top1=top1
            )
            found.append(curves)
        if "text_perturbation" in metrics:
            content, tokens = source_tokens(adapter, cfg, index, item, texts, target)
            found.append(text_perturbation_scores(adapter, pixels, texts, content, tokens, scorer))
        if "sanity" in metrics and index < cfg.sanity_items:
            found.append(sanity_scores(self.randomizer, cfg, item, texts, target, maps))
        for scores in found:
            for (s, p), entry in scores.items():
                pairs[p]["scores"][s].update(entry)
        record["pairs"] = pairs
        return record


def evaluate_item(adapter: ModelAdapter, config: EvalConfig, index: int, item: EvalItem) -> dict:
    """The record of one item, with a runner made for it alone (see :class:`ItemRunner`)."""
    return ItemRunner(adapter, config).evaluate_item(index, item)


# ----------------------------------------------------------------------------- what is explained


def squashed_item(item: EvalItem, size: tuple[int, int]) -> EvalItem:
    """``item`` squashed to ``size`` = (width, height), as Chefer et al.'s ImageNet-Segmentation
    script does before anything (image bicubic, masks and the ignore mask nearest neighbour,
    points scaled): the model then sees the squashed image whole and every map is scored at
    that size."""
    from dataclasses import replace

    from PIL import Image

    w, h = size
    W, H = item.image.size

    def nearest(mask) -> np.ndarray:
        img = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
        return np.asarray(img.resize((w, h), resample=Image.NEAREST)) > 127

    sx, sy = w / W, h / H
    points = None
    if item.points is not None:
        points = {}
        for label, (pos, neg) in item.points.items():
            scaled = []
            for pts in (pos, neg):
                a = np.asarray(pts, dtype=np.float64).reshape(-1, 2) * [sx, sy]
                scaled.append(a)
            points[label] = tuple(scaled)
    extra = dict(item.extra or {})
    if extra.get("ignore") is not None:
        extra["ignore"] = nearest(extra["ignore"])
    return replace(
        item,
        image=item.image.resize((w, h), resample=Image.BICUBIC),
        masks=None if item.masks is None else {k: nearest(m) for k, m in item.masks.items()},
        points=points,
        extra=extra,
    )


def scored_labels(item: EvalItem) -> list[str]:
    """The item's labels that can be scored: a non-empty mask or point labels."""
    masks = item.masks or {}
    points = item.points or {}
    return [
        label
        for label in item.labels
        if (label in masks and np.asarray(masks[label]).any()) or label in points
    ]


def explained_targets(
    adapter: ModelAdapter,
    config: EvalConfig,
    labels: list[str],
    pixels: torch.Tensor,
    classifier: ZeroShotClassifier | None,
) -> tuple[list[str], Target, list[dict[str, Any]]]:
    """(texts, target, per-pair class info) for the labels of one image.

    ``logit`` / ``probability``: the labels in ``config.prompt``. ``class``: the classifier's
    probability of the label's class (the predicted class where the label is no class name);
    ``class-contrast``: that class's logit minus the best other class's."""
    info: list[dict[str, Any]] = [{} for _ in labels]
    if config.target in ("logit", "probability"):
        assert config.prompt is not None, "config not completed"
        texts = [config.prompt.format(label) for label in labels]
        return texts, resolve_target(config.target, texts), info
    clf = classifier
    assert clf is not None
    probs = clf.probabilities(encode_images(adapter, pixels[None]).double())[0]
    predicted = int(probs.argmax())
    chosen = []
    for label, rec in zip(labels, info):
        c = clf.index.get(label, predicted)
        chosen.append(c)
        rec.update(
            {"class": clf.classes[c], "predicted": clf.classes[predicted], "probability": float(probs[c])}
        )
    texts = [clf.classes[c] for c in chosen]
    if config.target == "class":
        return texts, clf.target(chosen), info
    versus = []
    for c, rec in zip(chosen, info):
        other = probs.clone()
        other[c] = -1.0
        v = int(other.argmax())
        versus.append(v)
        rec["versus"] = clf.classes[v]
    return texts, clf.contrast(chosen, versus), info


def item_seed(seed: int, index: int, p: int) -> int:
    """The seed of the random baseline's map of pair ``p`` of item ``index``."""
    return int(np.random.SeedSequence([int(seed), int(index), int(p), 0xE7A1]).generate_state(1)[0])


def source_maps(
    adapter: ModelAdapter,
    config: EvalConfig,
    index: int,
    item: EvalItem,
    labels: list[str],
    texts: list[str],
    target: Target,
    pixels: torch.Tensor,
    geom: Geometry,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(source -> (P, Gh, Gw) patch maps, method -> why it refused): the methods' maps in
    ``config.methods`` order, then the baselines (``oracle`` only where every label has a mask).
    A method that raises a user error (e.g. it cannot explain this kind of target) is left out."""
    maps: dict[str, np.ndarray] = {}
    refused: dict[str, str] = {}
    for m in config.methods or ():
        try:
            ex = explain(adapter, [item.image], texts, method=m, target=target, towers=("image",))
        except CliplensError as exc:
            refused[m] = str(exc)
            continue
        maps[m] = np.asarray(ex.image_maps[0], dtype=np.float64)  # type: ignore[index]
    ph, pw = adapter.patch_size
    grid = (pixels.shape[1] // ph, pixels.shape[2] // pw)
    P = len(labels)
    maps["random"] = np.stack([random_map(grid, seed=item_seed(config.seed, index, p)) for p in range(P)])
    maps["centre"] = np.stack([centre_prior(grid)] * P)
    masks = item.masks or {}
    if all(label in masks for label in labels):
        maps["oracle"] = np.stack([mask_to_grid(masks[label], geom, grid) for label in labels])
    return maps, refused


# ----------------------------------------------------------------------------- scorers


def source_tokens(
    adapter: ModelAdapter, config: EvalConfig, index: int, item: EvalItem, texts: list[str], target: Target
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """(content-token indices per prompt, source -> per prompt the scores of those tokens):
    every method of ``config.methods`` that gives token scores, then the ``random`` baseline
    (seeded like the random map). A method that gives none, or refuses, is left out."""
    batch = adapter.tokenize(texts)
    content = [np.flatnonzero(c[: len(t)]) for c, t in zip(batch.content.cpu().numpy(), batch.tokens)]
    out: dict[str, list[np.ndarray]] = {}
    for m in config.methods or ():
        if "text" not in get_method(m).towers:
            continue
        try:
            ex = explain(adapter, [item.image], texts, method=m, target=target, towers=("text",))
        except CliplensError:
            continue
        if ex.token_scores is not None:
            out[m] = [np.asarray(ex.token_scores[0, p, c], dtype=np.float64) for p, c in enumerate(content)]
    rng = [np.random.default_rng(item_seed(config.seed, index, p)) for p in range(len(texts))]
    out["random"] = [r.random(len(c)) for r, c in zip(rng, content)]
    return content, out


def text_perturbation_scores(
    adapter: ModelAdapter,
    pixels: torch.Tensor,
    texts: list[str],
    content: list[np.ndarray],
    tokens: dict[str, list[np.ndarray]],
    scorer: PromptScorer,
) -> Scores:
    """``text_perturbation`` (Chefer et al.'s text test): per source and pair, the pair's target
    while 0..100% of its prompt's content tokens are removed from the sequence (the start and
    end markers stay), most relevant first (``text_positive``) or least (``text_negative``);
    every perturbed prompt of the item scored in one batch."""
    batch = adapter.tokenize(texts)
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    # a dry run of every curve records which shortened prompt each step asks for (distinct ones
    # once: (prompt, kept token positions) -> row), then one batch scores them all
    planned: list[int] = []
    lookup: dict[tuple[int, tuple[int, ...]], int] = {}

    def plan(p):
        def score(removed: np.ndarray) -> float:
            gone = set(content[p][removed].tolist())
            sig = (p, tuple(t for t in range(int(mask[p].sum())) if t not in gone))
            planned.append(lookup.setdefault(sig, len(lookup)))
            return 0.0

        return score

    for per_prompt in tokens.values():
        for p, r in enumerate(per_prompt):
            for order in ("positive", "negative"):
                token_perturbation_curve(r, plan(p), order=order)
    if not lookup:
        return {}
    width = ids.shape[1]
    padding = (mask == 0).nonzero()
    pad = int(ids[padding[0, 0], padding[0, 1]]) if len(padding) else 0  # the tokenizer's own padding id
    new_ids = torch.full((len(lookup), width), pad, dtype=ids.dtype)
    new_mask = torch.zeros((len(lookup), width), dtype=mask.dtype)
    prompt_of = [0] * len(lookup)
    for (p, keep), row in lookup.items():
        new_ids[row, : len(keep)] = ids[p, list(keep)]
        new_mask[row, : len(keep)] = 1
        prompt_of[row] = p
    dev = batch.input_ids.device
    perturbed = TextBatch(
        [texts[p] for p in prompt_of],
        new_ids.to(dev),
        new_mask.to(dev),
        [[] for _ in prompt_of],
        [False] * len(prompt_of),
        torch.zeros_like(new_mask, dtype=torch.bool),
    )
    values = scorer.prompts(pixels[None], perturbed)[0]  # (distinct perturbed prompts,)
    it = iter(planned)
    out: Scores = {}
    for s, per_prompt in tokens.items():
        for p, r in enumerate(per_prompt):
            for order in ("positive", "negative"):
                curve = token_perturbation_curve(r, lambda _m: float(values[next(it)]), order=order)
                entry = out.setdefault((s, p), {})
                entry[f"text_{order}"] = [float(v) for v in curve.scores]
                entry[f"text_{order}_auc"] = curve.auc
    return out


def localisation_scores(
    config: EvalConfig,
    maps: dict[str, np.ndarray],
    labels: list[str],
    masks: dict[str, np.ndarray],
    points: dict[str, Any],
    geom: Geometry,
    ignore: np.ndarray | None = None,
) -> Scores:
    """Segmentation counts (``seg``), pointing hit (``pointing``) and point counts (``points``)
    of every source's map on the original image; the oracle is scored with the mask itself.
    ``ignore`` (H, W) bool, where a dataset marks pixels as unlabelled (ImageNet-S id 1000):
    every map is NaN there, so no metric counts them (not as background, not as the peak)."""
    metrics = set(config.metrics)
    out: Scores = {}
    for p, label in enumerate(labels):
        for s in maps:
            entry = out.setdefault((s, p), {})
            if s == "oracle":  # the mask itself, at full resolution
                on_orig = np.where(geom.seen_mask(), np.asarray(masks[label], dtype=np.float64), np.nan)
            else:
                on_orig = geom.grid_to_original(maps[s][p])
            if ignore is not None:
                on_orig = np.where(np.asarray(ignore, dtype=bool), np.nan, on_orig)
            seg_map = on_orig
            if config.segmentation_protocol == "textspan" and s != "oracle":
                seg_map = np.maximum(on_orig, 0.0)  # TextSpan clips the map at 0 (NaN stays NaN)
            if label in masks:
                mask = np.asarray(masks[label], dtype=bool)
                if "segmentation" in metrics:
                    c = segmentation_counts(seg_map, mask)
                    entry["seg"] = [c.correct, c.labeled, *c.intersection, *c.union, c.ap, c.ap_reference]
                if "pointing" in metrics and mask.any():
                    entry["pointing"] = int(pointing_game(on_orig, mask, tolerance=config.pointing_tolerance))
            if label in points and "pmiou" in metrics:
                pos, neg = points[label]
                pc = point_counts(on_orig, pos, neg)
                entry["points"] = [pc.tp, pc.fp, pc.fn, pc.tn]
    return out


def perturbation_scores(
    adapter: ModelAdapter,
    config: EvalConfig,
    pixels: torch.Tensor,
    maps: dict[str, np.ndarray],
    scorer: PromptScorer,
    *,
    index: int = 0,
    top1: tuple[ZeroShotClassifier, list[int]] | None = None,
) -> tuple[Scores, int]:
    """(curves and AUCs per source and pair, number of distinct model inputs run): the
    perturbation test (``positive`` / ``negative``) and ``deletion`` / ``insertion``, all
    steps of all curves batched through one :class:`CurveBatch`. With ``config.ties ==
    "random"`` every curve is drawn :data:`TIE_DRAWS` times with tied values shuffled (seeds
    from ``config.seed``, the item ``index``, the pair and the draw) and the draws are averaged
    (a map without ties gives the same masks every draw: no extra model input).

    ``config.perturbation_protocol == "chefer"``: the positive / negative curves remove the top
    fraction of the PIXELS of the map upsampled bilinearly to the input (x patch size), fill
    them black (0 in [0, 1] space), score top-1 accuracy of ``top1 = (classifier, class index
    per pair)`` and report the trapezoid AUC x 100, as Chefer et al.'s script and its
    maintainer's rule (issue #31)."""
    metrics = set(config.metrics)
    batch = CurveBatch(pixels, tuple(adapter.patch_size), config.removal, blur_sigma=config.blur_sigma)
    chefer = config.perturbation_protocol == "chefer" and "perturbation" in metrics
    pixel_batch = None
    if chefer:
        if top1 is None:
            raise ValueError("the chefer perturbation protocol needs the classifier and the pairs' classes")
        pixel_batch = CurveBatch(pixels, (1, 1), "black", black=black_value(adapter))
    ph, pw = adapter.patch_size
    n_pairs = len(next(iter(maps.values())))
    draws = TIE_DRAWS if config.ties == "random" else 1

    def seed(p: int, d: int) -> int | None:
        if config.ties != "random":
            return None
        return int(np.random.SeedSequence([int(config.seed), int(index), int(p), int(d), 0x71E5]).generate_state(1)[0])

    for p in range(n_pairs):
        for s, m in maps.items():
            r = m[p]
            up = upsample_map(r, (ph, pw)) if chefer else None
            for d in range(draws):
                t = seed(p, d)
                if chefer:
                    for order in ("positive", "negative"):
                        pixel_batch.add(  # type: ignore[union-attr]
                            (s, p, order, d), perturbation_curve, up, p, order=order, fractions=config.fractions, tie_seed=t
                        )
                elif "perturbation" in metrics:
                    for order in ("positive", "negative"):
                        batch.add(
                            (s, p, order, d),
                            perturbation_curve,
                            r,
                            p,
                            order=order,
                            fractions=config.fractions,
                            tie_seed=t,
                        )
                if "deletion" in metrics:
                    batch.add((s, p, "deletion", d), deletion_curve, r, p, n_steps=config.steps, tie_seed=t)
                    batch.add((s, p, "insertion", d), insertion_curve, r, p, n_steps=config.steps, tie_seed=t)
    grouped: dict[tuple, list] = {}
    results = list(batch.run(scorer).items())
    if pixel_batch is not None:
        clf, classes = top1  # type: ignore[misc]
        wanted = np.asarray(classes)[None]

        def accuracy(embeds: torch.Tensor) -> np.ndarray:
            predicted = clf.probabilities(embeds.double()).argmax(-1).cpu().numpy()
            return (predicted[:, None] == wanted).astype(np.float64)

        results += list(pixel_batch.run(scorer, score_embeds=accuracy).items())
    for (s, p, kind, _d), curve in results:
        grouped.setdefault((s, p, kind), []).append(curve)
    out: Scores = {}
    for (s, p, kind), curves in grouped.items():
        entry = out.setdefault((s, p), {})
        entry[kind] = [float(v) for v in np.mean([c.scores for c in curves], axis=0)]
        auc = float(np.mean([c.auc for c in curves]))
        entry[kind + "_auc"] = 100.0 * auc if chefer and kind in ("positive", "negative") else auc
    return out, len(batch.masks) + (len(pixel_batch.masks) if pixel_batch is not None else 0)


def upsample_map(grid_map: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """(Gh, Gw) -> (Gh*ph, Gw*pw): bilinear, align_corners=False, as ``F.interpolate(...,
    scale_factor=16, mode="bilinear")`` in Chefer et al.'s scripts."""
    import torch.nn.functional as F

    src = torch.from_numpy(np.asarray(grid_map, dtype=np.float64))[None, None]
    gh, gw = src.shape[-2:]
    out = F.interpolate(src, size=(gh * patch[0], gw * patch[1]), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def sanity_scores(
    randomizer: CascadingRandomization,
    config: EvalConfig,
    item: EvalItem,
    texts: list[str],
    target: Target,
    maps: dict[str, np.ndarray],
) -> Scores:
    """``sanity``: per source and pair, the Spearman correlation of the map with the map of the
    model whose top 1..L image blocks are random. A baseline does not read the model: its map
    under a random model is itself."""
    n_pairs = len(next(iter(maps.values())))
    rhos: dict[str, list[list[float]]] = {s: [[] for _ in range(n_pairs)] for s in maps}
    for _d, rand_adapter in randomizer.depths():
        for m in config.methods or ():
            if m not in maps:
                continue
            ex = explain(rand_adapter, [item.image], texts, method=m, target=target, towers=("image",))
            for p in range(n_pairs):
                rhos[m][p].append(spearman_correlation(maps[m][p], ex.grid_map(0, p)))
        for s in maps:
            if s not in BASELINES:
                continue
            for p in range(n_pairs):
                rhos[s][p].append(spearman_correlation(maps[s][p], maps[s][p]))
    return {(s, p): {"sanity": [float(v) for v in rhos[s][p]]} for s in maps for p in range(n_pairs)}
