"""Per-process runtime: prepared data, base model + LoRA, tokenizer and catalogue, built once.

In simulation one Ray actor serves many virtual clients, so the frozen base model is
built once per process and each message only swaps the LoRA weights in. Everything a
client needs is derived from the config, so any process (ServerApp, ClientApp,
centralized baseline) reconstructs the same objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fellrec_flwr.config import FellRecConfig
from fellrec_flwr.paths import cache_root  # noqa: F401 (re-exported: where prepared data and models live)
from fellrec_flwr.data.prepared import PreparedData

_CACHE: dict[str, "Runtime"] = {}
_DATA: dict[str, PreparedData] = {}


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from (base seed, round, client, ...): same inputs -> same seed."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prepare_data(cfg: FellRecConfig) -> PreparedData:
    from fellrec_flwr.data.on_demand import prepare_folder

    key = json.dumps({"data": asdict(cfg.data), "seed": cfg.seed, "root": str(cache_root())}, sort_keys=True)
    if key not in _DATA:  # the ServerApp asks several times (LoRA shapes, baselines, adapters)
        _DATA[key] = PreparedData.load(prepare_folder(cfg.data, cache_root(), seed=cfg.seed))
    return _DATA[key]


@dataclass
class Runtime:
    cfg: FellRecConfig
    data: PreparedData
    model: Any  # a peft PeftModel around the base model
    tokenizer: Any
    initial_lora: dict[str, Any]  # the seeded LoRA init, before any training touched `model`
    _catalogue: Any = field(default=None, repr=False)
    nopeek: Any = None  # split.defence='nopeek': the hooked `split.nopeek.NoPeek` whose term training adds
    _groups: Any = field(default=None, repr=False)

    @property
    def groups(self) -> Any:
        """The catalogue's title groups (`fellrec_flwr.eval.grounding.TitleGroups`)."""
        if self._groups is None:
            from fellrec_flwr.eval.grounding import TitleGroups

            self._groups = TitleGroups.from_titles(self.data.titles)
        return self._groups

    @property
    def catalogue(self) -> Any:
        """Base-model embeddings of every catalogue title (public; cached on disk)."""
        if self._catalogue is None:
            from fellrec_flwr.eval.grounding import Catalogue

            self._catalogue = Catalogue.build(
                self.model, self.tokenizer, self.data.titles, cache_dir=self.data.path / "catalogue",
                model_id=model_identity(self.cfg) + _service_identity(self.model),
            )
        return self._catalogue


def _service_identity(model: Any) -> str:
    """For a split model, the service's weight probe: the cache key then covers the middle layers,
    which the client does not hold (its own fingerprint covers only its layers)."""
    from fellrec_flwr.split.client import RemoteBody

    body = next((m for m in model.modules() if isinstance(m, RemoteBody)), None)
    if body is None:
        return ""
    return json.dumps(body.client.info().get("probe", {}), sort_keys=True)


def model_identity(cfg: FellRecConfig) -> str:
    """What determines the base model's weights (for cache keys)."""
    return json.dumps({"model": asdict(cfg.model), "data": asdict(cfg.data), "seed": cfg.seed}, sort_keys=True)


def get_runtime(cfg: FellRecConfig) -> Runtime:
    key = json.dumps({"m": model_identity(cfg), "lora": asdict(cfg.lora), "split": asdict(cfg.split)}, sort_keys=True)
    if key not in _CACHE:
        import torch

        from fellrec_flwr.model.loading import add_lora, load_base_model

        if cfg.model.name == "tiny":
            # Its matrices are too small to gain from threads; on shared cores extra
            # threads only contend (measured 15x slower with 2 threads under load).
            torch.set_num_threads(1)

        data = prepare_data(cfg)
        if cfg.model.head == "item":  # the top layers only, over cached item vectors
            model = _item_head_model(cfg, data)
            _CACHE[key] = Runtime(cfg=cfg, data=data, model=model, tokenizer=None,
                                  initial_lora=_lora_state(model))
            return _CACHE[key]
        if cfg.split.enabled:  # flexible storage: only the client's layers, read from the checkpoint
            from fellrec_flwr.model.parts import load_client_part

            base, tokenizer = load_client_part(cfg.model, data.titles, data.path, cfg.split.front_k,
                                               cfg.split.back_k)
        else:
            base, tokenizer = load_base_model(cfg.model, data.titles, data.path)
        from fellrec_flwr.model.lora_state import get_lora_state

        from fellrec_flwr.split.runtime import client_lora_settings

        # the plan load_client_part cut the model with (None without split)
        model = add_lora(base, client_lora_settings(cfg.lora, getattr(base, "split_plan", None)), seed=cfg.seed)
        from fellrec_flwr.model.precision import use_tf32

        use_tf32(cfg.train.tf32, next(model.parameters()).device)
        _CACHE[key] = Runtime(cfg=cfg, data=data, model=model, tokenizer=tokenizer,
                              initial_lora=get_lora_state(model))
    return _CACHE[key]


def _lora_state(model: Any) -> dict[str, Any]:
    from fellrec_flwr.model.lora_state import get_lora_state

    return get_lora_state(model)


def _item_head_model(cfg: FellRecConfig, data: PreparedData) -> Any:
    """The item-token head: the checkpoint's top `item-head.layers` layers and norm, over the
    catalogue's item vectors (computed once with the full model, then read from the cache)."""
    import torch

    from fellrec_flwr.eval.grounding import TitleGroups
    from fellrec_flwr.model.item_head import build_item_model, catalogue_vectors, load_top_layers
    from fellrec_flwr.model.loading import resolve_device
    from fellrec_flwr.model.parts import checkpoint_for

    if cfg.model.quantization != "none":
        raise ValueError("model.head='item' runs its few top layers unquantised; set model.quantization='none'.")
    folder = checkpoint_for(cfg.model, data.titles, data.path)
    groups = TitleGroups.from_titles(data.titles)
    device = resolve_device(cfg.model.device)

    def full_model() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM

        from fellrec_flwr.model.parts import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
        return model, load_tokenizer(cfg.model, folder)

    vectors = catalogue_vectors(folder, groups, cfg.item_head, data.path / "item-vectors", full_model)
    config, layers, norm = load_top_layers(folder, cfg.item_head.layers)
    model = build_item_model(config, layers, norm, torch.from_numpy(vectors), cfg.item_head, cfg.lora, cfg.seed)
    return model.to(device)


# --------------------------------------------------------------------------- the server's side (no weights)


def server_lora_settings(cfg: FellRecConfig) -> tuple[Any, Any]:
    """(model config, LoRA settings as the clients apply them), from the config alone."""
    from fellrec_flwr.model.parts import base_config
    from fellrec_flwr.split.plan import plan_from_settings
    from fellrec_flwr.split.runtime import client_lora_settings

    data = prepare_data(cfg)
    config = base_config(cfg.model, data.titles, data.path)
    return config, client_lora_settings(cfg.lora, plan_from_settings(cfg.split, config.num_hidden_layers))


def model_checkpoint(cfg: FellRecConfig) -> Any:
    """The safetensors folder of cfg.model (the tiny model and GGUF conversions live beside the
    prepared data), prepared once: what a split service loads its middle layers from."""
    from fellrec_flwr.model.parts import checkpoint_for

    data = prepare_data(cfg)
    return checkpoint_for(cfg.model, data.titles, data.path)


def initial_lora(cfg: FellRecConfig) -> dict[str, Any]:
    """The LoRA every client starts from, from the model config and the seed alone: equal to
    `get_runtime(cfg).initial_lora` without loading a weight (the ServerApp never loads the model)."""
    from fellrec_flwr.model.parts import initial_lora_state, lora_dtype

    if cfg.model.head == "item":
        return initial_item_state(cfg)
    config, lora = server_lora_settings(cfg)
    return initial_lora_state(config, lora, cfg.seed, lora_dtype(cfg.model))


def initial_item_state(cfg: FellRecConfig) -> dict[str, Any]:
    """The item head's trainable start (LoRA, item projections, id table) from the config, the
    catalogue's size and the seed: the frozen layers are zeros, which the start does not depend on."""
    import torch

    from fellrec_flwr.eval.grounding import TitleGroups
    from fellrec_flwr.model.item_head import build_item_model, check_layers
    from fellrec_flwr.model.parts import base_config

    data = prepare_data(cfg)
    config = base_config(cfg.model, data.titles, data.path)
    check_layers(cfg.item_head, config.num_hidden_layers)
    vectors = torch.zeros(len(TitleGroups.from_titles(data.titles)), config.hidden_size)
    return _lora_state(build_item_model(config, None, None, vectors, cfg.item_head, cfg.lora, cfg.seed))


def save_adapter(cfg: FellRecConfig, state: Any, out_dir: Any) -> None:
    """A client's LoRA as a peft adapter folder, written without the base model."""
    from fellrec_flwr.model.lora_state import save_adapter_folder
    from fellrec_flwr.model.loading import peft_lora_config

    if cfg.model.head == "item":
        from fellrec_flwr.model.item_head import peft_item_config

        save_adapter_folder(state, peft_item_config(cfg.lora), out_dir)
        return
    _, lora = server_lora_settings(cfg)
    save_adapter_folder(state, peft_lora_config(lora), out_dir)
