"""Atomic file and folder writes, private by default.

A reader must never see half a file: every writer here writes to a temporary name in
the destination folder (same file system, so the rename is atomic) and then moves it
into place with ``os.replace``. On any error the temporary is removed and the old
file, if any, is left untouched.

Outputs are private: files are created 0600 and folders 0700 (prepared data, adapters,
checkpoints, secrets and results describe real users), from the first byte on -- the
temporary is created with that mode, so there is no moment when it is readable by others.
Pass `mode=` to share a file on purpose.

A process killed mid-write (``kill -9``) leaves its temporary behind; every writer removes
the stale temporaries of its own target first (`clean_stale_temporaries`): those of processes
that no longer run, and any older than a day.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FILE_MODE = 0o600
DIR_MODE = 0o700
STALE_AFTER_S = 60.0  # a dead writer's temporary older than this is removed
ABANDONED_AFTER_S = 24 * 3600.0  # any temporary older than this is removed (pid reused, other host)
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(?:tmp|old)$")
_LEGACY_TMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.(?:tmp|old)$")  # before the pid was in the name


def private_mkdir(path: str | Path) -> Path:
    """mkdir -p whose new folders are 0700 (Path.mkdir gives missing parents the umask's mode)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # a concurrent writer made it
            pass
    return Path(missing[0]) if missing else path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove temporaries left in `folder` by killed writers (of target `name`, or of any target).

    Ours are named ``.<target>.<pid>.<random>.tmp`` (``.old`` for a replaced folder in transit): one
    whose process is gone and that is older than STALE_AFTER_S is removed, as is any older than
    ABANDONED_AFTER_S (and legacy names without a pid after ABANDONED_AFTER_S).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    pattern = f".{glob_escape(name)}.*" if name else ".*"
    for entry in folder.glob(pattern):
        match = _TMP_RE.match(entry.name)
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        if match and (name is None or match["name"] == name):
            pid = int(match["pid"])
            stale = age > ABANDONED_AFTER_S or (age > STALE_AFTER_S and pid != os.getpid() and not _pid_alive(pid))
        else:
            legacy = _LEGACY_TMP_RE.match(entry.name)
            stale = bool(legacy) and (name is None or legacy["name"] == name) and age > ABANDONED_AFTER_S
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", text)


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def _temp_file_for(path: Path, mode: int = FILE_MODE, clean: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; rename it onto `path` on success."""
    private_mkdir(path.parent)
    if clean:
        clean_stale_temporaries(path.parent, path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)  # created 0600
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # before the rename: the final name never has another mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = FILE_MODE, clean: bool = True) -> Iterator[Path]:
    """For a writer that fills a file in parts: yields the temporary beside `path`, moved onto
    `path` when the block ends without error (removed on an error). The writer flushes and fsyncs
    it before the block ends. clean=False skips the search for stale temporaries of `path`
    (a writer of many files cleans their folder once, with clean_stale_temporaries)."""
    with _temp_file_for(Path(path), mode, clean) as tmp:
        yield tmp


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = FILE_MODE) -> Path:
    path = Path(path)
    with _temp_file_for(path, mode) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not overtake the data on a crash
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8", mode: int = FILE_MODE) -> Path:
    return atomic_write_bytes(path, text.encode(encoding), mode)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_to_parquet(table: pd.DataFrame | pa.Table, path: str | Path,
                      schema: pa.Schema | None = None) -> Path:
    """Write a DataFrame (or an Arrow table) as Parquet; `schema` pins the column types."""
    path = Path(path)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    elif schema is not None:
        table = table.cast(schema)
    with _temp_file_for(path) as tmp:
        pq.write_table(table, tmp)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name, then move it to `path` in one rename.

    Usage::

        with atomic_dir(out) as tmp:
            write files into tmp
        # now `out` exists, complete

    On an exception the temporary folder is deleted and `path` is left as it was.
    If `path` already exists: with ``overwrite`` it is replaced (the old folder is
    moved aside first, then deleted); without it, FileExistsError is raised and the
    new folder is discarded -- callers that race for the same deterministic output
    (several ClientApps preparing the same data) can catch that and use the winner's.
    """
    path = Path(path)
    private_mkdir(path.parent)
    clean_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))  # created 0700
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists; not replacing it.")
            trash = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive POSIX lock on `path` (created 0600): processes that compute the same cached file
    wait here, then find it written by the first one."""
    import fcntl

    path = Path(path)
    private_mkdir(path.parent)
    with open(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
