"""FedSA-LoRA baseline (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in FL").

Federated Share-A LoRA: clients train both LoRA factors, but only the A matrices are
shared: the server averages A (weighted by examples, as FedAvg) and every client keeps its
own B. The paper's finding is that A learns knowledge common to all clients and B the
client-specific part, so this is a personalised baseline. Tensors outside any LoRA pair
(none with the default settings) are shared like A.

Here clients still upload B (the server keeps it for them, as the local-only baseline
does); in the paper B never leaves the client, which halves the upload. The aggregation
result is the same.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

from .arrays import FlatLayout
from .personal import PersonalisedBase


def is_personal_key(key: str) -> bool:
    """B stays with its client; everything else (A, other tensors) is averaged."""
    return "lora_B" in key


def share_a(shared: ArrayRecord, own: ArrayRecord) -> ArrayRecord:
    """A client's adapter: the shared tensors from ``shared``, its own B from ``own`` (key order of ``own``)."""
    return ArrayRecord({key: own[key] if is_personal_key(key) else shared[key] for key in own.keys()})


class FedSaLora(PersonalisedBase):
    """Each client: the size-weighted mean A of this round's uploads with its own last B.

    The personal store keeps each client's last upload; its adapter is composed when it is
    read (:func:`share_a` of the current mean and that upload), so that a round rewrites the
    sampled clients' state only, and clients not sampled get the new shared A all the same.
    """

    def personal_arrays(self, client_key: int) -> ArrayRecord | None:
        own = self.personal.get(client_key)
        if own is None:
            return self.initial_arrays
        return own if self.global_arrays is None else share_a(self.global_arrays, own)

    def arrays_for_node(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        key = self.node_to_key.get(node_id)
        if key is not None and key in self.personal:
            return self.personal_arrays(key)  # type: ignore[return-value]
        # A new client joins with the current shared A and the initial B (zero).
        initial = self.initial_arrays if self.initial_arrays is not None else arrays
        if self.global_arrays is None or self.global_arrays is initial:
            return initial
        return share_a(self.global_arrays, initial)

    def personal_weights(
        self,
        server_round: int,
        collected: list[tuple[int, int, Message]],
        layout: FlatLayout,
        uploads: list[ArrayRecord],
    ) -> None:
        return None  # the store keeps each upload (its B); A is the mean, shared when read
