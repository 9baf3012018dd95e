"""FedAvg baseline: Flower's own FedAvg plus this project's recording, resume and node wait."""

from __future__ import annotations

from .base import StrategyBase


class RecordingFedAvg(StrategyBase):
    """Flower's FedAvg aggregation; every client's personal adapter is the global one."""
