"""Writing result folders all-or-nothing.

:func:`staged_dir` checks the output folder before any work (writable, not someone else's
files, not being written by another run), stages the files in a hidden folder beside it and
moves them in only when everything succeeded, replacing an earlier cliplens output as a whole.

Hidden helpers carry the pid of the process that made them (``.NAME.partial-PID-XXXX``,
``.NAME.lock`` holding the pid), so a later run can sweep what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

#: the file that marks a folder as a cliplens output (written into every staged folder)
MARKER = ".cliplens-output"
#: files that mark an output written before the marker existed
_LEGACY = ("results.json", "index.html")

_STAGE_RE = re.compile(r"^\.(?:.*\.)?(?:partial|old|tmp)-(\d+)-")


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (s[:limit].rstrip("-")) or "x"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def is_cliplens_output(folder: Path) -> bool:
    """Whether ``folder`` holds a cliplens result (its marker, or results.json + index.html)."""
    return (folder / MARKER).is_file() or all((folder / f).is_file() for f in _LEGACY)


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried for real: permissions, read-only
    mounts and ACLs all count)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".cliplens-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(out: str | Path) -> None:
    """A one-line InputError unless ``out`` is a writable folder or can be created (for
    outputs written in place, such as the resumable ``evaluate`` store)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.is_dir():
        if not _writable(out):
            raise InputError(f"{out}: the output folder is not writable")
        return
    base = _existing_ancestor(out.resolve().parent)
    if not base.is_dir():
        raise InputError(f"{out}: cannot create the output folder ({base} is not a directory)")
    if not _writable(base):
        raise InputError(f"{out}: cannot create the output folder ({base} is not writable)")


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Check ``out`` before any work: a one-line InputError when it is a file, cannot be
    created or written, or already holds files that are not a cliplens output (unless
    ``overwrite``). Returns where the staging folder goes: beside ``out`` when its parent is
    writable, else inside ``out`` itself (``--out .`` in a folder whose parent is read-only)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    parent = out.resolve().parent
    if overwrite and _precious(out):
        raise InputError(
            f"{out}: --overwrite will not replace the contents of {out.resolve()}; choose a folder of its own"
        )
    if out.is_dir():
        entries = [e for e in os.listdir(out) if not _is_helper(e)]
        if entries and not overwrite and not is_cliplens_output(out):
            raise InputError(
                f"{out}: the folder is not empty and holds no cliplens output; "
                "choose another --out or pass --overwrite to replace its contents"
            )
        if not _writable(out):
            raise InputError(f"{out}: the output folder is not writable")
        where = parent if parent.is_dir() and _writable(parent) else out.resolve()
        _check_lock(_lock_path(out, where))
        return where
    base = _existing_ancestor(parent)
    if not base.is_dir():
        raise InputError(f"{out}: cannot create the output folder ({base} is not a directory)")
    if not _writable(base):
        raise InputError(f"{out}: cannot create the output folder ({base} is not writable)")
    _check_lock(_lock_path(out, parent))
    return parent


def _lock_path(out: Path, where: Path) -> Path:
    return where / (".cliplens.lock" if where == out.resolve() else f".{out.name}.lock")


def _lock_holder(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _check_lock(path: Path) -> None:
    holder = _lock_holder(path)
    if holder and holder != os.getpid() and pid_alive(holder):
        raise InputError(
            f"another cliplens run (pid {holder}) is writing to this output folder ({path} is its lock)"
        )


def _precious(out: Path) -> bool:
    """The filesystem root or the home folder: never emptied by ``--overwrite``."""
    target = out.resolve()
    return target == Path(target.anchor) or target == Path.home().resolve()


def _is_helper(name: str) -> bool:
    return name.startswith((".cliplens-probe-", ".partial-", ".cliplens.lock")) or name == MARKER


def sweep_stale(folder: Path) -> list[Path]:
    """Remove the staging folders (``.partial-PID-*``, ``.old-PID-*``, ``.tmp-PID-*``) in
    ``folder`` whose process is gone; returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _STAGE_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold ``path`` as a lock file holding this pid; a one-line InputError when a live
    process holds it (a stale lock of a dead process is taken over). Re-entrant within one
    process: an inner hold leaves the lock to the outer one."""
    mine = False
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_holder(path) == os.getpid():
                break  # held by an outer block of this process
            _check_lock(path)
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        mine = True
        break
    else:
        raise InputError(f"{path}: cannot take the output lock")
    try:
        yield
    finally:
        if mine:
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def reserve_output(out: str | Path, *, overwrite: bool = False) -> Iterator[None]:
    """Check ``out`` (:func:`check_output_dir`) and hold its lock for the whole block, so that
    a concurrent run is refused before either does any work; :func:`staged_dir` inside the
    block writes the results."""
    out = Path(out)
    where = check_output_dir(out, overwrite=overwrite)
    where.mkdir(parents=True, exist_ok=True)
    sweep_stale(where)
    with output_lock(_lock_path(out, where)):
        yield


@contextlib.contextmanager
def staged_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``out``: an earlier cliplens
    output (or, with ``overwrite``, any contents) is replaced as a whole. On any error the
    staging folder is removed and ``out`` is left untouched. ``out`` is checked first
    (:func:`check_output_dir`) and locked against a concurrent run."""
    out = Path(out)
    where = check_output_dir(out, overwrite=overwrite)
    inside = where == out.resolve()
    where.mkdir(parents=True, exist_ok=True)
    sweep_stale(where)
    lock = _lock_path(out, where)
    prefix = ".partial-" if inside else f".{out.name}.partial-"
    with output_lock(lock):
        stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=where))
        try:
            yield stage
            (stage / MARKER).write_text("cliplens\n", encoding="utf-8")
            if inside:
                _replace_contents(out, stage, lock)
            else:
                _replace_whole(out, stage, where)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _replace_whole(out: Path, stage: Path, where: Path) -> None:
    """``stage`` becomes ``out`` by renames: a reader sees the old folder or the new one."""
    if not out.exists():
        os.replace(stage, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=where))
    os.replace(out, old / "d")
    try:
        os.replace(stage, out)
    except OSError:
        os.replace(old / "d", out)  # put the old one back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _replace_contents(out: Path, stage: Path, lock: Path) -> None:
    """Where ``out`` itself cannot be renamed (its parent is read-only): empty it, then move
    the staged files in."""
    for entry in os.listdir(out):
        path = out / entry
        if path == stage or path == lock or entry.startswith(".partial-"):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for entry in os.listdir(stage):
        os.replace(stage / entry, out / entry)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


__all__ = [
    "MARKER",
    "atomic_write",
    "check_output_dir",
    "check_writable_dir",
    "is_cliplens_output",
    "output_lock",
    "pid_alive",
    "reserve_output",
    "slug",
    "staged_dir",
    "sweep_stale",
]
