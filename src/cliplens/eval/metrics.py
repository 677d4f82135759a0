"""Metrics for attribution maps: pure numpy, no model, float64 throughout.

The protocols are those of ``design/ALGORITHMS.md`` ("Evaluation protocols"):

- **Segmentation** (ImageNet-Segmentation, as evaluated by Chefer et al. 2021 and TextSpan):
  threshold the map at its mean, score pixel accuracy and the IoU of both classes; average
  precision of the continuous map. :func:`segmentation_counts`, :class:`SegmentationAccumulator`.
- **Pointing game** (Zhang et al. 2018): is the arg-max inside the object? :func:`pointing_game`.
- **p-mIoU** (OpenImages V7 point labels, as used by GEM and LeGrad): min-max normalise,
  binarise at 0.5, score only the labelled points. :func:`point_counts`,
  :class:`PointIoUAccumulator`.
- **Perturbation** (Chefer et al. 2021) and **deletion / insertion** (Petsiuk et al. 2018,
  RISE): remove patches in relevance order and record a score. :func:`perturbation_curve`,
  :func:`deletion_curve`, :func:`insertion_curve`, :func:`apply_patch_removal`.
- **Sanity checks** (Adebayo et al. 2018): rank correlation between two maps.
  :func:`spearman_correlation`, :func:`pearson_correlation`.
- **Baselines**: :func:`random_map`, :func:`centre_prior`, :func:`oracle_map`.

Conventions shared by every function here:

- A *map* is a 2-D float array (H, W) at the resolution of the ground truth it is compared
  with; bringing a patch map onto the image is the caller's step. Non-finite pixels (NaN:
  pixels the model never saw, e.g. cut off by a centre crop) are *excluded* from every metric,
  never filled in: they count neither as foreground nor as background.
- Masks are boolean (H, W); any array is accepted and read as ``mask != 0``.
- Points are (x, y) pixel coordinates, x along the width; the pixel at row i, column j covers
  ``[j, j+1) x [i, i+1)``, so a point falls in pixel ``(floor(y), floor(x))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..masks import dilate_disk

__all__ = [
    "CHEFER_FRACTIONS",
    "TEXT_FRACTIONS",
    "token_perturbation_curve",
    "PerturbationCurve",
    "PointCounts",
    "PointIoUAccumulator",
    "PointIoUScores",
    "SegmentationAccumulator",
    "SegmentationCounts",
    "SegmentationScores",
    "apply_patch_removal",
    "area_under_curve",
    "average_precision",
    "centre_prior",
    "deletion_curve",
    "gaussian_blur",
    "is_flat",
    "insertion_curve",
    "minmax_normalize",
    "oracle_map",
    "pearson_correlation",
    "perturbation_curve",
    "point_counts",
    "pointing_game",
    "random_map",
    "rankdata",
    "relevance_order",
    "removal_masks",
    "segmentation_counts",
    "segmentation_scores",
    "spearman_correlation",
    "threshold_at_mean",
]


# ----------------------------------------------------------------------------- helpers


def _as_map(heatmap, name: str = "heatmap") -> np.ndarray:
    arr = np.asarray(_to_numpy(heatmap), dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {arr.shape}")
    return arr


def _as_mask(mask, shape: tuple[int, ...] | None = None, name: str = "mask") -> np.ndarray:
    arr = np.asarray(_to_numpy(mask))
    arr = arr.astype(bool) if arr.dtype != bool else arr
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, the map has shape {tuple(shape)}: resize one first")
    return arr


def _to_numpy(x):
    """A torch tensor becomes a numpy array (detached, on the CPU); anything else passes."""
    if _is_torch(x):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return x


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


# ----------------------------------------------------------------------------- segmentation


def average_precision(scores, labels) -> float:
    """Average precision of ``scores`` ranking the positives of ``labels`` first.

    The step-wise definition of scikit-learn's ``average_precision_score`` (no interpolation):
    ``AP = sum_n (R_n - R_(n-1)) * P_n`` over the distinct score thresholds taken in
    decreasing order, with ``R_0 = 0``. Tied scores form one threshold, so a constant score
    gives the fraction of positives. Non-finite scores are dropped with their labels.
    Returns NaN when there is no positive (the reference code turns that into 0 with
    ``np.nan_to_num``; :class:`SegmentationAccumulator` does the same).
    """
    s = np.asarray(_to_numpy(scores), dtype=np.float64).ravel()
    y = np.asarray(_to_numpy(labels)).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y, dtype=np.float64)
    # last index of every run of equal scores = one threshold
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = tp[last]
    predicted = last + 1.0
    precision = tp / predicted
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


#: a map whose finite values span at most this fraction of their largest magnitude is treated
#: as constant (float rounding of an upsampled or accumulated constant, not a signal)
FLAT_RTOL = 1e-6


def is_flat(values) -> bool:
    """Whether finite ``values`` are constant up to float rounding: ``max - min <= FLAT_RTOL *
    max(|values|)`` (exactly equal values included; an empty set counts as flat)."""
    v = np.asarray(_to_numpy(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return True
    lo, hi = v.min(), v.max()
    return bool(hi - lo <= FLAT_RTOL * max(abs(lo), abs(hi)))


def threshold_at_mean(heatmap) -> np.ndarray:
    """Binary prediction of the segmentation protocol: ``map > mean(map)``.

    The mean is taken over finite pixels; non-finite pixels come back False (and the metrics
    below exclude them anyway). Strictly greater, as the reference (``Res.gt(Res.mean())``):
    a constant map predicts background everywhere. The reference min-max normalises first, so
    a constant map is NaN there and predicts background; a map that is constant up to float
    rounding (:func:`is_flat`) does the same here, instead of being split into foreground and
    background by the rounding of its mean.
    """
    m = _as_map(heatmap)
    valid = np.isfinite(m)
    if not valid.any() or is_flat(m[valid]):
        return np.zeros(m.shape, dtype=bool)
    thr = m[valid].mean()
    with np.errstate(invalid="ignore"):
        return valid & (m > thr)


@dataclass(frozen=True)
class SegmentationCounts:
    """Additive per-image counts of the segmentation protocol.

    ``intersection`` and ``union`` are ``(background, foreground)`` pixel counts of the
    mean-thresholded prediction against the mask. ``ap`` is the average precision of the map
    against the foreground mask; ``ap_reference`` is the variant of the reference code (see
    :func:`segmentation_counts`). Both are NaN when undefined.
    """

    correct: int
    labeled: int
    intersection: tuple[int, int]
    union: tuple[int, int]
    ap: float
    ap_reference: float


@dataclass(frozen=True)
class SegmentationScores:
    """Segmentation scores over one image or a dataset (see :class:`SegmentationAccumulator`)."""

    pixel_accuracy: float
    iou_background: float
    iou_foreground: float
    miou: float
    ap: float
    ap_reference: float
    n_images: int


def segmentation_counts(heatmap, mask) -> SegmentationCounts:
    """Counts of the ImageNet-Segmentation protocol for one map and its mask.

    - prediction: :func:`threshold_at_mean` (foreground where ``map > mean``);
    - ``correct`` / ``labeled``: pixels where prediction equals mask / all finite pixels;
    - ``intersection`` / ``union`` for background and foreground;
    - ``ap``: :func:`average_precision` of the raw map against the foreground;
    - ``ap_reference``: what Chefer et al.'s evaluation script computes and reports as
      "mAP": the map is min-max normalised to ``r`` (a constant map becomes all zeros in both
      channels, as its NaNs are zeroed there), the two channels ``1 - r`` (background) and
      ``r`` (foreground) are scored against their one-hot masks, and one AP is taken over the
      pooled ``2 x H x W`` scores. Use it to compare with published numbers.

    Non-finite map pixels are excluded from all counts (the reference never sees them).
    """
    m = _as_map(heatmap)
    gt = _as_mask(mask, m.shape)
    valid = np.isfinite(m)
    pred = threshold_at_mean(m)
    labeled = int(valid.sum())
    correct = int(((pred == gt) & valid).sum())
    inter_fg = int((pred & gt & valid).sum())
    union_fg = int(((pred | gt) & valid).sum())
    inter_bg = int((~pred & ~gt & valid).sum())
    union_bg = int(((~pred | ~gt) & valid).sum())
    scores = m[valid]
    fg = gt[valid]
    ap = average_precision(scores, fg)
    if scores.size:
        r = minmax_normalize(scores)
        bg_score = np.zeros_like(r) if is_flat(scores) else 1.0 - r
        ap_ref = average_precision(np.r_[bg_score, r], np.r_[~fg, fg])
    else:
        ap_ref = float("nan")
    return SegmentationCounts(correct, labeled, (inter_bg, inter_fg), (union_bg, union_fg), ap, ap_ref)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def _scores_from_counts(counts: Sequence[SegmentationCounts]) -> SegmentationScores:
    if not counts:
        nan = float("nan")
        return SegmentationScores(nan, nan, nan, nan, nan, nan, 0)
    correct = sum(c.correct for c in counts)
    labeled = sum(c.labeled for c in counts)
    inter = np.sum([c.intersection for c in counts], axis=0, dtype=np.int64)
    union = np.sum([c.union for c in counts], axis=0, dtype=np.int64)
    iou = [_ratio(inter[k], union[k]) for k in range(2)]
    finite = [v for v in iou if not math.isnan(v)]
    miou = float(np.mean(finite)) if finite else float("nan")
    ap = float(np.mean(np.nan_to_num([c.ap for c in counts], nan=0.0)))
    ap_ref = float(np.mean(np.nan_to_num([c.ap_reference for c in counts], nan=0.0)))
    return SegmentationScores(_ratio(correct, labeled), iou[0], iou[1], miou, ap, ap_ref, len(counts))


def segmentation_scores(heatmap, mask) -> SegmentationScores:
    """Segmentation scores of a single image (a dataset of one; see :class:`SegmentationAccumulator`)."""
    return _scores_from_counts([segmentation_counts(heatmap, mask)])


class SegmentationAccumulator:
    """Dataset-level segmentation scores, aggregated the way the reference script does.

    - pixel accuracy = total correct / total labeled pixels over all images (pixel-weighted);
    - IoU of each class = intersection summed over images / union summed over images; mIoU is
      the mean of the background and foreground IoU (a class whose summed union is 0 is left
      out of the mean instead of scoring 0, which only matters for one-class toy inputs);
    - ``ap`` and ``ap_reference`` = mean over images of the per-image AP, NaN (no foreground)
      counted as 0, as the reference's ``np.nan_to_num``.

    The reference adds ``np.spacing(1)`` to denominators; here an empty denominator gives NaN.
    """

    def __init__(self) -> None:
        self.counts: list[SegmentationCounts] = []

    def add(self, heatmap, mask) -> SegmentationCounts:
        c = segmentation_counts(heatmap, mask)
        self.counts.append(c)
        return c

    def add_counts(self, counts: SegmentationCounts) -> None:
        self.counts.append(counts)

    def __len__(self) -> int:
        return len(self.counts)

    def result(self) -> SegmentationScores:
        return _scores_from_counts(self.counts)


# ----------------------------------------------------------------------------- pointing game


def _near_mask(mask: np.ndarray, y: int, x: int, radius: float) -> bool:
    r = math.floor(radius)
    y0, y1 = max(y - r, 0), min(y + r + 1, mask.shape[0])
    x0, x1 = max(x - r, 0), min(x + r + 1, mask.shape[1])
    yy, xx = np.nonzero(mask[y0:y1, x0:x1])
    if yy.size == 0:
        return False
    d2 = (yy + y0 - y) ** 2 + (xx + x0 - x) ** 2
    return bool((d2 <= radius * radius).any())


def pointing_game(heatmap, mask, *, tolerance: float = 0.0, ties: Literal["first", "any"] = "first") -> bool:
    """Pointing game (Zhang et al. 2018): does the map's maximum fall on the object?

    A hit when the arg-max pixel lies within ``tolerance`` pixels (Euclidean distance between
    pixel indices) of a mask pixel. ``tolerance=0`` asks for the arg-max inside the mask; the
    usual protocol (Zhang et al., TorchRay) uses 15 px at the original image resolution.
    Non-finite pixels are never the maximum.

    Ties: ``"first"`` (default) takes the first maximum in row-major order, like
    ``np.argmax`` in the reference implementations, so a constant map points at the top-left
    pixel; ``"any"`` counts a hit if any of the tied maxima hits (lenient: a constant map then
    hits every non-empty mask).

    Raises ``ValueError`` for an empty mask (the protocol skips such items) or a map with no
    finite pixel.
    """
    m = _as_map(heatmap)
    gt = _as_mask(mask, m.shape)
    if not gt.any():
        raise ValueError("pointing game is undefined for an empty mask: skip this item")
    valid = np.isfinite(m)
    if not valid.any():
        raise ValueError("the map has no finite pixel")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    filled = np.where(valid, m, -np.inf)
    if ties == "first":
        y, x = np.unravel_index(int(np.argmax(filled)), m.shape)
        return _near_mask(gt, int(y), int(x), tolerance)
    if ties == "any":
        peaks = valid & (filled == filled.max())
        return bool((peaks & dilate_disk(gt, tolerance)).any())
    raise ValueError(f"ties must be 'first' or 'any', got {ties!r}")


# ----------------------------------------------------------------------------- p-mIoU


def minmax_normalize(heatmap) -> np.ndarray:
    """``(m - min) / (max - min)`` over finite values; a constant map -- also one constant up
    to float rounding (:func:`is_flat`), whose min-max would be rounding noise -- becomes all
    zeros.

    Non-finite values stay NaN. Works on arrays of any shape.
    """
    m = np.array(_to_numpy(heatmap), dtype=np.float64)
    valid = np.isfinite(m)
    out = np.full(m.shape, np.nan)
    if not valid.any():
        return out
    lo, hi = m[valid].min(), m[valid].max()
    out[valid] = 0.0 if is_flat(m[valid]) else (m[valid] - lo) / (hi - lo)
    return out


@dataclass(frozen=True)
class PointCounts:
    """Confusion counts of one (image, class) map on its labelled points."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def iou(self) -> float:
        """IoU of the positive class on the points: ``tp / (tp + fp + fn)`` (NaN if 0/0)."""
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    def __add__(self, other: PointCounts) -> PointCounts:
        return PointCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def _points_array(points, name: str) -> np.ndarray:
    if points is None:
        return np.zeros((0, 2))
    p = np.asarray(_to_numpy(points), dtype=np.float64)
    if p.size == 0:
        return np.zeros((0, 2))
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"{name} points must be an (N, 2) array of (x, y), got shape {p.shape}")
    return p


def _sample(pred: np.ndarray, valid: np.ndarray, pts: np.ndarray, scale: tuple[float, float]):
    if pts.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    h, w = pred.shape
    cols = np.clip(np.floor(pts[:, 0] * scale[0]).astype(np.int64), 0, w - 1)
    rows = np.clip(np.floor(pts[:, 1] * scale[1]).astype(np.int64), 0, h - 1)
    ok = valid[rows, cols]
    return pred[rows[ok], cols[ok]]


def point_counts(
    heatmap,
    positive,
    negative,
    *,
    threshold: float = 0.5,
    image_size: tuple[int, int] | None = None,
) -> PointCounts:
    """Score one class's map on its OpenImages V7 point labels (the p-mIoU protocol).

    The map is min-max normalised (:func:`minmax_normalize`) and binarised as
    ``normalised > threshold`` (0.5 in LeGrad / GEM); then each positive ("yes") point is a
    true positive or a false negative and each negative ("no") point a false positive or a
    true negative. Unsure points are not passed in. Points are (x, y) pixels of the map,
    or of an image of ``image_size = (width, height)`` whose points are rescaled onto the map.
    Points on non-finite map pixels are skipped.
    """
    m = _as_map(heatmap)
    valid = np.isfinite(m)
    pred = minmax_normalize(m) > threshold
    pred &= valid
    h, w = m.shape
    scale = (1.0, 1.0) if image_size is None else (w / float(image_size[0]), h / float(image_size[1]))
    pos = _sample(pred, valid, _points_array(positive, "positive"), scale)
    neg = _sample(pred, valid, _points_array(negative, "negative"), scale)
    return PointCounts(tp=int(pos.sum()), fp=int(neg.sum()), fn=int((~pos).sum()), tn=int((~neg).sum()))


@dataclass(frozen=True)
class PointIoUScores:
    """p-mIoU over a dataset.

    ``p_miou``: per class, counts summed over every image where the class was scored, IoU of
    the summed counts, then the mean over classes (the class-wise mIoU of the point-label
    evaluation of Benenson & Ferrari 2022, whose OpenImages V7 protocol GEM and LeGrad
    follow). ``p_miou_pairs``: the mean of the per-(image, class) IoUs, reported because
    re-implementations differ; pairs with an undefined IoU (no positive and no false
    positive) are left out of both means. ``per_class`` holds each class's IoU.
    """

    p_miou: float
    p_miou_pairs: float
    per_class: dict[str, float] = field(default_factory=dict)
    n_pairs: int = 0


class PointIoUAccumulator:
    """Accumulates :func:`point_counts` per (image, class) and reduces them to p-mIoU."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, PointCounts]] = []

    def add(self, label: str, heatmap, positive, negative, **kwargs) -> PointCounts:
        c = point_counts(heatmap, positive, negative, **kwargs)
        self.pairs.append((label, c))
        return c

    def add_counts(self, label: str, counts: PointCounts) -> None:
        self.pairs.append((label, counts))

    def __len__(self) -> int:
        return len(self.pairs)

    def result(self) -> PointIoUScores:
        totals: dict[str, PointCounts] = {}
        for label, c in self.pairs:
            totals[label] = totals[label] + c if label in totals else c
        per_class = {k: v.iou for k, v in totals.items()}
        cls = [v for v in per_class.values() if not math.isnan(v)]
        pairs = [c.iou for _, c in self.pairs if not math.isnan(c.iou)]
        return PointIoUScores(
            p_miou=float(np.mean(cls)) if cls else float("nan"),
            p_miou_pairs=float(np.mean(pairs)) if pairs else float("nan"),
            per_class=per_class,
            n_pairs=len(self.pairs),
        )


# ----------------------------------------------------------------------------- perturbation

#: Fractions of patches removed in Chefer et al. 2021's perturbation test: 0%, 10%, ..., 90%.
CHEFER_FRACTIONS: tuple[float, ...] = tuple(k / 10 for k in range(10))


@dataclass(frozen=True)
class PerturbationCurve:
    """A score recorded while patches are removed (or inserted) in relevance order.

    ``fractions[k]`` is ``counts[k] / N``, the fraction of the N patches removed (deletion,
    positive, negative) or inserted (insertion) when ``scores[k]`` was recorded.
    """

    kind: str
    fractions: np.ndarray
    counts: np.ndarray
    scores: np.ndarray
    auc: float


def _as_relevance(relevance) -> np.ndarray:
    r = np.asarray(_to_numpy(relevance), dtype=np.float64)
    if r.size == 0:
        raise ValueError("relevance is empty")
    if not np.isfinite(r).all():
        raise ValueError("relevance has non-finite values: a removal order needs every patch scored")
    return r


def relevance_order(
    relevance, *, most_relevant_first: bool = True, tie_seed: int | None = None
) -> np.ndarray:
    """Flat patch indices in removal order.

    Ties keep index order by default (a stable sort: the lower flat index goes first in both
    directions), so the order is deterministic -- and biased towards the top rows for a map with
    tied values (a constant map removes the image top-down). With ``tie_seed`` each group of
    equal values is ordered at random (a permutation drawn from that seed); averaging curves
    over several seeds (evaluation knob ``ties="random"``) removes the bias.
    """
    r = _as_relevance(relevance).ravel()
    key = -r if most_relevant_first else r
    if tie_seed is None:
        return np.argsort(key, kind="stable")
    jitter = np.random.default_rng(tie_seed).permutation(r.size)
    return np.lexsort((jitter, key))


def removal_masks(
    relevance, counts: Sequence[int], *, most_relevant_first: bool = True, tie_seed: int | None = None
) -> np.ndarray:
    """Boolean masks, shaped like ``relevance`` with a leading step axis; True = removed.

    Step k removes the first ``counts[k]`` patches of :func:`relevance_order`.
    """
    r = _as_relevance(relevance)
    order = relevance_order(r, most_relevant_first=most_relevant_first, tie_seed=tie_seed)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    counts_arr = np.asarray(counts, dtype=np.int64)
    if counts_arr.size and (counts_arr.min() < 0 or counts_arr.max() > r.size):
        raise ValueError(f"counts must lie in [0, {r.size}]")
    masks = rank[None, :] < counts_arr[:, None]
    return masks.reshape((counts_arr.size,) + r.shape)


def area_under_curve(x, y, *, normalize: bool = False) -> float:
    """Trapezoid rule on ``(x, y)``; with ``normalize`` divided by ``x[-1] - x[0]``.

    Unnormalised (Chefer et al.'s convention, and sklearn's ``auc``), a constant curve ``c``
    over fractions 0..0.9 has area ``0.9 c``; normalised it has area ``c``.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError("x and y must be 1-D and of the same length")
    if xa.size < 2:
        return float("nan")
    area = float(np.sum((xa[1:] - xa[:-1]) * (ya[1:] + ya[:-1]) / 2.0))
    if normalize:
        span = xa[-1] - xa[0]
        return area / span if span != 0 else float("nan")
    return area


def _run_curve(kind, r, score_fn, counts, fractions, *, most_relevant_first, invert, normalize, tie_seed=None):
    masks = removal_masks(r, counts, most_relevant_first=most_relevant_first, tie_seed=tie_seed)
    scores = np.empty(len(counts), dtype=np.float64)
    for k, mask in enumerate(masks):
        scores[k] = float(score_fn(~mask if invert else mask.copy()))
    auc = area_under_curve(fractions, scores, normalize=normalize)
    return PerturbationCurve(kind, np.asarray(fractions, dtype=np.float64), np.asarray(counts), scores, auc)


def perturbation_curve(
    relevance,
    score_fn: Callable[[np.ndarray], float],
    *,
    order: Literal["positive", "negative"] = "positive",
    fractions: Sequence[float] = CHEFER_FRACTIONS,
    normalize_auc: bool = False,
    tie_seed: int | None = None,
) -> PerturbationCurve:
    """Chefer et al. 2021's positive / negative perturbation curve over patches.

    ``relevance`` holds one value per patch (any shape, e.g. (Gh, Gw)). At each fraction f,
    ``floor(f * N)`` patches are removed (``int()`` as in the reference): the most relevant
    first for ``"positive"``, the least relevant first for ``"negative"``. ``score_fn`` gets
    the boolean removal mask (shaped like ``relevance``, True = removed; fill those patches,
    e.g. with :func:`apply_patch_removal`, run the model, return the target's score) and
    returns a float. The area is the trapezoid over the fraction axis, unnormalised by
    default (see :func:`area_under_curve`). Lower AUC is better for positive, higher for
    negative.
    """
    if order not in ("positive", "negative"):
        raise ValueError(f"order must be 'positive' or 'negative', got {order!r}")
    r = _as_relevance(relevance)
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or fr.min() < 0 or fr.max() > 1:
        raise ValueError("fractions must be a non-empty sequence in [0, 1]")
    counts = np.floor(fr * r.size + 1e-9).astype(np.int64)
    # the x axis is the requested fractions (as the reference), not the rounded counts / N
    return _run_curve(
        order,
        r,
        score_fn,
        counts,
        fr,
        most_relevant_first=order == "positive",
        invert=False,
        normalize=normalize_auc,
        tie_seed=tie_seed,
    )


#: the fractions of a prompt's content tokens removed by Chefer et al.'s text perturbation test
#: (their VQA script, ``lxmert/perturbation.py``: ``pert_steps``)
TEXT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def token_perturbation_curve(
    relevance,
    score_fn: Callable[[np.ndarray], float],
    *,
    order: Literal["positive", "negative"] = "positive",
    fractions: Sequence[float] = TEXT_FRACTIONS,
) -> PerturbationCurve:
    """Chefer et al. 2021's text perturbation curve: ``relevance`` (n,) over a prompt's content
    tokens (start and end markers excluded: the model keeps them); at each fraction f the
    ``int((1 - f) * n)`` tokens that stay are the least relevant ones for ``"positive"``, the
    most relevant for ``"negative"`` (as the reference keeps its top-k of the negated or plain
    scores), the others removed from the sequence. ``score_fn`` gets the removal mask (True =
    removed) and returns the score; ties are broken by token index. AUC: trapezoid over f."""
    if order not in ("positive", "negative"):
        raise ValueError(f"order must be 'positive' or 'negative', got {order!r}")
    r = _as_relevance(relevance)
    fr = np.asarray(fractions, dtype=np.float64)
    kept = np.floor((1.0 - fr) * r.size + 1e-9).astype(np.int64)
    return _run_curve(
        order, r, score_fn, r.size - kept, fr, most_relevant_first=order == "positive", invert=False, normalize=False
    )


def _step_counts(n: int, n_steps: int | None) -> np.ndarray:
    if n_steps is None:
        n_steps = n
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return np.rint(np.linspace(0, n, n_steps + 1)).astype(np.int64)


def deletion_curve(
    relevance,
    score_fn: Callable[[np.ndarray], float],
    *,
    n_steps: int | None = None,
    tie_seed: int | None = None,
) -> PerturbationCurve:
    """Deletion curve (Petsiuk et al. 2018): remove the most relevant patches first, 0% to 100%.

    ``n_steps`` equal steps (default: one patch per step, N + 1 scores); ``score_fn`` gets the
    removal mask (True = removed). The AUC is the trapezoid over the fraction axis 0..1,
    which equals RISE's ``(sum(y) - y[0]/2 - y[-1]/2) / (len(y) - 1)`` for equal steps.
    Lower is better.
    """
    r = _as_relevance(relevance)
    counts = _step_counts(r.size, n_steps)
    return _run_curve(
        "deletion",
        r,
        score_fn,
        counts,
        counts / r.size,
        most_relevant_first=True,
        invert=False,
        normalize=False,
        tie_seed=tie_seed,
    )


def insertion_curve(
    relevance,
    score_fn: Callable[[np.ndarray], float],
    *,
    n_steps: int | None = None,
    tie_seed: int | None = None,
) -> PerturbationCurve:
    """Insertion curve (Petsiuk et al. 2018): start from everything removed and put the most
    relevant patches back first, 0% to 100% inserted.

    ``score_fn`` gets the removal mask (True = still removed, i.e. not yet inserted). The
    baseline the removed patches show (RISE: a blurred copy) is the caller's choice. AUC as
    in :func:`deletion_curve`; higher is better.
    """
    r = _as_relevance(relevance)
    counts = _step_counts(r.size, n_steps)
    return _run_curve(
        "insertion",
        r,
        score_fn,
        counts,
        counts / r.size,
        most_relevant_first=True,
        invert=True,
        normalize=False,
        tie_seed=tie_seed,
    )


def gaussian_blur(pixels, sigma: float = 5.0, *, truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian blur of a (C, H, W) or (H, W) array, float64 out.

    Kernel radius ``int(truncate * sigma + 0.5)``, weights normalised to sum 1, borders
    mirrored with the edge pixel repeated: the same numbers as
    ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)`` over the
    two spatial axes.
    """
    x = np.asarray(_to_numpy(pixels), dtype=np.float64)
    if sigma <= 0:
        return x.copy()
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()

    def along(a: np.ndarray, axis: int) -> np.ndarray:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (radius, radius)
        p = np.pad(a, pad, mode="symmetric")
        out = np.zeros_like(a)
        n = a.shape[axis]
        lead = (slice(None),) * axis
        for k, wk in enumerate(kernel):
            out += wk * p[lead + (slice(k, k + n),)]
        return out

    return along(along(x, x.ndim - 1), x.ndim - 2)


def apply_patch_removal(
    pixels,
    removed,
    patch_size: int | tuple[int, int],
    mode: Literal["mean", "blur", "zero", "black"] = "mean",
    *,
    blur_sigma: float = 5.0,
    blurred=None,
    black=None,
):
    """Replace the removed patches of an image.

    ``pixels`` is (C, H, W), a numpy array or a torch tensor (returned as the same type,
    dtype and device; integer images are rounded and clipped back). ``removed`` is a
    (Gh, Gw) boolean grid, True = replace; ``patch_size`` is ``ph`` or ``(ph, pw)`` with
    ``Gh * ph == H`` and ``Gw * pw == W``. Modes:

    - ``"mean"``: each channel's mean over the whole original image;
    - ``"blur"``: the same pixels of a Gaussian-blurred copy (:func:`gaussian_blur`, sigma
      ``blur_sigma``); pass ``blurred`` to reuse one copy across the steps of a curve;
    - ``"zero"``: 0 (on normalised inputs, the normalisation mean);
    - ``"black"``: ``black`` (C,), the value of a black pixel in the input's space (on
      normalised inputs ``-mean / std`` per channel: Chefer et al.'s perturbation fill, 0 in
      [0, 1] pixel space).
    """
    torch_in = _is_torch(pixels)
    x = np.asarray(_to_numpy(pixels))
    if x.ndim != 3:
        raise ValueError(f"pixels must be (C, H, W), got shape {x.shape}")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    grid = _as_mask(removed, name="removed")
    if grid.ndim != 2:
        raise ValueError(f"removed must be a (Gh, Gw) grid, got shape {grid.shape}")
    _, h, w = x.shape
    if grid.shape[0] * ph != h or grid.shape[1] * pw != w:
        raise ValueError(
            f"a {grid.shape[0]}x{grid.shape[1]} grid of {ph}x{pw} patches does not tile a {h}x{w} image"
        )
    xf = x.astype(np.float64)
    pix = np.repeat(np.repeat(grid, ph, axis=0), pw, axis=1)
    if mode == "mean":
        fill = np.broadcast_to(xf.mean(axis=(1, 2), keepdims=True), xf.shape)
    elif mode == "blur":
        fill = (
            gaussian_blur(xf, blur_sigma)
            if blurred is None
            else np.asarray(_to_numpy(blurred), dtype=np.float64)
        )
        if fill.shape != xf.shape:
            raise ValueError(f"blurred has shape {fill.shape}, pixels {xf.shape}")
    elif mode == "zero":
        fill = np.zeros_like(xf)
    elif mode == "black":
        if black is None:
            raise ValueError("mode 'black' needs black= (the value of a black pixel per channel)")
        fill = np.broadcast_to(np.asarray(black, dtype=np.float64).reshape(-1, 1, 1), xf.shape)
    else:
        raise ValueError(f"mode must be 'mean', 'blur', 'zero' or 'black', got {mode!r}")
    out = np.where(pix[None], fill, xf)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(x.dtype)
    if torch_in:
        import torch

        return torch.from_numpy(np.ascontiguousarray(out)).to(device=pixels.device, dtype=pixels.dtype)
    return out


# ----------------------------------------------------------------------------- sanity checks


def rankdata(values) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(_to_numpy(values), dtype=np.float64).ravel()
    n = x.size
    ranks = np.empty(n, dtype=np.float64)
    if n == 0:
        return ranks
    sorter = np.argsort(x, kind="stable")
    xs = x[sorter]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.nonzero(new_group)[0]
    ends = np.r_[starts[1:], n]
    average = (starts + ends - 1) / 2.0 + 1.0
    ranks[sorter] = average[np.cumsum(new_group) - 1]
    return ranks


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(_to_numpy(a), dtype=np.float64)
    y = np.asarray(_to_numpy(b), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"maps differ in shape: {x.shape} vs {y.shape}")
    x, y = x.ravel(), y.ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    return float(np.dot(dx, dy) / den) if den > 0 else float("nan")


def pearson_correlation(a, b) -> float:
    """Pearson correlation of two maps of the same shape over pixels finite in both.

    NaN for fewer than two pixels or a constant map.
    """
    return _pearson(*_paired(a, b))


def spearman_correlation(a, b, *, absolute: bool = False) -> float:
    """Spearman rank correlation of two maps, the similarity of Adebayo et al.'s sanity checks.

    Pearson correlation of the average ranks (:func:`rankdata`) over pixels finite in both
    maps. ``absolute=True`` ranks ``|a|`` and ``|b|`` (Adebayo et al. report both, as the sign
    of some methods is arbitrary). NaN when undefined (constant map, fewer than two pixels).
    """
    x, y = _paired(a, b)
    if absolute:
        x, y = np.abs(x), np.abs(y)
    return _pearson(rankdata(x), rankdata(y))


# ----------------------------------------------------------------------------- baselines


def random_map(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) noise of ``shape``, reproducible from ``seed`` (numpy's default generator)."""
    return np.random.default_rng(seed).random(tuple(shape), dtype=np.float64)


def centre_prior(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """A Gaussian centred on the image, 1 at the centre.

    Centre at ``((H - 1) / 2, (W - 1) / 2)``; standard deviation ``sigma * H`` vertically
    and ``sigma * W`` horizontally. A map that beats it says more than "objects sit in the
    middle".
    """
    h, w = (int(s) for s in shape)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    y = (np.arange(h, dtype=np.float64) - (h - 1) / 2.0) / (sigma * h)
    x = (np.arange(w, dtype=np.float64) - (w - 1) / 2.0) / (sigma * w)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


def oracle_map(mask) -> np.ndarray:
    """The mask itself as a float64 map: the ceiling every segmentation metric should reach."""
    return _as_mask(mask).astype(np.float64)
