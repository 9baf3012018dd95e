"""Local-only baseline: no aggregation, every client keeps training its own adapter."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from .arrays import FlatLayout
from .personal import PersonalisedBase


class LocalOnly(PersonalisedBase):
    """Each client gets back its own last upload; all start from the initial arrays."""

    def personalise(
        self,
        server_round: int,
        collected: list[tuple[int, int, Message]],
        layout: FlatLayout,
        stacked: np.ndarray,
    ) -> dict[int, ArrayRecord]:
        return {key: reply.content[self.arrayrecord_key] for key, _, reply in collected}
