"""Where finished items are kept: ``OUT/config.json`` + ``OUT/results.jsonl``, one record a line.

A :class:`ResultStore` appends each record as its item finishes (flushed and synced), so an
interrupted run loses at most the item it was on; reopened with the same configuration it
resumes (an unfinished last line is dropped with a warning); a different configuration is
refused with the knobs that changed, unless ``restart`` discards the old results.

Shards: with ``shard="NAME"`` the store owns ``config.NAME.json`` + ``results.NAME.jsonl``
instead, so several processes can each write their own pair of files in one folder (one writer
per file). :func:`read_results` merges every shard of a folder and refuses shards whose
configuration digests differ.

Files other than the results file are written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..files import atomic_write
from .config import EvalConfig

__all__ = ["ResultStore", "StoredResults", "atomic_write", "read_results", "shard_files"]

_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_FILE = re.compile(r"^config(?:\.([A-Za-z0-9_-]+))?\.json$")


def shard_files(shard: str | None = None) -> tuple[str, str]:
    """The (config, results) file names of a shard; None is the unsharded run's pair."""
    if shard is None:
        return "config.json", "results.jsonl"
    if not isinstance(shard, str) or not _SHARD_NAME.match(shard):
        raise InputError(f"a shard name is letters, digits, '-' and '_', got {shard!r}")
    return f"config.{shard}.json", f"results.{shard}.jsonl"


class ResultStore:
    """The finished records of one run (one shard) in ``out``; ``out=None`` keeps them in memory.

    Args:
        out: the results folder (created); None: no files, no resume.
        config: the completed configuration of the run.
        restart: discard this shard's earlier results (and ``derived`` files) first.
        shard: write ``config.SHARD.json`` / ``results.SHARD.jsonl`` (see the module docstring).
        derived: names of files made from the results (reports), removed on restart.

    ``records`` maps item index -> record, loaded on opening and extended by :meth:`append`.
    """

    def __init__(
        self,
        out: str | Path | None,
        config: EvalConfig,
        *,
        restart: bool = False,
        shard: str | None = None,
        derived: Iterable[str] = (),
    ):
        self.out = None if out is None else Path(out)
        self.config = config
        self.records: dict[int, dict] = {}
        config_name, results_name = shard_files(shard)
        if self.out is None:
            return
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: exists and is not a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_path = self.out / config_name
        self.results_path = self.out / results_name
        if restart:
            for name in (config_name, results_name, *derived):
                p = self.out / name
                if p.exists():
                    p.unlink()
        if self.config_path.exists():
            _check_digest(self.config_path, config)
            self._load()
        elif self.results_path.exists():
            raise InputError(
                f"{self.out} holds {results_name} without {config_name}: "
                "use another --out or --restart to discard it"
            )
        atomic_write(
            self.config_path, json.dumps({"digest": config.digest(), "config": config.to_dict()}, indent=1)
        )

    def _load(self) -> None:
        if not self.results_path.exists():
            return
        records, kept, total = _read_records(self.results_path)
        self.records.update(records)
        if len(kept) != total:
            atomic_write(self.results_path, b"".join(g + b"\n" for g in kept))

    def append(self, record: dict) -> None:
        """Keep one finished record (on disk: one line, flushed and synced before returning)."""
        self.records[int(record["index"])] = record
        if self.out is None:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.results_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class StoredResults:
    """What :func:`read_results` finds in a folder: the one configuration (as stored), its
    digest, the records of every shard in index order and the shards read (None = unsharded)."""

    config: dict
    digest: str
    records: list[dict]
    shards: tuple[str | None, ...]


def read_results(out: str | Path) -> StoredResults:
    """Merge the records of every shard in ``out`` (read only; an unfinished last line is
    skipped with a warning). Refuses (:class:`InputError`) a folder without results, shards of
    different configuration digests, and one item index with different item ids."""
    out = Path(out)
    shards: list[str | None] = []
    if out.is_dir():
        for p in sorted(out.iterdir()):
            m = _SHARD_FILE.match(p.name)
            if m:
                shards.append(m.group(1))
    if not shards:
        raise InputError(f"{out}: no evaluation results (config.json or config.SHARD.json) here")
    digests: dict[str, list[str]] = {}
    config: dict = {}
    records: dict[int, dict] = {}
    for shard in shards:
        config_name, results_name = shard_files(shard)
        digest, config = _read_config(out / config_name)
        digests.setdefault(digest, []).append(config_name)
        if not (out / results_name).exists():
            continue
        for index, rec in _read_records(out / results_name)[0].items():
            old = records.setdefault(index, rec)
            if old.get("id") != rec.get("id"):
                raise InputError(
                    f"{out}: item {index} is {old.get('id')!r} in one shard and {rec.get('id')!r} in another"
                )
    if len(digests) > 1:
        groups = "; ".join(f"{d}: {', '.join(names)}" for d, names in digests.items())
        raise InputError(
            f"{out} holds shards of different configurations ({groups}); merge only one run's shards"
        )
    (digest,) = digests
    return StoredResults(config, digest, [records[i] for i in sorted(records)], tuple(shards))


# ----------------------------------------------------------------------------- helpers


def _read_config(path: Path) -> tuple[str, dict]:
    """(digest, stored config) of a config file; InputError where it is unreadable."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return str(saved["digest"]), dict(saved["config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{path} is unreadable: use another --out or --restart") from None


def _check_digest(path: Path, config: EvalConfig) -> None:
    """Refuse a results folder written with another configuration, naming what changed."""
    digest, old = _read_config(path)
    if digest == config.digest():
        return
    new = config.to_dict()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise InputError(
        f"{path.parent} holds results of a different configuration (changed: {', '.join(changed) or 'version'}); "
        "use another --out, or --restart (restart=True) to discard them and start fresh"
    )


def _read_records(path: Path) -> tuple[dict[int, dict], list[bytes], int]:
    """(index -> record, the good lines, the number of non-empty lines) of a results file.

    An unparseable last line without a final newline is an interrupted write: dropped with a
    warning. Any other bad line is corruption (InputError)."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records: dict[int, dict] = {}
    good: list[bytes] = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            index = int(rec["index"])
        except (ValueError, KeyError, TypeError):
            if k >= len(lines) - 2 and not raw.endswith(b"\n"):
                warnings.warn(f"{path}: dropped an unfinished last line (interrupted run)", stacklevel=4)
                break
            raise InputError(f"{path} line {k + 1} is corrupt: use --restart to start fresh") from None
        records[index] = rec
        good.append(line)
    return records, good, sum(1 for line in lines if line.strip())
