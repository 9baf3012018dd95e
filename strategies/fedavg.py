"""FedAvg baseline: Flower's own FedAvg plus this project's recording, resume and node wait."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from .base import StrategyBase


class RecordingFedAvg(StrategyBase, FedAvg):
    """Flower's FedAvg aggregation; every client's personal adapter is the global one."""
