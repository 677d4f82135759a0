"""The Parquet dataset a scale job writes, and its resume bookkeeping.

Layout of ``OUT``::

    _job.json                          the job (ScaleJob.to_dict) and its digest
    _parts/part-000007.json            commit marker of part 7: the item ids it holds
    data/method=chefer/part-000007.parquet
    data/method=legrad/part-000007.parquet

Read it with ``pyarrow.dataset.dataset(OUT/"data", partitioning="hive")`` or
``pandas.read_parquet(OUT/"data")`` (``method`` comes back as a column from the folder name;
``_``- and ``.``-prefixed files are skipped by both, so temporary files are never read).

One part holds every (prompt, method) record of a batch of whole items. A part is written as
hidden temporary files, renamed into place, and only then committed by its marker (written
atomically). An item is finished when a marker names it. Reopening the folder deletes Parquet
files that no marker names (a job killed between the renames and the marker) and rows of an
item already finished are dropped before writing, so every item lands exactly once.

Grid maps are ``list<float32>`` with ``grid_h``/``grid_w`` columns, not fixed-size lists: the
grid differs between images with ``--resize full`` (it follows the aspect ratio) and between
models, and one schema must hold every part; ``np.reshape(row.grid_map, (grid_h, grid_w))``
gives the map back. Token scores are ``list<float32>`` beside ``tokens`` (prompts differ in
length).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from ..files import atomic_write
from .job import ScaleJob

SCHEMA = pa.schema(
    [
        ("item_index", pa.int64()),
        ("item_id", pa.string()),
        ("prompt_index", pa.int32()),
        ("prompt", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("grid_map", pa.list_(pa.float32())),
        ("tokens", pa.list_(pa.string())),
        ("token_scores", pa.list_(pa.float32())),
        ("logit", pa.float64()),
        ("probability", pa.float64()),
        ("target", pa.float64()),
    ]
)
#: the in-memory rows an engine hands the store: the file schema plus the partition column
ROWS_SCHEMA = pa.schema([("method", pa.string()), *SCHEMA])

_PART = re.compile(r"^part-(\d+)\.(json|parquet)$")


def _float_lists(values: list) -> pa.Array:
    """list<float32> from numpy arrays / None, built from offsets (much faster than per-value)."""
    lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = [np.asarray(v, dtype=np.float32).ravel() for v in values if v is not None]
    data = pa.array(np.concatenate(flat) if flat else np.zeros(0, np.float32), type=pa.float32())
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), data, mask=mask)


def rows_table(cols: dict[str, list]) -> pa.Table:
    """The column lists of :func:`cliplens.scale.job.explain_rows` as an Arrow table."""
    arrays = []
    for field in ROWS_SCHEMA:
        if field.name in ("grid_map", "token_scores"):
            arrays.append(_float_lists(cols[field.name]))
        else:
            arrays.append(pa.array(cols[field.name], type=field.type))
    return pa.Table.from_arrays(arrays, schema=ROWS_SCHEMA)


class ParquetStore:
    """The output folder of one job: opened (checked, cleaned, resumed) before any work.

    Args:
        out: the folder (created).
        job: the job; its digest must match a folder written before, unless ``restart``.
        restart: delete what the folder holds of an earlier job first.

    ``done`` is the set of finished item ids; :meth:`write` commits one part.
    """

    def __init__(self, out: str | Path, job: ScaleJob, *, restart: bool = False):
        self.out = Path(out)
        self.job = job
        self.rows_per_item = len(job.texts) * len(job.methods)
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: exists and is not a directory")
        self.job_path = self.out / "_job.json"
        self.data, self.parts = self.out / "data", self.out / "_parts"
        if self._foreign() and not restart:
            raise InputError(
                f"{self.out}: the folder is not empty and holds no explain-dataset output; choose another --out"
            )
        if self.job_path.exists() and not restart:
            self._check_job()
        if restart:
            for p in (self.data, self.parts):
                shutil.rmtree(p, ignore_errors=True)
            if self.job_path.exists():
                self.job_path.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        self.done: set[str] = set()
        self.next_part = 0
        self._recover()
        atomic_write(self.job_path, json.dumps({"digest": job.digest(), "job": job.to_dict()}, indent=1))

    def _foreign(self) -> bool:
        """Whether the folder holds visible files but no job of ours (hidden ones: locks, temps)."""
        if not self.out.is_dir() or self.job_path.exists():
            return False
        return any(not p.name.startswith(".") for p in self.out.iterdir())

    def _check_job(self) -> None:
        try:
            saved = json.loads(self.job_path.read_text(encoding="utf-8"))
            digest, old = str(saved["digest"]), dict(saved["job"])
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{self.job_path} is unreadable: use another --out or --restart") from None
        if digest == self.job.digest():
            return
        new = self.job.to_dict()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise InputError(
            f"{self.out} holds records of a different job (changed: {', '.join(changed) or 'format'}); "
            "use another --out, or --restart to discard them"
        )

    def _recover(self) -> None:
        """Finished ids from the markers; delete temporary files and uncommitted Parquet files."""
        committed: set[int] = set()
        for p in sorted(self.parts.iterdir()):
            m = _PART.match(p.name)
            if not m:
                p.unlink()  # a marker's temporary file
                continue
            try:
                ids = json.loads(p.read_text(encoding="utf-8"))["items"]
            except (OSError, ValueError, KeyError, TypeError):
                raise InputError(f"{p} is corrupt: use --restart to start fresh") from None
            committed.add(int(m.group(1)))
            self.done.update(ids)
        numbers = set(committed)
        for folder in self.data.iterdir():
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                m = _PART.match(p.name)
                if m:
                    numbers.add(int(m.group(1)))
                if not m or int(m.group(1)) not in committed:
                    p.unlink()
        self.next_part = max(numbers, default=-1) + 1

    def write(self, table: pa.Table) -> int:
        """Commit the rows of whole items as one part (rows of items already finished, and repeated
        (item, method, prompt) rows, are dropped). Returns the number of items committed."""
        table = table.select(ROWS_SCHEMA.names).cast(ROWS_SCHEMA)
        ids = table.column("item_id").to_pylist()
        methods = table.column("method").to_pylist()
        prompts = table.column("prompt_index").to_pylist()
        keep, seen = [], set()
        for i, key in enumerate(zip(ids, methods, prompts)):
            if key[0] in self.done or key in seen:
                continue
            seen.add(key)
            keep.append(i)
        counts: dict[str, int] = {}
        for i in keep:
            counts[ids[i]] = counts.get(ids[i], 0) + 1
        short = [k for k, n in counts.items() if n != self.rows_per_item]
        if short:
            raise ValueError(
                f"part holds {counts[short[0]]} rows of item {short[0]!r}, not {self.rows_per_item}"
            )
        if not keep:
            return 0
        table = table.take(pa.array(keep, type=pa.int64()))
        number = self.next_part
        name = f"part-{number:06d}"
        written = []
        for method in dict.fromkeys(table.column("method").to_pylist()):
            rows = table.filter(pc.equal(table.column("method"), method)).drop_columns(["method"])
            folder = self.data / f"method={method}"
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{name}.parquet.tmp"
            pq.write_table(rows, tmp)
            written.append((tmp, folder / f"{name}.parquet"))
        for tmp, final in written:
            os.replace(tmp, final)
        items = list(counts)
        atomic_write(self.parts / f"{name}.json", json.dumps({"items": items, "rows": table.num_rows}))
        self.done.update(items)
        self.next_part += 1
        return len(items)


def read_records(out: str | Path) -> pa.Table:
    """Every record of a job folder as one Arrow table (``method`` as a column), for tests and
    small jobs; big ones are better read with ``pyarrow.dataset`` filters."""
    import pyarrow.dataset as ds

    data = Path(out) / "data"
    if not data.is_dir():
        raise InputError(f"{out}: no explain-dataset records here")
    return ds.dataset(data, format="parquet", partitioning="hive").to_table()
