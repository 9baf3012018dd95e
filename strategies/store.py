"""Where a strategy keeps each client's arrays (its personal adapter, its best adapter).

``personal-state = "memory"`` (:class:`MemoryRecordStore`): a dict of ArrayRecords, saved
inside the checkpoint; server memory grows with the number of REGISTERED clients.
``personal-state = "disk"`` (:class:`DiskRecordStore`): one safetensors file per client in
the run folder, read back only for the clients of a round; server memory then grows with
the clients sampled per round, not with the registered ones (docs/scale.md).

Files are written atomically (``fellrec_flwr.atomic``: a temporary beside the file, fsync,
rename). Each version of a client's file is named by its round, and the store keeps the
previous version too until the next one: a checkpoint names the files it was written with,
so resuming from the latest checkpoint after a crash mid-round finds them, even for the
clients the crashed round had already rewritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from flwr.app import ArrayRecord

from fellrec_flwr.atomic import atomic_file, clean_stale_temporaries, private_mkdir

from .arrays import FlatLayout, RecordRows, array_from_values, array_view

# numpy dtype name -> safetensors dtype tag (the float dtypes a FlatLayout accepts)
SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64"}


class PersonalStateError(ValueError):
    """A client's arrays on disk are missing or do not match what the store expects."""


class MemoryRecordStore(dict):
    """client key -> ArrayRecord, in the server's memory (personal-state = "memory")."""

    def put(self, key: int, record: ArrayRecord, server_round: int = 0) -> None:
        self[key] = record

    @contextlib.contextmanager
    def writer(self, layout: FlatLayout, keys: Sequence[int], server_round: int) -> Iterator["RowSink"]:
        """Rows of streamed blocks (:meth:`FlatLayout.mixed_blocks`) become the clients' new records."""
        rows = RecordRows(layout, len(keys))
        yield rows
        self.update(zip(keys, rows.records()))


class RowSink:
    """What :meth:`MemoryRecordStore.writer` and :meth:`DiskRecordStore.writer` yield: ``add(t0, t1,
    block, rows)`` takes rows ``rows`` of a float32 block of tensors t0 .. t1-1 (one row per key)."""

    def add(self, t0: int, t1: int, block: np.ndarray, rows: range | None = None) -> None:  # pragma: no cover
        raise NotImplementedError


def safetensors_header(layout: FlatLayout, metadata: Mapping[str, str]) -> bytes:
    """The header of a safetensors file whose tensors follow in ``layout`` order, contiguous.

    Written here (not by safetensors' own writer) because the values arrive block by block
    and are streamed to the file; the file is read back with ``safetensors.numpy.load_file``.
    """
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    start = 0
    for key, shape, dtype, size in zip(layout.keys, layout.shapes, layout.dtypes, layout.sizes()):
        if dtype.name not in SAFETENSORS_DTYPES:
            raise PersonalStateError(f"array {key!r} has dtype {dtype}; personal-state='disk' stores "
                                     f"{', '.join(SAFETENSORS_DTYPES)} (use personal-state='memory').")
        end = start + size * dtype.itemsize
        entries[key] = {"dtype": SAFETENSORS_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [start, end]}
        start = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(text)) + text


class _FileRows(RowSink):
    """Streams each client's rows into its own (temporary) file, sequentially."""

    def __init__(self, layout: FlatLayout, handles: list[BinaryIO]) -> None:
        self.layout, self.handles = layout, handles

    def add(self, t0: int, t1: int, block: np.ndarray, rows: range | None = None) -> None:
        for handle, row in zip(self.handles, rows if rows is not None else range(block.shape[0])):
            for raw in self.layout.group_bytes(t0, t1, block, row):
                handle.write(raw)


class DiskRecordStore(Mapping):
    """client key -> ArrayRecord, one safetensors file per client in ``folder`` (personal-state = "disk").

    Reading a key reads its file (a fresh ArrayRecord each time: nothing is cached, so memory
    stays with the caller, for as long as it keeps the record).
    """

    def __init__(self, folder: str | Path) -> None:
        private_mkdir(folder)
        self.folder = Path(folder).resolve()
        clean_stale_temporaries(self.folder)  # a killed server's half-written files
        self.files: dict[int, str] = {}  # key -> its current file
        self.previous: dict[int, str] = {}  # key -> the version before (kept for the last checkpoint)

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, key: int) -> ArrayRecord:
        path = Path(self.files[key])  # KeyError for an unknown client, as a dict
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="np") as fh:
                order = json.loads(fh.metadata()["keys"])  # the record's key order, as written
                return ArrayRecord({name: array_from_values(fh.get_tensor(name)) for name in order})
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:
            raise PersonalStateError(
                f"client-key {key}'s arrays at {path} cannot be read ({err}). The personal-state folder must "
                "hold the files of the checkpoint being resumed: resume from the run's latest checkpoint.") from err

    def __contains__(self, key: object) -> bool:
        return key in self.files

    def __iter__(self) -> Iterator[int]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    # ------------------------------------------------------------------ writing
    def path_for(self, key: int, server_round: int) -> Path:
        return self.folder / f"client-{key}.round-{server_round}.safetensors"

    def put(self, key: int, record: ArrayRecord, server_round: int = 0) -> None:
        """Write one client's record (e.g. its upload, or its best adapter)."""
        layout = FlatLayout.of(record)
        path = self.path_for(key, server_round)
        with atomic_file(path, clean=False) as tmp, open(tmp, "wb") as fh:
            fh.write(safetensors_header(layout, self._metadata(layout, key, server_round)))
            for name in layout.keys:
                fh.write(memoryview(np.ascontiguousarray(array_view(record[name]))).cast("B"))
            fh.flush()
            os.fsync(fh.fileno())
        self._commit(key, str(path))

    @contextlib.contextmanager
    def writer(self, layout: FlatLayout, keys: Sequence[int], server_round: int) -> Iterator[RowSink]:
        """Stream rows into one new file per key; all files move into place when the block ends
        (none on an error). Open files: one per key of this round's clients."""
        paths = [self.path_for(key, server_round) for key in keys]
        with contextlib.ExitStack() as stack:
            temps = [stack.enter_context(atomic_file(path, clean=False)) for path in paths]
            handles = [stack.enter_context(open(tmp, "wb")) for tmp in temps]
            for key, handle in zip(keys, handles):
                handle.write(safetensors_header(layout, self._metadata(layout, key, server_round)))
            yield _FileRows(layout, handles)
            for handle in handles:  # before the renames (ExitStack unwinds the files first)
                handle.flush()
                os.fsync(handle.fileno())
        for key, path in zip(keys, paths):
            self._commit(key, str(path))

    @staticmethod
    def _metadata(layout: FlatLayout, key: int, server_round: int) -> dict[str, str]:
        return {"keys": json.dumps(list(layout.keys)), "client-key": str(key), "round": str(server_round)}

    def _commit(self, key: int, path: str) -> None:
        """``path`` is now key's file; the version before it stays, the one before that goes."""
        current = self.files.get(key)
        if current == path:
            return  # the same round written again (a resumed run repeating a round)
        older = self.previous.get(key)
        if older is not None and older != path and Path(older).parent == self.folder:
            Path(older).unlink(missing_ok=True)
        if current is not None:
            self.previous[key] = current
        self.files[key] = path

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "files": {str(k): v for k, v in self.files.items()},
                "previous": {str(k): v for k, v in self.previous.items()}}

    @classmethod
    def of_state(cls, state: Mapping[str, Any]) -> "DiskRecordStore":
        """A read-only view of a checkpoint's files where they lie (no folder is created or cleaned)."""
        store = cls.__new__(cls)
        store.folder, store.files, store.previous = Path(state["folder"]), {}, {}
        store.load(state)
        return store

    def load(self, state: Mapping[str, Any]) -> None:
        """The files of a checkpoint (they may lie in an earlier run's folder; new ones go here)."""
        files = {int(k): str(v) for k, v in state["files"].items()}
        missing = [path for path in files.values() if not Path(path).is_file()]
        if missing:
            raise PersonalStateError(
                f"{len(missing)} personal-state file(s) of the checkpoint are missing, e.g. {missing[0]}. A "
                "checkpoint keeps its clients' arrays in its run folder's personal-state/: resume from the "
                "run's latest checkpoint, with that folder in place.")
        self.files = files
        self.previous = {int(k): str(v) for k, v in state.get("previous", {}).items()}


def make_store(folder: str | Path | None) -> MemoryRecordStore | DiskRecordStore:
    """A disk store in ``folder``, or a memory store when folder is None."""
    return MemoryRecordStore() if folder is None else DiskRecordStore(folder)
