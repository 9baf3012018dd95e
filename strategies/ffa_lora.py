"""FFA-LoRA baseline (Sun et al., ICLR 2024, "Improving LoRA in Privacy-preserving Federated Learning").

Federated Freeze-A LoRA: every client keeps LoRA's A at the shared random initialisation
(the server sends it; clients freeze it), trains only B (initialised at zero), and the
server averages B as FedAvg does. Because A is the same for everyone, the average of the
clients' products is exact: mean_i(B_i A) = (mean_i B_i) A, which plain FedAvg of (A, B)
is not. The clients learn to freeze A from the "freeze-lora-a" flag in every train message.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from .arrays import array_view
from .base import StrategyBase

FREEZE_LORA_A = "freeze-lora-a"


class LoraANotFrozenError(ValueError):
    """A client changed lora_A although FFA-LoRA asked it to keep A frozen."""


def lora_a_keys(record: ArrayRecord) -> list[str]:
    return [key for key in record.keys() if "lora_A" in key]


def check_a_unchanged(initial: ArrayRecord, uploads: Iterable[tuple[int, ArrayRecord]]) -> None:
    """Raise naming the first client whose lora_A differs from the shared initialisation."""
    keys = lora_a_keys(initial)
    for client, record in uploads:
        for key in keys:
            if not np.array_equal(array_view(record[key]), array_view(initial[key])):
                raise LoraANotFrozenError(
                    f"client-key {client} changed {key!r}: FFA-LoRA needs clients that freeze lora_A (the "
                    f"{FREEZE_LORA_A!r} train-config flag); update the ClientApp or use strategy='fedavg'."
                )


class FfaLora(StrategyBase):
    """FedAvg of B with A frozen at the initial arrays; every client's adapter is the global one."""

    def add_train_config(self, config: ConfigRecord, node_id: int) -> None:
        super().add_train_config(config, node_id)
        config[FREEZE_LORA_A] = True

    def aggregate_arrays(self, server_round: int, collected: list[tuple[int, int, Message]]) -> ArrayRecord:
        arrays = super().aggregate_arrays(server_round, collected)
        if self.initial_arrays is None:
            return arrays
        uploads = [(key, reply.content[self.arrayrecord_key]) for key, _, reply in collected]
        check_a_unchanged(self.initial_arrays, uploads)
        # The weighted mean of identical A's can differ in the last bit: keep the initial A exactly.
        for key in lora_a_keys(self.initial_arrays):
            arrays[key] = self.initial_arrays[key]
        return arrays
