"""Evaluation: model-free metrics (:mod:`.metrics`) and dataset readers (:mod:`.datasets`).

Both modules need only numpy and PIL; the ImageNet-Segmentation reader imports h5py when
it is used (the ``eval`` extra).
"""

from .datasets import DATASET_KINDS, DatasetError, EvalDataset, EvalItem, open_dataset
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

__all__ = [
    "CHEFER_FRACTIONS",
    "DATASET_KINDS",
    "DatasetError",
    "EvalDataset",
    "EvalItem",
    "PerturbationCurve",
    "PointIoUAccumulator",
    "SegmentationAccumulator",
    "apply_patch_removal",
    "average_precision",
    "centre_prior",
    "deletion_curve",
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
