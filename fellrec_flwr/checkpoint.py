"""Round checkpoints: everything needed to continue a stopped run.

A checkpoint holds the last finished (absolute) round, the strategy's state (per-client
LoRA, losses, warm weights, node map), the global arrays, the metric rows written so far
and the resolved config. It is written atomically after every round, so a crash leaves
the previous round's checkpoint intact. The file is a pickle of plain Python/numpy
objects written by this project: only load checkpoints you produced yourself.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fellrec_flwr.atomic import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pkl"
FORMAT_VERSION = 1


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
    return path if path.suffix == ".pkl" else path / CHECKPOINT_NAME


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    path = checkpoint_path(run_dir)
    payload = {"format": FORMAT_VERSION, **ckpt.__dict__}
    atomic_write_bytes(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def load_checkpoint(run_or_file: str | Path) -> Checkpoint:
    path = checkpoint_path(run_or_file)
    if not path.exists():
        raise CheckpointError(
            f"No checkpoint at {path}. resume-from must name a run folder written by a previous run "
            f"(it holds {CHECKPOINT_NAME}) or the checkpoint file itself."
        )
    try:
        payload = pickle.loads(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
        raise CheckpointError(f"Checkpoint {path} is unreadable ({err}); delete it or resume from another run.") from err
    if payload.pop("format", None) != FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint {path} has an unknown format version; it was written by another release.")
    return Checkpoint(**payload)
