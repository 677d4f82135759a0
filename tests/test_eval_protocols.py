"""The named evaluation protocols (issue 20), each against a small reimplementation of the
reference's formula on fixtures: Chefer et al.'s ImageNet-Segmentation script (image and mask
squashed to the model input, map upsampled bilinearly, threshold at the mean of the min-max map,
"mAP" = AP of the two-channel score), TextSpan's clip at 0, TorchRay's class-mean pointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplens.errors import InputError
from cliplens.eval.config import EvalConfig
from cliplens.eval.datasets.base import EvalItem
from cliplens.eval.runner import localisation_scores, squashed_item
from cliplens.eval.summary import summarise
from test_eval_harness import adapter  # noqa: F401  (the tiny CLIP fixture)


def reference_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """sklearn's average_precision_score, by its definition: over the distinct thresholds t
    (descending), sum (recall(t) - recall(previous t)) * precision(t)."""
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = float((pred & labels).sum())
        recall = tp / labels.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return ap


def upsample(grid: np.ndarray, patch: int) -> np.ndarray:
    """The script's ``F.interpolate(scale_factor=16, mode="bilinear")``."""
    res = torch.from_numpy(grid)[None, None]
    return F.interpolate(res, scale_factor=patch, mode="bilinear", align_corners=False)[0, 0].numpy()


def chefer_reference(res: np.ndarray, mask: np.ndarray, clip_at_zero: bool = False):
    """imagenet_seg_eval.py on one squashed image's upsampled map: (correct, labeled, inter (bg,
    fg), union (bg, fg), two-channel AP)."""
    if clip_at_zero:
        res = np.maximum(res, 0)
    res = (res - res.min()) / (res.max() - res.min())
    fg = res > res.mean()
    correct = int((fg == mask).sum())
    inter = (int((~fg & ~mask).sum()), int((fg & mask).sum()))
    union = (int((~fg | ~mask).sum()), int((fg | mask).sum()))
    scores = np.concatenate([1 - res.ravel(), res.ravel()])
    labels = np.concatenate([~mask.ravel(), mask.ravel()])
    return correct, mask.size, inter, union, reference_ap(scores, labels)


def _item(size=(48, 40)) -> EvalItem:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    mask = np.zeros((size[1], size[0]), bool)
    mask[10:30, 20:44] = True
    return EvalItem(id="x", image=image, masks={"obj": mask}, points=None, labels=["obj"], extra={})


@pytest.mark.parametrize("protocol", ["chefer", "textspan"])
def test_squashed_segmentation_is_the_reference_script(adapter, protocol):  # noqa: F811
    item = _item()
    w_in, h_in = adapter.prepare_images([item.image])[0].pixel_values.shape[-1:-3:-1]
    sq = squashed_item(item, (int(w_in), int(h_in)))
    assert sq.image.size == (w_in, h_in) and sq.masks["obj"].shape == (h_in, w_in)
    # the mask squashed by nearest neighbour, as the script's Resize((224, 224), NEAREST)
    want_mask = np.asarray(
        Image.fromarray(item.masks["obj"].astype(np.uint8) * 255).resize((w_in, h_in), Image.NEAREST)
    ) > 127
    assert np.array_equal(sq.masks["obj"], want_mask)
    group = adapter.prepare_images([sq.image], resize="model")[0]
    geom = group.geometries[0]
    patch = adapter.patch_size[0]
    grid = np.random.default_rng(1).normal(size=(1, h_in // patch, w_in // patch))
    config = EvalConfig(methods="chefer", metrics="segmentation", segmentation_protocol=protocol)
    got = localisation_scores(config, {"m": grid}, ["obj"], sq.masks, {}, geom)[("m", 0)]["seg"]
    # the map on the squashed image is the script's bilinear upsampling (to float rounding)
    ours = geom.grid_to_original(grid[0])
    np.testing.assert_allclose(ours, upsample(grid[0], patch), rtol=0, atol=1e-12)
    correct, labeled, inter, union, _ = chefer_reference(
        upsample(grid[0], patch), sq.masks["obj"], clip_at_zero=protocol == "textspan"
    )
    assert got[:6] == [correct, labeled, *inter, *union]
    # the two-channel AP: ties of an upsampled map depend on float rounding, so the formula is
    # compared on the same upsampled values
    *_, ap2 = chefer_reference(ours, sq.masks["obj"], clip_at_zero=protocol == "textspan")
    assert got[7] == pytest.approx(ap2, abs=1e-12)


def test_protocol_knob_is_checked_and_stored():
    assert EvalConfig(dataset="x").segmentation_protocol == "cliplens"
    assert EvalConfig(dataset="x", segmentation_protocol="chefer").to_dict()["segmentation_protocol"] == "chefer"
    with pytest.raises(InputError, match="segmentation_protocol"):
        EvalConfig(dataset="x", segmentation_protocol="224")


def test_pointing_is_reported_over_pairs_and_over_classes():
    """TorchRay's pointing accuracy is the mean over classes of each class's accuracy."""
    hits = [("a", 1), ("a", 1), ("a", 1), ("a", 0), ("b", 0)]
    records = [
        {"index": i, "id": str(i), "pairs": [{"label": lab, "scores": {"chefer": {"pointing": h}}}]}
        for i, (lab, h) in enumerate(hits)
    ]
    config = EvalConfig(methods="chefer", dataset="x", metrics="pointing")
    row = summarise(config, records).rows[0]
    assert row["pointing"] == pytest.approx(3 / 5)
    assert row["pointing_class_mean"] == pytest.approx((0.75 + 0.0) / 2)


def test_map_is_the_two_channel_ap_and_fg_ap_the_foreground_one():
    """Never one name for two quantities: 'map' = the literature's two-channel AP, 'fg_ap' = the
    AP of the raw map against the foreground."""
    from cliplens.eval.metrics import segmentation_counts

    grid = np.random.default_rng(5).normal(size=(8, 8))
    mask = np.zeros((8, 8), bool)
    mask[2:6, 3:7] = True
    c = segmentation_counts(grid, mask)
    records = [
        {
            "index": 0,
            "id": "0",
            "pairs": [
                {
                    "label": "a",
                    "scores": {
                        "chefer": {
                            "seg": [c.correct, c.labeled, *c.intersection, *c.union, c.ap, c.ap_reference]
                        }
                    },
                }
            ],
        }
    ]
    row = summarise(EvalConfig(methods="chefer", dataset="x", metrics="segmentation"), records).rows[0]
    r = (grid - grid.min()) / (grid.max() - grid.min())
    two = reference_ap(np.r_[1 - r.ravel(), r.ravel()], np.r_[~mask.ravel(), mask.ravel()])
    assert row["map"] == pytest.approx(two, abs=1e-12)
    assert row["fg_ap"] == pytest.approx(reference_ap(grid.ravel(), mask.ravel()), abs=1e-12)
    assert "map_reference" not in row


def test_an_evaluation_runs_under_the_squashed_protocol(adapter, tmp_path):  # noqa: F811
    from cliplens.eval import harness
    from cliplens.worlds.shapes import write_dataset

    data = write_dataset(tmp_path / "shapes", 2, seed=11, size=48)
    rows = {}
    for protocol in ("cliplens", "chefer"):
        res = harness.evaluate(
            adapter, ["chefer"], f"shapes:{data}", metrics="segmentation,pointing", segmentation_protocol=protocol
        )
        rows[protocol] = {r["source"]: r for r in res.rows}
        assert rows[protocol]["oracle"]["miou"] == pytest.approx(1.0)
    assert res.config["segmentation_protocol"] == "chefer"


# ---- ties in removal orders ----------------------------------------------------------------------


def test_random_ties_shuffle_only_within_tied_groups():
    from cliplens.eval.metrics import relevance_order

    r = np.array([3.0, 1.0, 1.0, 1.0, 2.0, 1.0])
    assert relevance_order(r).tolist() == [0, 4, 1, 2, 3, 5]  # index order (former behaviour)
    seen = set()
    for seed in range(20):
        o = relevance_order(r, tie_seed=seed)
        assert o[:2].tolist() == [0, 4] and sorted(o[2:].tolist()) == [1, 2, 3, 5]
        # a small reimplementation: sort by (-value, a random rank drawn from the same seed)
        jitter = np.random.default_rng(seed).permutation(r.size)
        want = sorted(range(r.size), key=lambda j: (-r[j], jitter[j]))
        assert o.tolist() == want
        seen.add(tuple(o[2:]))
        neg = relevance_order(r, most_relevant_first=False, tie_seed=seed)
        assert neg[-2:].tolist() == [4, 0]
    assert len(seen) > 5  # really random
    np.testing.assert_array_equal(relevance_order(r, tie_seed=7), relevance_order(r, tie_seed=7))


def test_random_ties_average_the_draws(adapter):  # noqa: F811
    """``ties="random"``: each curve is the mean of 8 draws; a map without ties gives the
    index-order curves (and no extra model input), a constant map does not. "The same" is to
    float32 rounding: the images are encoded in other batches, and the CPU kernels' rounding
    depends on the batch (2-5e-7 of an embedding here)."""
    from cliplens.eval.perturbation import PromptScorer
    from cliplens.eval.runner import perturbation_scores
    from cliplens.targets import resolve_target

    pixels = adapter.prepare_images([_item().image])[0].pixel_values[0]
    g = pixels.shape[-1] // adapter.patch_size[0]
    distinct = np.arange(g * g, dtype=float).reshape(1, g, g)
    flat = np.ones((1, g, g))
    texts = ["a red square"]
    target = resolve_target("logit", texts)
    scorer = PromptScorer.of(adapter, texts, target)
    out = {}
    for ties in ("index", "random"):
        cfg = EvalConfig(methods="chefer", dataset="x", metrics="perturbation,deletion", steps=4, ties=ties)
        out[ties] = perturbation_scores(adapter, cfg, pixels, {"d": distinct, "f": flat}, scorer, index=3)
    (idx, n_idx), (rnd, n_rnd) = out["index"], out["random"]
    assert idx[("d", 0)].keys() == rnd[("d", 0)].keys()
    for key, value in idx[("d", 0)].items():
        np.testing.assert_allclose(np.asarray(rnd[("d", 0)][key]), np.asarray(value), rtol=1e-5, atol=1e-6)
    assert idx[("f", 0)] != rnd[("f", 0)] and n_rnd > n_idx
    for kind in ("positive", "deletion"):
        curve = rnd[("f", 0)][kind]
        assert rnd[("f", 0)][kind + "_auc"] == pytest.approx(
            float(np.trapezoid(curve, np.linspace(0, 1, len(curve)) if kind == "deletion" else np.arange(10) / 10))
        )


# ---- Chefer et al.'s perturbation protocol ----------------------------------------------------------


def test_chefer_perturbation_is_the_reference_loop(adapter):  # noqa: F811
    """pertubation_eval_from_hdf5.py on one image: the top int(f * h * w) pixels of the map
    upsampled x patch size (torch.topk; bottom ones for negative) set to black (0 in [0, 1]
    space), top-1 accuracy of the classifier against the class, AUC = trapz(acc, f) * 100."""
    from cliplens.eval.classifier import ZeroShotClassifier, encode_images
    from cliplens.eval.metrics import CHEFER_FRACTIONS
    from cliplens.eval.perturbation import PromptScorer, black_value
    from cliplens.eval.runner import perturbation_scores
    from cliplens.targets import resolve_target

    clf = ZeroShotClassifier.build(adapter, ["red square", "blue circle", "green triangle"], "a")
    pixels = adapter.prepare_images([_item().image])[0].pixel_values[0]
    probs = clf.probabilities(encode_images(adapter, pixels[None]).double())[0]
    label = int(probs.argmax())  # the class the unperturbed image is classified as: accuracy starts at 1
    ph, pw = adapter.patch_size
    h, w = pixels.shape[-2:]
    grid = np.random.default_rng(2).normal(size=(h // ph, w // pw))
    texts = [clf.classes[label]]
    cfg = EvalConfig(
        methods="chefer", dataset="x", metrics="perturbation", target="class", perturbation_protocol="chefer"
    )
    got, _ = perturbation_scores(
        adapter, cfg, pixels, {"m": grid[None]}, PromptScorer.of(adapter, texts, resolve_target("logit", texts)),
        top1=(clf, [label]),
    )
    vis = upsample(grid, ph).ravel()
    black = torch.as_tensor(black_value(adapter), dtype=pixels.dtype)
    for order in ("positive", "negative"):
        accs = []
        for f in CHEFER_FRACTIONS:
            k = int(len(vis) * f)
            x = pixels.clone().reshape(3, -1)
            if k:
                # torch.topk; the upsampled map has tied pixels (clamped borders), whose order topk
                # leaves unspecified: broken by index here, as ties="index"
                key = -vis if order == "positive" else vis
                idx = torch.from_numpy(np.argsort(key, kind="stable")[:k].copy())
                x[:, idx] = black[:, None]
            e = encode_images(adapter, x.reshape(1, 3, h, w))
            accs.append(float(clf.probabilities(e.double()).argmax(-1)[0] == label))
        assert got[("m", 0)][order] == accs
        assert got[("m", 0)][order + "_auc"] == pytest.approx(np.trapezoid(accs, CHEFER_FRACTIONS) * 100)
    with pytest.raises(InputError, match="class"):
        EvalConfig(dataset="x", perturbation_protocol="chefer")


def test_an_evaluation_runs_under_the_chefer_perturbation_protocol(adapter, tmp_path):  # noqa: F811
    from cliplens.eval import harness
    from cliplens.worlds.shapes import write_dataset

    data = write_dataset(tmp_path / "shapes", 1, seed=11, size=48)
    res = harness.evaluate(
        adapter, ["chefer"], f"shapes:{data}", metrics="perturbation", target="class", templates="a",
        perturbation_protocol="chefer",
    )
    row = {r["source"]: r for r in res.rows}["chefer"]
    assert 0.0 <= row["positive_auc"] <= 90.0 and 0.0 <= row["negative_auc"] <= 90.0  # accuracy x 100
