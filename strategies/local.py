"""Local-only baseline: no aggregation, every client keeps training its own adapter."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

from .arrays import FlatLayout
from .personal import PersonalisedBase


class LocalOnly(PersonalisedBase):
    """Each client gets back its own last upload; all start from the initial arrays."""

    def personal_weights(
        self,
        server_round: int,
        collected: list[tuple[int, int, Message]],
        layout: FlatLayout,
        uploads: list[ArrayRecord],
    ) -> None:
        return None  # each client keeps its own upload
