"""Round checkpoints: everything needed to continue a stopped run.

A checkpoint holds the last finished (absolute) round, the strategy's state (per-client
LoRA, losses, warm weights, node map), the global arrays, the metric rows written so far
and the resolved config. It is written atomically after every round, so a crash leaves
the previous round's checkpoint intact.

Format (version 2): one safetensors file, ``checkpoint.safetensors``. The arrays are its
tensors; everything else is JSON in its ``__metadata__`` (key ``fellrec.checkpoint``), with
arrays replaced by references to tensor names. Reading it can only ever produce numbers,
strings, lists and dicts -- unlike the pickle of version 1, a crafted file cannot run code.
Anything else (a pickle, another safetensors file, an unknown version) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fellrec_flwr.atomic import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.safetensors"
LEGACY_NAME = "checkpoint.pkl"
FORMAT_NAME = "fellrec-checkpoint"
FORMAT_VERSION = 2
_META_KEY = "fellrec.checkpoint"
_MAX_STATE_BYTES = 64 << 20  # the JSON part; a bigger one is not ours


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from an incompatible run."""


@dataclass
class Checkpoint:
    round: int
    strategy_state: dict[str, Any]
    global_arrays: dict[str, np.ndarray]
    metric_rows: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


def checkpoint_path(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    return path if path.suffix in (".safetensors", ".pkl", ".pt") else path / CHECKPOINT_NAME


# -- encoding: plain JSON + named arrays --------------------------------------------------------
# Tagged objects keep what JSON cannot say: tuples (random.getstate() needs them), dicts with
# non-string keys (node ids), numpy arrays (stored as tensors) and numpy scalars.


def _encode(obj: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise CheckpointError(f"{where}: an object array cannot be stored in a checkpoint.")
        name = f"a{len(arrays)}"
        arrays[name] = np.ascontiguousarray(obj)
        return {"$array": name}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, arrays, f"{where}.{k}") for k, v in obj.items()}
        return {"$dict": [[_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k!r}]")]
                          for k, v in obj.items()]}
    if hasattr(obj, "numpy") and hasattr(obj, "detach"):  # a torch tensor
        return _encode(obj.detach().cpu().numpy(), arrays, where)
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint "
                          "(only numbers, strings, lists, tuples, dicts and numpy arrays).")


def _decode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "$array":
                if not isinstance(value, str) or value not in arrays:
                    raise CheckpointError(f"the checkpoint refers to a missing array {str(value)[:40]!r}.")
                return arrays[value]
            if tag == "$tuple":
                return tuple(_decode(v, arrays) for v in value)
            if tag == "$dict":
                return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in value}
        return {k: _decode(v, arrays) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


# -- files ----------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    from safetensors.numpy import save

    path = Path(run_dir)
    path = path / CHECKPOINT_NAME if path.suffix != ".safetensors" else path
    arrays: dict[str, np.ndarray] = {}
    state = _encode(dict(ckpt.__dict__), arrays, "checkpoint")
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION),
            _META_KEY: json.dumps(state, separators=(",", ":"))}
    atomic_write_bytes(path, save(arrays, metadata=meta))
    return path


def _refuse_legacy(path: Path) -> None:
    if path.suffix in (".pkl", ".pt") or (path.is_dir() and (path / LEGACY_NAME).exists()):
        raise CheckpointError(
            f"{path} is a checkpoint in the old pickle format, which this release refuses to read: unpickling "
            "a file can run arbitrary code. Resume with the release that wrote it, or start the run again; "
            f"this release writes {CHECKPOINT_NAME} (safetensors + JSON).")


def load_checkpoint(run_or_file: str | Path) -> Checkpoint:
    given = Path(run_or_file)
    if not given.is_dir() or not (given / CHECKPOINT_NAME).exists():
        _refuse_legacy(given)
    path = checkpoint_path(given)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"resume-from {given} is not a checkpoint: name a run folder or its {CHECKPOINT_NAME}.")
    if not path.exists():
        raise CheckpointError(
            f"No checkpoint at {path}. resume-from must name a run folder written by a previous run "
            f"(it holds {CHECKPOINT_NAME}) or the checkpoint file itself."
        )
    arrays, meta = _read(path)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is a safetensors file but not a FELLRec checkpoint (no format "
                              f"{FORMAT_NAME!r} in its metadata).")
    if meta.get("version") != str(FORMAT_VERSION):
        raise CheckpointError(f"Checkpoint {path} has format version {str(meta.get('version'))[:16]!r}; this release "
                              f"reads version {FORMAT_VERSION}.")
    raw = meta.get(_META_KEY, "")
    if len(raw) > _MAX_STATE_BYTES:
        raise CheckpointError(f"Checkpoint {path}: its state is implausibly large ({len(raw)} bytes).")
    try:
        payload = _decode(json.loads(raw), arrays)
        return Checkpoint(**payload)
    except (ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(f"Checkpoint {path} is unreadable ({str(err)[:200]}); delete it or resume from "
                              "another run.") from None


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
            arrays = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as err:  # noqa: BLE001 - the Rust reader raises its own error types
        raise CheckpointError(f"Checkpoint {path} is not a readable safetensors file ({str(err)[:200]}); delete it "
                              "or resume from another run.") from None
    return arrays, meta
