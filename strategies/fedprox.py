"""FedProx baseline: Flower's FedProx (the client adds the proximal term) plus recording."""

from __future__ import annotations

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedProx

from .base import StrategyBase


class RecordingFedProx(StrategyBase, FedProx):
    """Flower's FedProx; "proximal-mu" travels in every train message's config."""

    def add_train_config(self, config: ConfigRecord, node_id: int) -> None:
        super().add_train_config(config, node_id)
        # FedProx.configure_train would put it into the shared config; StrategyBase.configure_train
        # builds each node's config itself and does not call it.
        config["proximal-mu"] = float(self.proximal_mu)
