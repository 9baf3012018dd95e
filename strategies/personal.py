"""Shared machinery of the strategies where every client has its own adapter (FELLRec, local-only, FedSA-LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from .arrays import FlatLayout, RecordRows, block_columns, from_numpy_dict, to_numpy_dict
from .base import StrategyBase, metrics_of
from .store import DiskRecordStore, MemoryRecordStore, make_store


class PersonalisedBase(StrategyBase):
    """Keeps one ArrayRecord per client key and sends each node its own.

    A node whose client is unknown (never replied, or could not be identified) gets the
    initial arrays: every client starts from the same point, which keeps round-0
    similarities meaningful. A client that is not sampled, or whose reply fails, keeps
    its last personal arrays. The "global" arrays returned to Flower's loop are the plain
    size-weighted mean of this round's uploads, for logging only.

    ``state_dir``: None keeps the personal and best adapters in memory (and in the
    checkpoint); a folder keeps them there, one file per client (personal-state = "disk",
    :mod:`strategies.store`), so that memory grows with the clients of a round only.
    """

    def __init__(self, *args: Any, state_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.personal: MemoryRecordStore | DiskRecordStore = make_store(
            None if state_dir is None else Path(state_dir) / "personal")
        if state_dir is not None:
            self.best.arrays = make_store(Path(state_dir) / "best")
        # Set by aggregate_arrays before personal_weights(): this round's size weights (sum 1).
        self.mean_weights: np.ndarray = np.zeros(0)

    def has_personal_state(self) -> bool:
        return bool(self.personal)

    def personal_arrays(self, client_key: int) -> ArrayRecord | None:
        return self.personal.get(client_key, self.initial_arrays)

    def arrays_for_node(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        key = self.node_to_key.get(node_id)
        if key is not None and key in self.personal:
            return self.personal[key]
        return self.initial_arrays if self.initial_arrays is not None else arrays

    def personal_weights(
        self,
        server_round: int,
        collected: list[tuple[int, int, Message]],
        layout: FlatLayout,
        uploads: list[ArrayRecord],
    ) -> np.ndarray | None:
        """W (N, N): client i's new adapter is sum_j W_ij upload_j (clients in ``collected`` order).
        None: every client keeps its own upload as it is."""
        raise NotImplementedError

    def aggregate_arrays(self, server_round: int, collected: list[tuple[int, int, Message]]) -> ArrayRecord:
        """Each replying client's new adapter (:meth:`personal_weights`); returns the size-weighted mean.

        Streamed: the uploads are read a block of tensors at a time (aggregation-block-mb), the
        new adapters and the mean come out of one product per block, each block's rows go to the
        personal store (memory, or each client's file on disk) as they are computed.
        """
        keys = [key for key, _, _ in collected]
        uploads = [reply.content[self.arrayrecord_key] for _, _, reply in collected]
        layout = FlatLayout.of(uploads[0])
        for key, record in zip(keys, uploads):
            layout.check(record, f"client-key {key}")
        sizes = np.array([float(metrics_of(reply.content)[self.weighted_by_key])  # type: ignore[arg-type]
                          for _, _, reply in collected])
        self.mean_weights = sizes / sizes.sum()
        weights = self.personal_weights(server_round, collected, layout, uploads)
        n = len(uploads)
        columns = block_columns(self.aggregation_block_mb, n + 1)
        mean = RecordRows(layout, 1)
        if weights is None:
            for key, record in zip(keys, uploads):
                self.personal.put(key, record, server_round)
            for t0, t1, block in layout.mixed_blocks(self.mean_weights[None, :], uploads, columns):
                mean.add(t0, t1, block)
            return mean.records()[0]
        # W and the size-weighted mean (the logging-only "global" arrays) in one product per block.
        mixing = np.vstack([weights, self.mean_weights[None, :]])
        with self.personal.writer(layout, keys, server_round) as personal:
            for t0, t1, block in layout.mixed_blocks(mixing, uploads, columns):
                personal.add(t0, t1, block, range(n))
                mean.add(t0, t1, block, range(n, n + 1))
        return mean.records()[0]

    def extra_state(self) -> dict[str, Any]:
        if isinstance(self.personal, DiskRecordStore):
            return {"personal_files": self.personal.state()}  # the files, not the arrays: memory stays bounded
        return {"personal": {key: to_numpy_dict(record) for key, record in self.personal.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        # Either kind of checkpoint into either kind of store (personal-state may change on resume).
        if "personal_files" in state:
            if isinstance(self.personal, DiskRecordStore):
                self.personal.load(state["personal_files"])
                return
            saved: Any = DiskRecordStore.of_state(state["personal_files"])
        else:
            saved = {int(key): from_numpy_dict(arrays) for key, arrays in state["personal"].items()}
        if isinstance(self.personal, MemoryRecordStore):
            self.personal.clear()
        for key in saved:
            self.personal.put(key, saved[key], self.round_offset)
