"""Writing result folders all-or-nothing: files are staged beside the target folder and
moved in only when everything succeeded."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (s[:limit].rstrip("-")) or "x"


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success move its files into ``out`` (created if
    needed, same-named files replaced); on any error remove it and leave ``out`` untouched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        from .errors import InputError

        raise InputError(f"{out}: exists and is not a directory")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for root, _dirs, files in os.walk(stage):
            rel = Path(root).relative_to(stage)
            (out / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                os.replace(Path(root) / name, out / rel / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
