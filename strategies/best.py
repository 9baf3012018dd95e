"""Each client's best adapter and early stopping, which Flower 1.42's loop does not keep.

The authors test each client with the adapter of the round where its OWN validation loss was
lowest (``best_client{i}``); early stopping looks at the validation loss weighted by each
client's number of examples. Both are fed once per validation round by the strategy
(:meth:`strategies.base.StrategyBase.aggregate_evaluate`) and checkpointed with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord

from .arrays import from_numpy_dict, to_numpy_dict
from .store import DiskRecordStore, MemoryRecordStore


@dataclass
class BestAdapters:
    patience: int = 0  # validation rounds without a better weighted loss before stopping; 0 = never
    best_loss: float = math.inf
    best_round: int = 0
    evals_since_best: int = 0
    stopped_early: bool = False
    client_best: dict[int, tuple[int, float]] = field(default_factory=dict)  # key -> (round, valid loss)
    # key -> its best adapter; a DiskRecordStore for personal-state = "disk" (strategies.personal)
    arrays: MemoryRecordStore | DiskRecordStore = field(default_factory=MemoryRecordStore)

    def observe(self, server_round: int, evaluations: Iterable[tuple[int, float, float, ArrayRecord]]) -> float | None:
        """One validation round: (client key, valid loss, examples, the arrays it was evaluated
        with) per client. Returns the size-weighted loss (None without examples)."""
        total = weight = 0.0
        for key, loss, examples, arrays in evaluations:
            if loss < self.client_best.get(key, (0, math.inf))[1]:
                self.client_best[key] = (server_round, loss)
                self.arrays.put(key, arrays, server_round)
            total += loss * examples
            weight += examples
        if weight <= 0:
            return None
        loss = total / weight
        if loss < self.best_loss:
            self.best_loss, self.best_round, self.evals_since_best = loss, server_round, 0
        else:
            self.evals_since_best += 1
        if self.patience and self.evals_since_best >= self.patience:
            self.stopped_early = True
        return loss

    def state(self) -> dict[str, Any]:
        scalars = {"best_loss": self.best_loss, "best_round": self.best_round,
                   "evals_since_best": self.evals_since_best, "stopped_early": self.stopped_early,
                   "client_best": dict(self.client_best)}
        if isinstance(self.arrays, DiskRecordStore):
            return {**scalars, "best_files": self.arrays.state()}
        # Best adapters are often the same object (FedAvg's global): store each once.
        unique: dict[int, int] = {}
        best_arrays: list[dict[str, Any] | None] = []
        best_index: dict[int, int] = {}
        for key, record in self.arrays.items():
            if id(record) not in unique:
                unique[id(record)] = len(best_arrays)
                best_arrays.append(to_numpy_dict(record))
            best_index[key] = unique[id(record)]
        return {**scalars, "best_arrays": best_arrays, "best_index": best_index}

    def load(self, state: Mapping[str, Any]) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_round = int(state["best_round"])
        self.evals_since_best = int(state["evals_since_best"])
        self.stopped_early = bool(state["stopped_early"])
        self.client_best = {int(k): (int(r), float(l)) for k, (r, l) in state["client_best"].items()}
        if "best_files" in state and isinstance(self.arrays, DiskRecordStore):
            self.arrays.load(state["best_files"])
            return
        if "best_files" in state:
            saved: Any = DiskRecordStore.of_state(state["best_files"])
        else:
            restored = [from_numpy_dict(a) for a in state["best_arrays"]]
            saved = {int(k): restored[i] for k, i in state["best_index"].items()}
        if isinstance(self.arrays, MemoryRecordStore):
            self.arrays.clear()
        for key in saved:
            self.arrays.put(key, saved[key], self.client_best.get(key, (0, 0.0))[0])
