"""Server strategies: FELLRec (and its ``fellrec+`` preset) and the FedAvg / FedProx /
FFA-LoRA / FedSA-LoRA / local-only baselines.

All of them are Flower ``FedAvg`` subclasses whose rounds run in Flower's own
``Strategy.start``; :class:`strategies.base.StrategyBase` adds what Flower lacks (per-node
messages, per-client records, resume, node wait, early stop), so the ServerApp drives them
the same way:

    strategy = make_strategy(cfg)
    strategy.load_state_dict(ckpt)                     # optional resume
    result = strategy.start(grid, initial_arrays, num_rounds, train_config=...,
                            evaluate_config=ConfigRecord({"split": "valid"}),
                            on_round_end=write_checkpoint)
    strategy.personal_arrays(client_key)               # each client's adapter
"""

from __future__ import annotations

import math
from pathlib import Path

from fellrec_flwr.config import FellRecConfig

from .base import NoNodesConnectedError, StrategyBase
from .fedavg import RecordingFedAvg
from .fedprox import RecordingFedProx
from .fedsa_lora import FedSaLora
from .fellrec import FellRec
from .fellrec_plus import preset_settings
from .ffa_lora import FfaLora
from .local import LocalOnly

PERSONAL_STATE_DIR = "personal-state"  # in the run folder, for personal-state = "disk"

__all__ = [
    "FedSaLora",
    "FellRec",
    "FfaLora",
    "LocalOnly",
    "NoNodesConnectedError",
    "RecordingFedAvg",
    "RecordingFedProx",
    "StrategyBase",
    "make_strategy",
    "sampling_settings",
]


def sampling_settings(cfg: FellRecConfig) -> dict[str, float | int]:
    """Flower's sampling knobs from min-clients and fraction-train.

    Flower samples max(int(connected * fraction), min_train_nodes) nodes, so setting
    min_train_nodes = min_clients would silently ignore a fraction < 1. Instead:
    - min_available_nodes = min_clients: the round waits (up to node-wait-timeout) for them;
    - min_train_nodes = ceil(fraction * min_clients) (>= 1): the fraction takes effect;
    - every connected client is evaluated (fraction_evaluate = 1), since the method reports
      per-client metrics and each client picks its own best adapter.
    """
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": max(1, math.ceil(cfg.fraction_train * cfg.min_clients)),
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
    }


def make_strategy(cfg: FellRecConfig, run_dir: str | Path | None = None) -> StrategyBase:
    """The strategy named by cfg.strategy (one of fellrec_flwr.config.STRATEGIES).

    ``run_dir``: the run folder, where personal-state = "disk" keeps the clients' adapters
    (``personal-state/``); needed only then.
    """
    common = dict(
        sampling_settings(cfg),
        eval_interval=cfg.eval.interval,
        early_stop_patience=cfg.eval.early_stop_patience,
        node_wait_timeout=cfg.node_wait_timeout,
        seed=cfg.seed,
        aggregation_block_mb=cfg.aggregation_block_mb,
    )
    personal: dict[str, Path] = {}  # for the strategies that keep an adapter per client
    if cfg.personal_state == "disk":
        if run_dir is None:
            raise ValueError("personal-state='disk' keeps each client's adapter in the run folder: pass run_dir "
                             "to make_strategy, or set personal-state='memory'.")
        personal["state_dir"] = Path(run_dir) / PERSONAL_STATE_DIR
    if cfg.strategy == "fedavg":
        return RecordingFedAvg(**common)
    if cfg.strategy == "fedprox":
        return RecordingFedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "local":
        return LocalOnly(**common, **personal)
    if cfg.strategy == "ffa-lora":
        return FfaLora(**common)
    if cfg.strategy == "fedsa-lora":
        return FedSaLora(**common, **personal)
    if cfg.strategy in ("fellrec", "fellrec+"):
        return FellRec(cfg.fellrec if cfg.strategy == "fellrec" else preset_settings(cfg.fellrec), **common, **personal)
    raise ValueError(f"strategy={cfg.strategy!r} is not one of fellrec, fellrec+, fedavg, fedprox, ffa-lora, "
                     "fedsa-lora, local.")
