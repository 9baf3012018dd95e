"""Conversions between Flower ArrayRecords and flat numpy matrices / plain dicts.

FELLRec works on each client's LoRA as one flat vector. :class:`FlatLayout` remembers
the names, shapes and dtypes of the tensors so a row of the (clients x parameters)
matrix can be turned back into an ArrayRecord with the same keys.

Copies are what made the aggregation slow at 7B scale (issue 14): a Flower ``Array`` holds
its values as ``.npy`` bytes, and ``Array.numpy()`` / ``Array(ndarray)`` each parse or
write them through a BytesIO. Here values are read as read-only views on those bytes
(:func:`array_view`) and written with exactly one copy into the new bytes
(:func:`array_from_values`); :meth:`FlatLayout.mix` applies weights to the stacked uploads
in column blocks, so the aggregates never exist as a second full (N, D) matrix.
"""

from __future__ import annotations

import functools
import io
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from threadpoolctl import threadpool_limits

NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: data is np.save output
# Columns of one block of W @ X in FlatLayout.mix: 2**17 float32 columns x 101 rows = 53 MB
# (small next to X, large enough for BLAS to run at full speed).
MIX_BLOCK_COLUMNS = 1 << 17
# BLAS threads for the blocks of W @ X: one, as for the Gram matrix (strategies/fellrec_math.py):
# the server shares its cores with ClientApps, and waiting BLAS threads spin on a busy machine.
MIX_BLAS_THREADS = 1


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
        return [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]

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

    def mix(self, weights: np.ndarray, stacked: np.ndarray, block_columns: int = MIX_BLOCK_COLUMNS
            ) -> list[ArrayRecord]:
        """One ArrayRecord per row of ``weights @ stacked``, built block by block.

        Tensors are grouped into column blocks of about ``block_columns``; each block is one
        BLAS product (M, N) @ (N, cols) on a view of ``stacked``, and every tensor of it is
        copied once into its client's new Array bytes. Peak extra memory is the new records
        (M x D values, as Flower stores them) plus one block, never a full (M, D) product.
        """
        m, n = weights.shape
        if n != stacked.shape[0] or stacked.shape[1] != self.size:
            raise ArrayLayoutError(f"weights {weights.shape} / stacked {stacked.shape} do not fit {self.size} params.")
        w = np.ascontiguousarray(weights, dtype=stacked.dtype)
        arrays: list[dict[str, Array]] = [{} for _ in range(m)]
        sizes = self.sizes()
        # One buffer for every block: a fresh multi-MB result per block costs page faults
        # (and THP compaction) that took longer than the product itself (measured, issue 14).
        buffer = np.empty(m * min(max(block_columns, max(sizes, default=0)), self.size), dtype=stacked.dtype)
        # Per tensor, once: dtype name and .npy header (str(dtype) alone cost ~20 us per Array).
        dtypes = [str(dt) for dt in self.dtypes]
        headers = [npy_header(dt, shape) for dt, shape in zip(dtypes, self.shapes)]
        same_dtype = all(dt == stacked.dtype for dt in self.dtypes)
        index = 0
        while index < len(self.keys):
            stop = index + 1  # tensors index..stop-1 form one block (at least one tensor)
            while stop < len(self.keys) and self.offsets[stop] + sizes[stop] - self.offsets[index] <= block_columns:
                stop += 1
            lo, hi = self.offsets[index], self.offsets[stop - 1] + sizes[stop - 1]
            with threadpool_limits(limits=MIX_BLAS_THREADS, user_api="blas"):
                block = np.matmul(w, stacked[:, lo:hi], out=buffer[: m * (hi - lo)].reshape(m, hi - lo))
            rows = memoryview(block).cast("B") if same_dtype else None
            row_bytes = (hi - lo) * block.itemsize
            for t in range(index, stop):
                start = self.offsets[t] - lo
                key, shape, header = self.keys[t], self.shapes[t], headers[t]
                for i in range(m):
                    if rows is not None:  # bytes straight from the block row: no intermediate array
                        first = i * row_bytes + start * block.itemsize
                        raw = rows[first : first + sizes[t] * block.itemsize]
                    else:
                        raw = memoryview(block[i, start : start + sizes[t]].astype(self.dtypes[t])).cast("B")
                    arrays[i][key] = _array(raw, dtypes[t], shape, header)
            index = stop
        return [ArrayRecord(a) for a in arrays]


def to_numpy_dict(record: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    """Plain, picklable form of an ArrayRecord (keeps key order)."""
    if record is None:
        return None
    return {key: array.numpy() for key, array in record.items()}  # copies: a checkpoint must own its data


def from_numpy_dict(arrays: dict[str, np.ndarray] | None) -> ArrayRecord | None:
    if arrays is None:
        return None
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
