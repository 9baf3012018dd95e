"""Per-process runtime: prepared data, base model + LoRA, tokenizer and catalogue, built once.

In simulation one Ray actor serves many virtual clients, so the frozen base model is
built once per process and each message only swaps the LoRA weights in. Everything a
client needs is derived from the config, so any process (ServerApp, ClientApp,
centralized baseline) reconstructs the same objects.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fellrec_flwr.config import FellRecConfig
from fellrec_flwr.prepared import PreparedData

_CACHE: dict[str, "Runtime"] = {}


def cache_root() -> Path:
    """Where prepared data sets and converted models live unless data.prepared-dir is set."""
    return Path(os.environ.get("FELLREC_CACHE", Path.home() / ".cache" / "fellrec-flwr"))


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from (base seed, round, client, ...): same inputs -> same seed."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prepare_data(cfg: FellRecConfig) -> PreparedData:
    from data_prep.prepare import prepare

    path = prepare(cfg.data, cache_root(), seed=cfg.seed)
    return PreparedData.load(path)


@dataclass
class Runtime:
    cfg: FellRecConfig
    data: PreparedData
    model: Any  # a peft PeftModel around the base model
    tokenizer: Any
    initial_lora: dict[str, Any]  # the seeded LoRA init, before any training touched `model`
    _catalogue: Any = field(default=None, repr=False)

    @property
    def catalogue(self) -> Any:
        """Base-model embeddings of every catalogue title (public; cached on disk)."""
        if self._catalogue is None:
            from fellrec_flwr.grounding import Catalogue

            self._catalogue = Catalogue.build(
                self.model, self.tokenizer, self.data.titles, cache_dir=self.data.path / "catalogue",
                model_id=model_identity(self.cfg),
            )
        return self._catalogue


def model_identity(cfg: FellRecConfig) -> str:
    """What determines the base model's weights (for cache keys)."""
    return json.dumps({"model": asdict(cfg.model), "data": asdict(cfg.data), "seed": cfg.seed}, sort_keys=True)


def get_runtime(cfg: FellRecConfig) -> Runtime:
    key = json.dumps({"m": model_identity(cfg), "lora": asdict(cfg.lora), "split": asdict(cfg.split)}, sort_keys=True)
    if key not in _CACHE:
        import torch

        from fellrec_flwr.model import add_lora, load_base_model

        if cfg.model.name == "tiny":
            # Its matrices are too small to gain from threads; on shared cores extra
            # threads only contend (measured 15x slower with 2 threads under load).
            torch.set_num_threads(1)

        data = prepare_data(cfg)
        base, tokenizer = load_base_model(cfg.model, data.titles, data.path)
        from fellrec_flwr.lora_state import get_lora_state

        from fellrec_flwr.split_runtime import client_lora_settings

        model = add_lora(base, client_lora_settings(cfg, base.config.num_hidden_layers), seed=cfg.seed)
        _CACHE[key] = Runtime(cfg=cfg, data=data, model=model, tokenizer=tokenizer,
                              initial_lora=get_lora_state(model))
    return _CACHE[key]
