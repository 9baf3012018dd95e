"""Conversions between Flower ArrayRecords and flat numpy matrices / plain dicts.

FELLRec works on each client's LoRA as one flat vector. :class:`FlatLayout` remembers
the names, shapes and dtypes of the tensors so a row of the (clients x parameters)
matrix can be turned back into an ArrayRecord with the same keys.

Copies are what made the aggregation slow at 7B scale (issue 14): a Flower ``Array`` holds
its values as ``.npy`` bytes, and ``Array.numpy()`` / ``Array(ndarray)`` each parse or
write them through a BytesIO. Here values are read as read-only views on those bytes
(:func:`array_view`) and written with exactly one copy into the new bytes
(:func:`array_from_values`).

The aggregation streams (issue 23): :meth:`FlatLayout.blocks` gathers the uploads a few
tensors at a time into one reused (N, cols) buffer, and :meth:`FlatLayout.mixed_blocks`
applies weights to each block, so neither the uploads nor the aggregates ever exist as an
(N, D) matrix of their own; the caller decides where each block's rows go (new ArrayRecords,
:class:`RecordRows`, or files on disk, :mod:`strategies.store`).
"""

from __future__ import annotations

import functools
import io
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from threadpoolctl import threadpool_limits

NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: data is np.save output
# Columns of one block of W @ X in FlatLayout.mix when no size is given: 2**17 float32 columns x
# 101 rows = 53 MB (large enough for BLAS to run at full speed). The strategies size their
# blocks from the aggregation-block-mb setting instead (block_columns()).
MIX_BLOCK_COLUMNS = 1 << 17
# BLAS threads for the blocks of W @ X: one, as for the Gram matrix (strategies/fellrec_math.py):
# the server shares its cores with ClientApps, and waiting BLAS threads spin on a busy machine.
MIX_BLAS_THREADS = 1


def block_columns(block_mb: float, rows: int) -> int:
    """Columns of a float32 block of ``rows`` rows that fits ``block_mb`` MiB (at least one).

    The streamed aggregation holds two such blocks of the uploads and one of the weighted sums
    (aggregation-block-mb); a tensor wider than this still forms one block of its own.
    """
    if not (np.isfinite(block_mb) and block_mb > 0):
        raise ValueError(f"aggregation-block-mb={block_mb} must be a number > 0 (MiB per block of uploads; "
                         "default 64).")
    if rows < 1:
        raise ValueError(f"rows={rows}: a block needs at least one client.")
    return max(1, int(block_mb * (1 << 20)) // (4 * rows))


@functools.lru_cache(maxsize=4096)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header np.save writes for a C-ordered array of this dtype and shape."""
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def large_empty(shape: tuple[int, ...], dtype: np.dtype = np.float32) -> np.ndarray:
    """An uninitialised array in plain anonymous memory (mmap) for the GB-sized stacked matrix.

    numpy asks the kernel for transparent huge pages (MADV_HUGEPAGE) on large arrays; with
    the common THP defrag setting "madvise" the first touch then compacts memory
    synchronously, which made filling the matrix ~3x slower here (0.88 s vs 0.27 s of CPU
    for 420 MB, measured). Small arrays keep numpy's allocator.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes < (64 << 20):
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


def array_view(array: Array) -> np.ndarray:
    """The Array's values as a read-only view on its bytes (no copy), equal to ``array.numpy()``.

    Falls back to ``array.numpy()`` for anything np.save would not write for a C-ordered
    array of the declared dtype and shape (another serialiser, Fortran order, npy v2).
    """
    if array.stype == NUMPY_STYPE:
        shape = tuple(int(s) for s in array.shape)
        header = npy_header(str(array.dtype), shape)
        data = array.data
        dtype = np.dtype(array.dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if len(data) == len(header) + count * dtype.itemsize and data[: len(header)] == header:
            return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)
    return array.numpy()


def array_from_values(values: np.ndarray) -> Array:
    """An Array holding ``values`` with one copy (into its bytes); equal to ``Array(values)``."""
    if not values.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        values = values.copy(order="C")
    shape = tuple(int(s) for s in values.shape)
    dtype = str(values.dtype)
    return _array(memoryview(values).cast("B"), dtype, shape, npy_header(dtype, shape))


def _array(raw: memoryview, dtype: str, shape: tuple[int, ...], header: bytes) -> Array:
    """The Array of C-ordered raw bytes whose .npy header is known (the per-tensor hot path of mix)."""
    return Array(dtype=dtype, shape=shape, stype=NUMPY_STYPE, data=b"".join((header, raw)))


class ArrayLayoutError(ValueError):
    """Clients sent arrays with different names, shapes or non-float dtypes."""


@dataclass(frozen=True)
class FlatLayout:
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[int, ...]  # start of each tensor in the flat vector
    size: int  # total number of parameters D

    @classmethod
    def of(cls, record: ArrayRecord) -> "FlatLayout":
        keys, shapes, dtypes, offsets = [], [], [], []
        offset = 0
        for key, array in record.items():
            dtype = np.dtype(array.dtype)
            if not np.issubdtype(dtype, np.floating):
                raise ArrayLayoutError(
                    f"array {key!r} has dtype {dtype}; only floating-point arrays (LoRA weights) can be aggregated."
                )
            shape = tuple(int(s) for s in array.shape)
            keys.append(key)
            shapes.append(shape)
            dtypes.append(dtype)
            offsets.append(offset)
            offset += int(np.prod(shape, dtype=np.int64))
        return cls(tuple(keys), tuple(shapes), tuple(dtypes), tuple(offsets), offset)

    def check(self, record: ArrayRecord, who: str = "a client") -> None:
        if set(record.keys()) != set(self.keys):  # order does not matter: tensors are looked up by name
            extra, missing = sorted(set(record.keys()) - set(self.keys)), sorted(set(self.keys) - set(record.keys()))
            raise ArrayLayoutError(
                f"{who} sent different tensors (unexpected {extra[:3]}, missing {missing[:3]}): "
                "every client must use the same LoRA configuration (lora.* settings)."
            )
        for key, shape in zip(self.keys, self.shapes):
            got = tuple(int(s) for s in record[key].shape)
            if got != shape:
                raise ArrayLayoutError(f"{who} sent {key!r} with shape {got}, expected {shape}.")

    def flatten_into(self, record: ArrayRecord, row: np.ndarray) -> None:
        """Write the record's tensors into one row of a preallocated matrix (no temporary vector)."""
        for key, offset, shape in zip(self.keys, self.offsets, self.shapes):
            size = int(np.prod(shape, dtype=np.int64))
            row[offset : offset + size] = array_view(record[key]).reshape(-1)

    def stack(
        self, records: Sequence[ArrayRecord], dtype: np.dtype = np.float32, names: Sequence[str] = (),
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """(len(records), D) matrix, one flattened record per row; into ``out`` when it has that shape and dtype."""
        shape = (len(records), self.size)
        if out is None or out.shape != shape or out.dtype != np.dtype(dtype):
            out = large_empty(shape, dtype)
        for i, record in enumerate(records):
            self.check(record, names[i] if i < len(names) else f"record {i}")
            self.flatten_into(record, out[i])
        return out

    def unflatten(self, row: np.ndarray) -> ArrayRecord:
        """An ArrayRecord with the original keys, shapes and dtypes from one flat row."""
        arrays = {}
        for key, offset, shape, dtype in zip(self.keys, self.offsets, self.shapes, self.dtypes):
            size = int(np.prod(shape, dtype=np.int64))
            arrays[key] = array_from_values(row[offset : offset + size].reshape(shape).astype(dtype, copy=False))
        return ArrayRecord(arrays)

    def sizes(self) -> list[int]:
        return list(self._sizes)

    @functools.cached_property
    def _sizes(self) -> tuple[int, ...]:  # values per tensor, computed once (the block loops ask often)
        return tuple(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes)

    def tensor(self, stacked: np.ndarray, key: str) -> np.ndarray:
        """Every client's tensor ``key`` as a (N, *shape) view on the stacked matrix (no copy)."""
        index = self.keys.index(key)
        size = self.sizes()[index]
        offset = self.offsets[index]
        return stacked[:, offset : offset + size].reshape((stacked.shape[0], *self.shapes[index]))

    def lora_pairs(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(lora_A key, lora_B key) of every LoRA module, and the keys outside any pair.

        Peft names a module's factors ``...lora_A...`` (r x k) and ``...lora_B...`` (d x r).
        """
        pairs, paired = [], set()
        for key in self.keys:
            if "lora_A" in key:
                partner = key.replace("lora_A", "lora_B")
                if partner not in self.keys:
                    raise ArrayLayoutError(f"{key!r} has no matching {partner!r}: cannot form its LoRA product B A.")
                pairs.append((key, partner))
                paired.update((key, partner))
        orphans = [k for k in self.keys if "lora_B" in k and k not in paired]
        if orphans:
            raise ArrayLayoutError(f"{orphans[0]!r} has no matching lora_A tensor: cannot form its LoRA product B A.")
        return pairs, [k for k in self.keys if k not in paired]

    def tensor_groups(self, block_columns: int) -> list[tuple[int, int]]:
        """Consecutive tensors [t0, t1) of at most ``block_columns`` values together (a larger
        tensor forms a group of its own): the column blocks of the streamed aggregation."""
        if block_columns < 1:
            raise ArrayLayoutError(f"block_columns={block_columns} must be >= 1.")
        sizes, groups, index = self._sizes, [], 0
        while index < len(self.keys):
            stop = index + 1
            while stop < len(self.keys) and self.offsets[stop] + sizes[stop] - self.offsets[index] <= block_columns:
                stop += 1
            groups.append((index, stop))
            index = stop
        return groups

    def columns(self, t0: int, t1: int) -> tuple[int, int]:
        """The flat columns [lo, hi) of tensors t0 .. t1-1."""
        return self.offsets[t0], self.offsets[t1 - 1] + self._sizes[t1 - 1]

    def gather(self, records: Sequence[ArrayRecord], t0: int, t1: int, out: np.ndarray) -> np.ndarray:
        """Tensors t0 .. t1-1 of every record as one (len(records), cols) block, copied from views
        on the records' bytes into ``out`` (a reused buffer of at least that many values)."""
        lo, hi = self.columns(t0, t1)
        block = out[: len(records) * (hi - lo)].reshape(len(records), hi - lo)
        spans = [(self.keys[t], self.offsets[t] - lo, self._sizes[t]) for t in range(t0, t1)]
        for i, record in enumerate(records):
            for key, start, size in spans:
                block[i, start : start + size] = array_view(record[key]).reshape(-1)
        return block

    def blocks(
        self, records: Sequence[ArrayRecord], block_columns: int, reference: Sequence[ArrayRecord] | None = None,
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(t0, t1, block) over the whole layout: the uploads (N, cols) of tensors t0 .. t1-1, minus
        the same tensors of ``reference`` when given. The block is one reused buffer: use it
        before asking for the next. Peak memory: one or two blocks, never an (N, D) matrix."""
        groups = self.tensor_groups(block_columns)
        largest = max((np.subtract(*self.columns(a, b)[::-1]) for a, b in groups), default=0)
        buffer = np.empty(len(records) * int(largest), dtype=np.float32)
        other = np.empty_like(buffer) if reference is not None else None
        for t0, t1 in groups:
            block = self.gather(records, t0, t1, buffer)
            if reference is not None:
                block -= self.gather(reference, t0, t1, other)
            yield t0, t1, block

    def gathered(self, records: Sequence[ArrayRecord], key: str) -> np.ndarray:
        """Tensor ``key`` of every record as one (N, *shape) float32 array (a copy)."""
        return np.stack([array_view(record[key]) for record in records]).astype(np.float32, copy=False)

    def mix(self, weights: np.ndarray, records: Sequence[ArrayRecord],
            block_columns: int = MIX_BLOCK_COLUMNS) -> list[ArrayRecord]:
        """One ArrayRecord per row of ``weights @ uploads``, streamed block by block (:meth:`mixed_blocks`)."""
        rows = RecordRows(self, weights.shape[0])
        for t0, t1, block in self.mixed_blocks(weights, records, block_columns):
            rows.add(t0, t1, block)
        return rows.records()

    def mixed_blocks(self, weights: np.ndarray, records: Sequence[ArrayRecord], block_columns: int
                     ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(t0, t1, W @ block): the weighted sums of the uploads, for tensors t0 .. t1-1 at a time.

        Each block is one BLAS product (M, N) @ (N, cols) on a block gathered from the records
        (:meth:`blocks`), into one reused buffer: a fresh multi-MB result per block costs page
        faults that took longer than the product itself (measured, issue 14).
        """
        m, n = weights.shape
        if n != len(records):
            raise ArrayLayoutError(f"weights {weights.shape} do not fit {len(records)} uploads.")
        w = np.ascontiguousarray(weights, dtype=np.float32)
        groups = self.tensor_groups(block_columns)
        largest = max((np.subtract(*self.columns(a, b)[::-1]) for a, b in groups), default=0)
        buffer = np.empty(m * int(largest), dtype=np.float32)
        for t0, t1, block in self.blocks(records, block_columns):
            out = buffer[: m * block.shape[1]].reshape(m, block.shape[1])
            yield t0, t1, weighted_sums(w, block, out)

    def group_bytes(self, t0: int, t1: int, block: np.ndarray, row: int) -> list[memoryview]:
        """Row ``row`` of a float32 block of tensors t0 .. t1-1 as one raw-bytes view per tensor,
        in each tensor's own dtype (a view when that is float32, else a converted copy)."""
        lo, _ = self.columns(t0, t1)
        parts = []
        for t in range(t0, t1):
            start = self.offsets[t] - lo
            values = block[row, start : start + self._sizes[t]]
            if self.dtypes[t] != values.dtype:
                values = values.astype(self.dtypes[t])
            parts.append(memoryview(values).cast("B"))
        return parts


def weighted_sums(weights: np.ndarray, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """W @ block on one BLAS thread (see MIX_BLAS_THREADS)."""
    with threadpool_limits(limits=MIX_BLAS_THREADS, user_api="blas"):
        return np.matmul(weights, block, out=out)


class RecordRows:
    """Collects the rows of streamed blocks (:meth:`FlatLayout.mixed_blocks`) into ArrayRecords:
    each tensor of each row is copied once, into its new Array's bytes."""

    def __init__(self, layout: FlatLayout, rows: int) -> None:
        self.layout = layout
        self.arrays: list[dict[str, Array]] = [{} for _ in range(rows)]
        # Per tensor, once: dtype name and .npy header (str(dtype) alone cost ~20 us per Array).
        self._dtypes = [str(dt) for dt in layout.dtypes]
        self._headers = [npy_header(dt, shape) for dt, shape in zip(self._dtypes, layout.shapes)]

    def add(self, t0: int, t1: int, block: np.ndarray, rows: range | None = None) -> None:
        """Rows ``rows`` of the block (default: all) become rows 0, 1, ... of this collection."""
        layout = self.layout
        for target, row in enumerate(rows if rows is not None else range(block.shape[0])):
            for t, raw in zip(range(t0, t1), layout.group_bytes(t0, t1, block, row)):
                self.arrays[target][layout.keys[t]] = _array(raw, self._dtypes[t], layout.shapes[t], self._headers[t])

    def records(self) -> list[ArrayRecord]:
        return [ArrayRecord(a) for a in self.arrays]


def to_numpy_dict(record: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    """Plain, picklable form of an ArrayRecord (keeps key order)."""
    if record is None:
        return None
    return {key: array.numpy() for key, array in record.items()}  # copies: a checkpoint must own its data


def from_numpy_dict(arrays: dict[str, np.ndarray] | None) -> ArrayRecord | None:
    if arrays is None:
        return None
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
