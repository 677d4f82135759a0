"""Metrics on analytic fixtures: maps whose scores are known by hand or in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliplens.eval import metrics as M
from cliplens.masks import dilate_disk


def _mask() -> np.ndarray:
    """An 8 x 10 mask with a 3 x 4 object (12 of 80 pixels), not square on purpose."""
    m = np.zeros((8, 10), dtype=bool)
    m[2:5, 3:7] = True
    return m


# ----------------------------------------------------------------------------- average precision


def test_ap_hand_computed():
    # thresholds 0.9: P=1 R=.5 ; 0.8: R unchanged ; 0.7: P=2/3 R=1  -> .5*1 + .5*2/3
    assert M.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)


def test_ap_ties_form_one_threshold():
    # 0.9: P=1 R=.5 ; the tied 0.5s enter together: P=2/3 R=1
    assert M.average_precision([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a constant score is one threshold: AP = fraction of positives
    assert M.average_precision(np.full(8, 3.0), [1, 0, 0, 1, 0, 0, 0, 0]) == pytest.approx(0.25)


def test_ap_matches_mean_precision_at_positives_without_ties():
    # independent oracle: without ties AP is the mean, over positives, of the precision at their rank
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.permutation(50).astype(float)
        y = rng.random(50) < 0.3
        if not y.any():
            continue
        ranked = y[np.argsort(-s)]
        prec = np.cumsum(ranked) / np.arange(1, 51)
        assert M.average_precision(s, y) == pytest.approx(prec[ranked].mean())


def test_ap_undefined_without_positives_and_drops_nan():
    assert math.isnan(M.average_precision([0.3, 0.2], [0, 0]))
    assert M.average_precision([np.nan, 0.9, 0.1], [0, 1, 0]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- segmentation


def test_oracle_map_scores_perfectly():
    mask = _mask()
    s = M.segmentation_scores(M.oracle_map(mask), mask)
    assert (s.pixel_accuracy, s.iou_background, s.iou_foreground, s.miou) == (1.0, 1.0, 1.0, 1.0)
    assert s.ap == pytest.approx(1.0) and s.ap_reference == pytest.approx(1.0)


def test_inverse_map_scores_zero():
    mask = _mask()
    s = M.segmentation_scores(1.0 - mask, mask)
    assert (s.pixel_accuracy, s.iou_background, s.iou_foreground, s.miou) == (0.0, 0.0, 0.0, 0.0)
    # every positive ranked last: AP falls to its floor, the positive fraction
    assert s.ap == pytest.approx(12 / 80)
    # reference AP: the 80 + 80 pooled scores put all negatives (score 1) above all positives (0)
    assert s.ap_reference == pytest.approx(0.5)


def test_constant_map_predicts_background():
    mask = _mask()
    s = M.segmentation_scores(np.full(mask.shape, 0.7), mask)
    assert s.pixel_accuracy == pytest.approx(68 / 80)
    assert s.iou_background == pytest.approx(68 / 80)
    assert s.iou_foreground == 0.0
    assert s.miou == pytest.approx(68 / 160)
    assert s.ap == pytest.approx(12 / 80)
    assert s.ap_reference == pytest.approx(0.5)  # both channels zeroed, as the reference's NaN -> 0


def test_threshold_is_strictly_above_the_mean():
    m = np.array([[0.0, 1.0, 2.0]])
    assert M.threshold_at_mean(m).tolist() == [[False, False, True]]


def test_segmentation_is_invariant_to_positive_affine_maps():
    rng = np.random.default_rng(1)
    mask = _mask()
    m = rng.random(mask.shape) + mask
    a = M.segmentation_counts(m, mask)
    b = M.segmentation_counts(3.0 * m - 7.0, mask)
    assert a == b


def test_nan_pixels_are_excluded():
    mask = _mask()
    m = mask.astype(float)
    m[:, :2] = 1.0  # wrong on these two columns ...
    m[:, :2] = np.nan  # ... but the model never saw them
    c = M.segmentation_counts(m, mask)
    assert c.labeled == 80 - 16 and c.correct == 64
    s = M.segmentation_scores(m, mask)
    assert s.miou == 1.0 and s.ap == pytest.approx(1.0)


def test_hand_computed_small_case():
    mask = np.array([[1, 1, 0, 0]], dtype=bool)
    m = np.array([[0.9, 0.2, 0.6, 0.1]])  # mean 0.45 -> pred [1, 0, 1, 0]
    c = M.segmentation_counts(m, mask)
    assert (c.correct, c.labeled) == (2, 4)
    assert c.intersection == (1, 1) and c.union == (3, 3)
    # AP: 0.9 (+) P=1 R=.5 ; 0.6 (-) ; 0.2 (+) P=2/3 R=1
    assert c.ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_accumulator_aggregates_like_the_reference():
    acc = M.SegmentationAccumulator()
    # image 1 (4 px): correct 2, inter (1, 1), union (3, 3)
    acc.add(np.array([[0.9, 0.2, 0.6, 0.1]]), np.array([[1, 1, 0, 0]]))
    # image 2 (2 x 4 = 8 px): perfect
    m2 = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    acc.add(m2, m2 > 0)
    # image 3: no foreground -> its AP is NaN and counts as 0 in the mean
    acc.add(np.array([[0.1, 0.2]]), np.array([[0, 0]]))
    r = acc.result()
    assert r.n_images == 3 and len(acc) == 3
    # pixel-weighted: (2 + 8 + 1) / (4 + 8 + 2), not the mean of per-image accuracies
    assert r.pixel_accuracy == pytest.approx(11 / 14)
    # image 3: mean .15 -> pred [0, 1]; bg inter 1 union 2, fg inter 0 union 1
    assert r.iou_background == pytest.approx((1 + 6 + 1) / (3 + 6 + 2))
    assert r.iou_foreground == pytest.approx((1 + 2 + 0) / (3 + 2 + 1))
    assert r.miou == pytest.approx((r.iou_background + r.iou_foreground) / 2)
    assert r.ap == pytest.approx((5 / 6 + 1.0 + 0.0) / 3)


def test_empty_accumulator_and_shape_mismatch():
    assert M.SegmentationAccumulator().result().n_images == 0
    with pytest.raises(ValueError, match="shape"):
        M.segmentation_counts(np.zeros((4, 4)), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="2-D"):
        M.segmentation_counts(np.zeros((1, 4, 4)), np.zeros((4, 4), bool))


# ----------------------------------------------------------------------------- pointing game


def test_pointing_game_hit_and_miss():
    mask = _mask()
    m = np.zeros(mask.shape)
    m[3, 4] = 1.0
    assert M.pointing_game(m, mask)
    m = np.zeros(mask.shape)
    m[7, 9] = 1.0
    assert not M.pointing_game(m, mask)


def test_pointing_game_tolerance_is_euclidean():
    mask = _mask()  # rows 2..4, cols 3..6
    m = np.zeros(mask.shape)
    m[7, 1] = 1.0  # nearest mask pixel (4, 3): distance sqrt(9 + 4) = 3.606
    assert not M.pointing_game(m, mask, tolerance=3.5)
    assert M.pointing_game(m, mask, tolerance=3.7)
    m = np.zeros(mask.shape)
    m[2, 9] = 1.0  # 3 columns right of (2, 6)
    assert not M.pointing_game(m, mask, tolerance=2)
    assert M.pointing_game(m, mask, tolerance=3)


def test_pointing_game_ties():
    mask = _mask()
    flat = np.ones(mask.shape)
    assert not M.pointing_game(flat, mask)  # first maximum = top-left pixel
    assert M.pointing_game(flat, mask, ties="any")
    m = np.zeros(mask.shape)
    m[0, 0] = m[7, 9] = 1.0  # two maxima, both far ...
    m[5, 8] = 1.0  # ... and one at distance sqrt(1 + 4) of (4, 6)
    assert not M.pointing_game(m, mask, tolerance=2, ties="any")
    assert M.pointing_game(m, mask, tolerance=2.3, ties="any")
    assert not M.pointing_game(m, mask, tolerance=2.3, ties="first")


def test_pointing_game_ignores_nan_and_rejects_empty_mask():
    mask = _mask()
    m = np.zeros(mask.shape)
    m[0, 0] = np.nan
    m[3, 3] = 0.5
    assert M.pointing_game(m, mask)
    with pytest.raises(ValueError, match="empty mask"):
        M.pointing_game(m, np.zeros_like(mask))
    with pytest.raises(ValueError, match="finite"):
        M.pointing_game(np.full(mask.shape, np.nan), mask)


def test_disk_dilation_matches_brute_force():
    rng = np.random.default_rng(3)
    corner = np.zeros((20, 17), bool)  # a blob at an edge: the dilation's box gets clipped
    corner[0:3, 13:17] = rng.random((3, 4)) < 0.6
    middle = np.zeros((20, 17), bool)  # a lone pixel far from every edge
    middle[9, 7] = True
    for mask in (rng.random((12, 15)) < 0.05, corner, middle, np.zeros((5, 6), bool)):
        ys, xs = np.nonzero(mask)
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
        for radius in (0, 1, 1.5, 3, 4.2):
            got = dilate_disk(mask, radius)
            d2 = (yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2
            want = (d2 <= radius * radius).any(-1)
            assert np.array_equal(got, want), (mask.shape, radius)


# ----------------------------------------------------------------------------- p-mIoU


def _blob() -> np.ndarray:
    yy, xx = np.mgrid[:20, :30]
    return np.exp(-((yy - 10) ** 2 + (xx - 8) ** 2) / 20.0)


POS = np.array([[8.2, 10.5], [9.0, 9.9], [7.5, 11.2]])  # (x, y) near the peak at x=8, y=10
NEG = np.array([[25.0, 3.0], [28.9, 18.0]])


def test_point_counts_perfect_inverse_and_constant():
    c = M.point_counts(_blob(), POS, NEG)
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 0, 0, 2) and c.iou == 1.0
    c = M.point_counts(-_blob(), POS, NEG)
    assert (c.tp, c.fp, c.fn, c.tn) == (0, 2, 3, 0) and c.iou == 0.0
    c = M.point_counts(np.full((20, 30), 4.0), POS, NEG)  # min-max of a constant: all zero
    assert (c.tp, c.fp, c.fn, c.tn) == (0, 0, 3, 2) and c.iou == 0.0


def test_point_counts_minmax_invariance_threshold_and_scaling():
    assert M.point_counts(_blob(), POS, NEG) == M.point_counts(5 * _blob() + 3, POS, NEG)
    m = np.array([[0.0, 0.5, 1.0]])
    c = M.point_counts(m, [[1.5, 0.5], [2.2, 0.1]], [])
    assert (c.tp, c.fn) == (1, 1)  # exactly 0.5 is not above the threshold
    # points given on a 2x larger image land on the same map pixels
    c2 = M.point_counts(_blob(), POS * 2, NEG * 2, image_size=(60, 40))
    assert c2 == M.point_counts(_blob(), POS, NEG)


def test_point_counts_skip_nan_pixels():
    m = _blob()
    m[10, 8] = np.nan
    c = M.point_counts(m, POS, NEG)  # (8.2, 10.5) lands on the NaN pixel
    assert (c.tp, c.fn, c.tn) == (2, 0, 2)


def test_point_iou_accumulator_hand_computed():
    acc = M.PointIoUAccumulator()
    acc.add_counts("cat", M.PointCounts(tp=1, fp=0, fn=1, tn=3))  # pair IoU 1/2
    acc.add_counts("cat", M.PointCounts(tp=2, fp=1, fn=0, tn=0))  # pair IoU 2/3
    acc.add_counts("dog", M.PointCounts(tp=0, fp=1, fn=0, tn=5))  # pair IoU 0
    acc.add_counts("sky", M.PointCounts(tp=0, fp=0, fn=0, tn=4))  # undefined: left out
    r = acc.result()
    assert r.per_class["cat"] == pytest.approx(3 / 5)  # counts summed first
    assert r.per_class["dog"] == 0.0 and math.isnan(r.per_class["sky"])
    assert r.p_miou == pytest.approx((3 / 5 + 0) / 2)
    assert r.p_miou_pairs == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert r.n_pairs == 4
    acc2 = M.PointIoUAccumulator()
    assert acc2.add("cat", _blob(), POS, NEG).iou == 1.0


# ----------------------------------------------------------------------------- perturbation


def test_chefer_fractions():
    assert M.CHEFER_FRACTIONS == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def test_relevance_order_and_removal_masks():
    r = np.array([[0.5, 2.0], [0.5, 1.0]])
    assert M.relevance_order(r).tolist() == [1, 3, 0, 2]  # tie 0.5: lower index first
    assert M.relevance_order(r, most_relevant_first=False).tolist() == [0, 2, 3, 1]
    masks = M.removal_masks(r, [0, 1, 3])
    assert masks.shape == (3, 2, 2)
    assert masks[0].sum() == 0
    assert masks[1].tolist() == [[False, True], [False, False]]
    assert masks[2].tolist() == [[True, True], [False, True]]
    with pytest.raises(ValueError):
        M.removal_masks(r, [5])
    with pytest.raises(ValueError, match="non-finite"):
        M.relevance_order([1.0, np.nan])


def _kept_relevance_score(r):
    """score = summed relevance of the patches still shown."""
    return lambda removed: float(r[~removed].sum())


def test_perturbation_curves_closed_form():
    # N = 10 patches of relevance 0..9 on a 2 x 5 grid; at fraction f, k = 10 f are removed
    r = np.arange(10, dtype=float).reshape(2, 5)
    pos = M.perturbation_curve(r, _kept_relevance_score(r), order="positive")
    # removing the top k leaves sum(0 .. 9-k) = (10-k)(9-k)/2
    assert pos.scores.tolist() == [45, 36, 28, 21, 15, 10, 6, 3, 1, 0]
    assert pos.counts.tolist() == list(range(10))
    assert pos.auc == pytest.approx(0.1 * (165 - (45 + 0) / 2))  # 14.25
    neg = M.perturbation_curve(r, _kept_relevance_score(r), order="negative")
    # removing the bottom k leaves 45 - k(k-1)/2
    assert neg.scores.tolist() == [45, 45, 44, 42, 39, 35, 30, 24, 17, 9]
    assert neg.auc == pytest.approx(0.1 * (330 - (45 + 9) / 2))  # 30.3
    assert pos.auc < neg.auc


def test_perturbation_curve_linear_score_and_normalisation():
    r = np.random.default_rng(0).random((10, 10))
    frac_kept = lambda removed: 1.0 - removed.mean()
    c = M.perturbation_curve(r, frac_kept)
    assert c.scores == pytest.approx(1.0 - np.asarray(M.CHEFER_FRACTIONS))
    assert c.auc == pytest.approx(0.9 - 0.9**2 / 2)  # integral of 1 - f over [0, 0.9]
    const = M.perturbation_curve(r, lambda removed: 0.8, normalize_auc=True)
    assert const.auc == pytest.approx(0.8)
    assert M.perturbation_curve(r, lambda removed: 0.8).auc == pytest.approx(0.72)


def test_deletion_and_insertion_curves():
    r = np.array([[4.0, 3.0], [2.0, 1.0]])
    seen = []

    def score(removed):
        seen.append(removed.copy())
        removed[:] = True  # mutating the argument must not leak into later steps
        return 0.0

    M.deletion_curve(r, score)
    assert [s.sum() for s in seen] == [0, 1, 2, 3, 4] and seen[1].tolist() == [[True, False], [False, False]]
    seen.clear()
    M.insertion_curve(r, score)
    assert [s.sum() for s in seen] == [4, 3, 2, 1, 0] and seen[1].tolist() == [[False, True], [True, True]]

    d = M.deletion_curve(r, _kept_relevance_score(r))
    assert d.scores.tolist() == [10, 6, 3, 1, 0]
    assert d.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    # RISE: (sum - first/2 - last/2) / (n - 1)
    assert d.auc == pytest.approx((20 - 5 - 0) / 4)
    ins = M.insertion_curve(r, _kept_relevance_score(r))
    assert ins.scores.tolist() == [0, 4, 7, 9, 10]
    assert ins.auc == pytest.approx((30 - 0 - 5) / 4)


def test_deletion_steps():
    r = np.arange(5.0)
    d = M.deletion_curve(r, lambda removed: removed.sum(), n_steps=2)
    assert d.counts.tolist() == [0, 2, 5]  # rint(2.5) = 2
    assert d.fractions.tolist() == [0, 0.4, 1.0]
    with pytest.raises(ValueError):
        M.deletion_curve(r, lambda removed: 0.0, n_steps=0)


def test_area_under_curve():
    assert M.area_under_curve([0, 1, 3], [1, 1, 2]) == pytest.approx(1 + 3)
    assert M.area_under_curve([0, 1, 3], [1, 1, 2], normalize=True) == pytest.approx(4 / 3)
    assert math.isnan(M.area_under_curve([0], [1]))


# ----------------------------------------------------------------------------- patch removal


def _image() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.random((3, 8, 12))  # a 2 x 3 grid of 4 x 4 patches


REMOVED = np.array([[True, False, False], [False, False, True]])


def test_patch_removal_zero_and_mean():
    x = _image()
    z = M.apply_patch_removal(x, REMOVED, 4, "zero")
    assert (z[:, :4, :4] == 0).all() and (z[:, 4:, 8:] == 0).all()
    assert np.array_equal(z[:, :4, 4:], x[:, :4, 4:]) and np.array_equal(z[:, 4:, :8], x[:, 4:, :8])
    m = M.apply_patch_removal(x, REMOVED, (4, 4), "mean")
    means = x.mean(axis=(1, 2))
    assert np.allclose(m[:, :4, :4], means[:, None, None]) and np.allclose(m[:, 4:, 8:], means[:, None, None])
    assert np.array_equal(m[:, :4, 4:], x[:, :4, 4:])
    assert m.dtype == x.dtype
    assert np.array_equal(x, _image())  # input untouched


def test_patch_removal_blur():
    x = _image()
    b = M.apply_patch_removal(x, REMOVED, 4, "blur", blur_sigma=1.5)
    blurred = M.gaussian_blur(x, 1.5)
    assert np.allclose(b[:, :4, :4], blurred[:, :4, :4])
    assert np.array_equal(b[:, :4, 4:], x[:, :4, 4:])
    again = M.apply_patch_removal(x, REMOVED, 4, "blur", blurred=blurred)
    assert np.array_equal(again, b)
    const = np.full((3, 8, 12), 0.25)
    assert np.allclose(M.gaussian_blur(const, 2.0), 0.25)


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _image()
    for sigma in (0.7, 1.5, 5.0):
        want = np.stack([ndimage.gaussian_filter(c, sigma, mode="reflect", truncate=4.0) for c in x])
        assert np.allclose(M.gaussian_blur(x, sigma), want, atol=1e-12)


def test_patch_removal_types_and_errors():
    u8 = (np.arange(3 * 8 * 12) % 256).astype(np.uint8).reshape(3, 8, 12)
    out = M.apply_patch_removal(u8, REMOVED, 4, "mean")
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == np.rint(u8[0].astype(float).mean())
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(_image()).float()
    tz = M.apply_patch_removal(t, torch.from_numpy(REMOVED), 4, "zero")
    assert isinstance(tz, torch.Tensor) and tz.dtype == torch.float32
    assert float(tz[:, :4, :4].abs().sum()) == 0.0 and torch.equal(tz[:, :4, 4:], t[:, :4, 4:])
    bf = M.apply_patch_removal(t.to(torch.bfloat16), REMOVED, 4, "mean")
    assert bf.dtype == torch.bfloat16 and bf.shape == t.shape
    with pytest.raises(ValueError, match="tile"):
        M.apply_patch_removal(_image(), REMOVED, 3, "zero")
    with pytest.raises(ValueError, match="mode"):
        M.apply_patch_removal(_image(), REMOVED, 4, "noise")


# ----------------------------------------------------------------------------- correlations


def test_rankdata_average_ties():
    assert M.rankdata([3, 1, 4, 1, 5]).tolist() == [3.0, 1.5, 4.0, 1.5, 5.0]
    assert M.rankdata([2, 2, 2]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_hand_computed_with_ties():
    # ranks of b = [1, 2, 3.5, 5, 3.5]; deviations (-2,-1,0,1,2) . (-2,-1,.5,2,.5) = 8
    rho = M.spearman_correlation([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert rho == pytest.approx(8 / math.sqrt(10 * 9.5))


def test_spearman_properties():
    rng = np.random.default_rng(2)
    a = rng.random((6, 7))
    assert M.spearman_correlation(a, np.exp(3 * a)) == pytest.approx(1.0)
    assert M.spearman_correlation(a, -a) == pytest.approx(-1.0)
    assert M.spearman_correlation(a, -a, absolute=True) == pytest.approx(1.0)
    assert math.isnan(M.spearman_correlation(a, np.ones_like(a)))
    b = a.copy()
    b[0, 0] = np.nan
    b[1, 1] = 100.0
    c = a.copy()
    c[1, 1] = 100.0
    assert M.spearman_correlation(a, b) == pytest.approx(M.spearman_correlation(a.ravel()[1:], c.ravel()[1:]))
    with pytest.raises(ValueError):
        M.spearman_correlation(a, a.T)


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    a = rng.integers(0, 5, 60).astype(float)  # many ties
    b = a + rng.integers(0, 3, 60)
    assert np.array_equal(M.rankdata(a), stats.rankdata(a))
    assert M.spearman_correlation(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert M.pearson_correlation(a, b) == pytest.approx(stats.pearsonr(a, b).statistic)


# ----------------------------------------------------------------------------- baselines


def test_baselines():
    r1, r2 = M.random_map((5, 6), seed=1), M.random_map((5, 6), seed=1)
    assert np.array_equal(r1, r2) and not np.array_equal(r1, M.random_map((5, 6), seed=2))
    assert r1.shape == (5, 6) and r1.dtype == np.float64 and (0 <= r1).all() and (r1 < 1).all()
    c = M.centre_prior((7, 9))
    assert c.shape == (7, 9) and c[3, 4] == pytest.approx(1.0) and c.argmax() == 3 * 9 + 4
    assert np.allclose(c, c[::-1, ::-1])
    assert c[3, 0] == pytest.approx(np.exp(-0.5 * (4 / (0.25 * 9)) ** 2))
    mask = _mask()
    o = M.oracle_map(mask)
    assert o.dtype == np.float64 and np.array_equal(o, mask.astype(float))
    # the centre prior sits on this central object: it points right, but segments imperfectly
    assert M.pointing_game(M.centre_prior(mask.shape, 0.1), mask)


# ---- issue 20: near-constant maps, ignore pixels ------------------------------------------------


@pytest.mark.parametrize("value", [0.1, 3.0, -7.25, 1e-30])
def test_near_constant_map_is_treated_as_constant(value):
    """A constant map upsampled or accumulated in floating point differs from itself by a few
    ulps; its mean must not split it into foreground and background (the reference's min-max
    makes such a map NaN -> background everywhere)."""
    rng = np.random.default_rng(0)
    m = np.full((16, 16), value) * (1.0 + rng.integers(-3, 4, size=(16, 16)) * np.finfo(float).eps)
    assert np.ptp(m) > 0  # really not constant in floating point
    assert not M.threshold_at_mean(m).any()
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    c = M.segmentation_counts(m, mask)
    assert c.intersection[1] == 0 and c.correct == int((~mask).sum())
    assert np.all(M.minmax_normalize(m) == 0.0)
    assert M.point_counts(m, [(5, 5)], [(0, 0)]).tp == 0
    # a real map with a large offset is not flat
    real = np.full((4, 4), 1000.0)
    real[0, 0] += 0.01
    assert not M.is_flat(real) and M.threshold_at_mean(real)[0, 0]
    assert M.is_flat(np.zeros((3, 3))) and M.is_flat(np.full((2, 2), np.nan))
