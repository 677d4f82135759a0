"""Evaluation: model-free metrics (:mod:`.metrics`), dataset readers (:mod:`.datasets`) and the
harness that scores explanation methods with them (:func:`evaluate`, :mod:`.harness`).

An evaluation reads like its protocol: :mod:`.config` (every knob, :class:`EvalConfig`) ->
:mod:`.runner` (one item -> one record) -> :mod:`.store` (records on disk, resumable, sharded)
-> :mod:`.summary` (records -> :class:`EvalResults`) -> :mod:`.report` (tables, charts, files);
:mod:`.cli` is ``cliplens evaluate``.

The metrics and readers need only numpy and PIL; the ImageNet-Segmentation reader imports
h5py when it is used (the ``eval`` extra).
"""

from .classifier import ClassContrastTarget, ClassifierTarget, ZeroShotClassifier
from .datasets import DATASET_KINDS, DatasetError, EvalDataset, EvalItem, open_dataset
from .harness import ALL_METRICS, EvalConfig, EvalResults, evaluate
from .metrics import (
    CHEFER_FRACTIONS,
    PerturbationCurve,
    PointIoUAccumulator,
    SegmentationAccumulator,
    apply_patch_removal,
    average_precision,
    centre_prior,
    deletion_curve,
    insertion_curve,
    oracle_map,
    pearson_correlation,
    perturbation_curve,
    point_counts,
    pointing_game,
    random_map,
    segmentation_counts,
    segmentation_scores,
    spearman_correlation,
)
from .templates import IMAGENET_TEMPLATES

__all__ = [
    "ALL_METRICS",
    "CHEFER_FRACTIONS",
    "DATASET_KINDS",
    "IMAGENET_TEMPLATES",
    "ClassContrastTarget",
    "ClassifierTarget",
    "DatasetError",
    "EvalConfig",
    "EvalDataset",
    "EvalItem",
    "EvalResults",
    "PerturbationCurve",
    "PointIoUAccumulator",
    "SegmentationAccumulator",
    "ZeroShotClassifier",
    "apply_patch_removal",
    "average_precision",
    "centre_prior",
    "deletion_curve",
    "evaluate",
    "insertion_curve",
    "open_dataset",
    "oracle_map",
    "pearson_correlation",
    "perturbation_curve",
    "point_counts",
    "pointing_game",
    "random_map",
    "segmentation_counts",
    "segmentation_scores",
    "spearman_correlation",
]
