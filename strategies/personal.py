"""Shared machinery of the strategies where every client has its own adapter (FELLRec, local-only)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from .arrays import FlatLayout, from_numpy_dict, to_numpy_dict
from .base import StrategyBase, metrics_of


class PersonalisedBase(StrategyBase):
    """Keeps one ArrayRecord per client key and sends each node its own.

    A node whose client is unknown (never replied, or could not be identified) gets the
    initial arrays: every client starts from the same point, which keeps round-0
    similarities meaningful. A client that is not sampled, or whose reply fails, keeps
    its last personal arrays. The "global" arrays returned to Flower's loop are the plain
    size-weighted mean of this round's uploads, for logging only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.personal: dict[int, ArrayRecord] = {}
        # Set by aggregate_arrays before personalise(): this round's size weights (sum 1), and
        # the size-weighted mean record if personalise() already built it.
        self.mean_weights: np.ndarray = np.zeros(0)
        self.round_mean: ArrayRecord | None = None
        self._stack_buffer: np.ndarray | None = None

    def has_personal_state(self) -> bool:
        return bool(self.personal)

    def personal_arrays(self, client_key: int) -> ArrayRecord | None:
        return self.personal.get(client_key, self.initial_arrays)

    def arrays_for_node(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        key = self.node_to_key.get(node_id)
        if key is not None and key in self.personal:
            return self.personal[key]
        return self.initial_arrays if self.initial_arrays is not None else arrays

    def personalise(
        self,
        server_round: int,
        collected: list[tuple[int, int, Message]],
        layout: FlatLayout,
        stacked: np.ndarray,
    ) -> dict[int, ArrayRecord]:
        """New personal arrays per client key from this round's uploads (one row of stacked each)."""
        raise NotImplementedError

    def aggregate_arrays(self, server_round: int, collected: list[tuple[int, int, Message]]) -> ArrayRecord:
        """Each replying client's new adapter (:meth:`personalise`); returns the size-weighted mean."""
        records = [reply.content[self.arrayrecord_key] for _, _, reply in collected]
        layout = FlatLayout.of(records[0])
        # One float32 (N, D) matrix, filled from views on the replies' bytes. It is kept for the
        # next round: faulting in fresh GBs costs more than copying into them (measured, issue 14).
        stacked = layout.stack(records, names=[f"client-key {key}" for key, _, _ in collected],
                               out=self._stack_buffer)
        self._stack_buffer = stacked
        sizes = np.array([float(metrics_of(reply.content)[self.weighted_by_key])  # type: ignore[arg-type]
                          for _, _, reply in collected])
        self.mean_weights = sizes / sizes.sum()
        self.round_mean = None
        self.personal.update(self.personalise(server_round, collected, layout, stacked))
        mean = self.round_mean  # a personalise() that mixes anyway computes it in the same product
        if mean is None:
            mean = layout.mix(self.mean_weights[None, :], stacked)[0]
        return mean

    def extra_state(self) -> dict[str, Any]:
        return {"personal": {key: to_numpy_dict(record) for key, record in self.personal.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.personal = {int(key): from_numpy_dict(arrays)  # type: ignore[misc]
                         for key, arrays in state["personal"].items()}
