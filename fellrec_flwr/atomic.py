"""Atomic file and folder writes.

A reader must never see half a file: every writer here writes to a temporary name in
the destination folder (same file system, so the rename is atomic) and then moves it
into place with ``os.replace``. On any error the temporary is removed and the old
file, if any, is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; finished outputs get the usual
# permissions instead, so another user or container can read prepared data.
_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def _temp_file_for(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; rename it onto `path` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with _temp_file_for(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not overtake the data on a crash
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists; not replacing it.")
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
