"""Explaining a whole dataset: every (item, prompt, method) record into a resumable Parquet
dataset, on one process (``engine="local"``) or a Ray cluster (``engine="ray"``, the ``ray``
extra). Needs ``pyarrow`` (in the ``ray`` and ``scale`` extras); ``import cliplens`` never
imports this package. See docs/scale.md."""

from .job import ScaleJob
from .run import ENGINES, ScaleSummary, explain_dataset

__all__ = ["ENGINES", "ScaleJob", "ScaleSummary", "explain_dataset", "read_records"]


def read_records(out):
    """Every record of a job folder as one Arrow table (see :mod:`cliplens.scale.store`)."""
    from .store import read_records as _read

    return _read(out)
