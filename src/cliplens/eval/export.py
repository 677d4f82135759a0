"""``OUT/records.parquet``: an evaluation's records as one flat table (``cliplens evaluate
--parquet``, ``evaluate(..., parquet=True)``), for readers that want columns rather than JSON
lines. ``results.jsonl`` stays the store (appended item by item, what a run resumes from); this
file is written from it at the end of a run, so it always holds every finished item.

One row per (item, pair, source): ``index``, ``id``, ``unique_inputs`` (the item's), ``pair``
(index of the labelled object in the item), ``label``, ``text``, ``value`` and whatever the
target adds to a pair (``class``, ...), ``source`` (a method or a baseline), then one column per
metric of the records: a number as float64 (``pointing``, ``positive_auc``, ...), a list as
list<float64> (``seg`` counts, the ``positive``/``negative``/``deletion``/``insertion`` curves,
``sanity`` correlations); null where a row has no such score. Skipped items have no rows.
pyarrow is imported here only (the ``scale`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["PARQUET_FILE", "records_table", "require_pyarrow", "write_parquet"]

PARQUET_FILE = "records.parquet"
_PAIR = ("pair", "label", "text", "value")


def require_pyarrow():
    """pyarrow, or a one-line InputError saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError("--parquet needs pyarrow: pip install 'cliplens[scale]' (or pyarrow)") from None
    return pyarrow


def records_table(records: Sequence[dict]):
    """The records (``results.jsonl`` lines) as a pyarrow Table: see the module docstring."""
    pa = require_pyarrow()
    rows: list[dict[str, Any]] = []
    extras: list[str] = []  # pair keys a target adds (class, ...), first seen first
    metrics: dict[str, bool] = {}  # metric -> is a list, first seen first
    for rec in records:
        for p, pair in enumerate(rec.get("pairs") or ()):
            base = {
                "index": rec["index"],
                "id": rec["id"],
                "unique_inputs": rec.get("unique_inputs"),
                "pair": p,
            }
            for key, value in pair.items():
                if key == "scores":
                    continue
                base[key] = value
                if key not in _PAIR and key not in extras:
                    extras.append(key)
            for source, scores in pair.get("scores", {}).items():
                row = {**base, "source": source}
                for name, value in scores.items():
                    is_list = isinstance(value, (list, tuple))
                    if metrics.setdefault(name, is_list) != is_list:
                        raise InputError(f"metric {name!r} is a number in one record and a list in another")
                    row[name] = (
                        [None if v is None else float(v) for v in value]
                        if is_list
                        else (None if value is None else float(value))
                    )
                rows.append(row)
    fields = [
        pa.field("index", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("unique_inputs", pa.int64()),
        pa.field("pair", pa.int64()),
        pa.field("label", pa.string()),
        pa.field("text", pa.string()),
        pa.field("value", pa.float64()),
    ]
    for key in extras:
        fields.append(pa.field(key, pa.array([r.get(key) for r in rows]).type))
    fields.append(pa.field("source", pa.string()))
    for name, is_list in metrics.items():
        fields.append(pa.field(name, pa.list_(pa.float64()) if is_list else pa.float64()))
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def write_parquet(records: Sequence[dict], out: str | Path) -> Path:
    """Write :func:`records_table` to ``out/records.parquet`` (atomically); its path."""
    require_pyarrow()
    import pyarrow.parquet as pq

    path = Path(out) / PARQUET_FILE
    tmp = path.with_name(f".{PARQUET_FILE}.tmp")
    pq.write_table(records_table(records), tmp)
    tmp.replace(path)
    return path
