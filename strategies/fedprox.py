"""FedProx baseline: Flower's FedProx (the client adds the proximal term) plus recording."""

from __future__ import annotations

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedProx

from .base import StrategyBase


class RecordingFedProx(StrategyBase, FedProx):
    """Flower's FedProx; "proximal-mu" travels in every train message's config."""

    def add_train_config(self, config: ConfigRecord, node_id: int) -> None:
        super().add_train_config(config, node_id)
        # StrategyBase builds the messages itself, so FedProx.configure_train's injection is redone here.
        config["proximal-mu"] = float(self.proximal_mu)
