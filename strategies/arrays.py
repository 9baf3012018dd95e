"""Conversions between Flower ArrayRecords and flat numpy matrices / plain dicts.

FELLRec works on each client's LoRA as one flat vector. :class:`FlatLayout` remembers
the names, shapes and dtypes of the tensors so a row of the (clients x parameters)
matrix can be turned back into an ArrayRecord with the same keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord


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
            row[offset : offset + size] = record[key].numpy().reshape(-1)

    def stack(
        self, records: Sequence[ArrayRecord], dtype: np.dtype = np.float32, names: Sequence[str] = ()
    ) -> np.ndarray:
        """(len(records), D) matrix, one flattened record per row."""
        out = np.empty((len(records), self.size), dtype=dtype)
        for i, record in enumerate(records):
            self.check(record, names[i] if i < len(names) else f"record {i}")
            self.flatten_into(record, out[i])
        return out

    def unflatten(self, row: np.ndarray) -> ArrayRecord:
        """An ArrayRecord with the original keys, shapes and dtypes from one flat row."""
        arrays = {}
        for key, offset, shape, dtype in zip(self.keys, self.offsets, self.shapes, self.dtypes):
            size = int(np.prod(shape, dtype=np.int64))
            arrays[key] = Array(np.ascontiguousarray(row[offset : offset + size].reshape(shape), dtype=dtype))
        return ArrayRecord(arrays)


def to_numpy_dict(record: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    """Plain, picklable form of an ArrayRecord (keeps key order)."""
    if record is None:
        return None
    return {key: array.numpy() for key, array in record.items()}


def from_numpy_dict(arrays: dict[str, np.ndarray] | None) -> ArrayRecord | None:
    if arrays is None:
        return None
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
