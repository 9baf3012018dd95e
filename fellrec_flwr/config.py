"""One typed configuration for the whole project.

Every knob lives here once, as a dataclass field with its default. The Flower run
config (`[tool.flwr.app.config]` in pyproject.toml, flattened to dotted keys such as
``model.name``) is parsed into :class:`FellRecConfig` by :func:`from_run_config`,
which rejects unknown keys and wrong types with a message that names the fix.
The CLI tools (centralized baseline, benchmarks) build the same object, so a
setting means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

STRATEGIES = ("fellrec", "fedavg", "fedprox", "local", "ffa-lora", "fedsa-lora", "fellrec+")
PARTITIONERS = ("kmeans", "iid", "dirichlet")
DATASETS = ("demo", "games", "amazon2018", "table")
DATA_ORDERS = ("time", "file")
HEATING_EXPONENTS = ("t+1/beta", "(t+1)/beta")
SIMILARITY_BASES = ("parameters", "updates", "delta-w")
SIMILARITY_KERNELS = ("linear", "softmax")
HEATING_LOSSES = ("raw", "normalised")
QUANTIZATIONS = ("none", "8bit", "4bit")
DECODINGS = ("beam-l2", "constrained")
HEADS = ("generative", "retrieval", "item")
RETRIEVAL_POOLINGS = ("mean", "last")
PERSONAL_STATES = ("memory", "disk")  # where the server keeps per-client adapters (strategies/store.py)
WIRE_DEFENCES = ("none", "noise", "nopeek")  # split.defence (fellrec_flwr/split/defence.py, split/nopeek.py)


# Run-config keys that name files or folders. Flower's apps run in the SuperLink's working folder,
# not the user's shell: `python -m fellrec_flwr.run` makes these absolute against the folder it runs
# in, and the apps refuse a relative data or resume path (refuse_relative_paths). A relative out-dir
# stays allowed (the default "results"); the ServerApp logs the folder it resolves to.
PATH_KEYS = ("data.path", "data.prepared-dir", "resume-from", "out-dir")
ABSOLUTE_IN_APPS = ("data.path", "data.prepared-dir", "resume-from")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    # "tiny" (random LLaMA, tokenizer trained on the catalogue), a Hugging Face id,
    # a local folder, or a .gguf file (or a folder holding exactly one).
    name: str = "tiny"
    quantization: str = "none"  # none | 8bit | 4bit (bitsandbytes, CUDA only)
    dtype: str = "float32"  # float32 on CPU; bfloat16/float16 on GPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tiny_hidden: int = 64
    tiny_layers: int = 4
    tiny_heads: int = 4
    tiny_vocab: int = 4000
    # Public warm-up of the random tiny model on catalogue-only prompts (0 = stay random).
    tiny_pretrain_prompts: int = 1000
    # "generative" (BIGRec: generate a title, ground it), "retrieval" (RecFormer-style:
    # history and title vectors, softmax over the catalogue; fellrec_flwr/model/retrieval.py) or
    # "item" (one vector per history item through the top layers, full-catalogue softmax, every
    # window; fellrec_flwr/model/item_head.py).
    head: str = "generative"


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # comma-separated module names; the demo default adapts every projection (the paper: q_proj,v_proj, r 8)
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    layers: str = ""  # comma-separated layer indices; "" = every layer

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def layer_list(self) -> list[int] | None:
        if not self.layers.strip():
            return None
        return [int(x) for x in self.layers.split(",") if x.strip()]


@dataclass
class TrainSettings:
    local_epochs: int = 2
    # Share of the local training data (users' sequences for model.head='item', prompts otherwise) drawn
    # afresh each round from the round's seed; 1.0 = all. Many short rounds over the same examples budget.
    data_fraction: float = 1.0
    lr: float = 3e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256  # token cutoff of one prompt+response
    train_on_inputs: bool = True  # authors: loss over the whole sequence
    weight_decay: float = 0.0
    # Learning rate per round: `warmup_steps` linear warm-up, then constant or linear decay
    # (authors: linear, 20 warm-up steps). See trainer.lr_factor.
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | linear
    # Speed (fellrec_flwr/model/speed.py, measured by bench/train_speed.py).
    autocast: str = "auto"  # auto (bf16 on a CPU with avx512_bf16/amx_bf16, a GPU for float32 weights) | bf16 | off
    length_bucketing: bool = False  # batch similar lengths (within shuffled chunks): less padding
    labelled_logits_only: bool = True  # LM head only on positions that carry a loss (exact)
    prefix_cache_mb: int = 1024  # cache the frozen layers' output when LoRA is in the last layers only; 0 = off
    # with labelled-logits-only: the loss over blocks of the vocabulary of about this many MB of float32
    # logits (SmolLM2, 4 x 128 positions: 6,144 of 49,152 entries); bounds a client's memory. 0 = all at once
    loss_chunk_mb: int = 12
    # activation checkpointing of the decoder layers: split (only a split client) | on | off
    checkpoint_layers: str = "split"
    tf32: bool = True  # CUDA: float32 matmuls in TF32 where the GPU has it (Ampere and later); no effect on CPU


@dataclass
class DataSettings:
    dataset: str = "demo"  # demo | games | amazon2018 | table
    path: str = ""  # source folder/file for non-demo data sets
    prepared_dir: str = ""  # "" = a cache folder keyed by the settings
    partitioner: str = "kmeans"
    num_clients: int = 5
    dirichlet_alpha: float = 0.5
    history_len: int = 10
    train_samples: int = 1024  # BIGRec few-shot: prompts in total over all clients
    valid_users: int = 250
    test_users: int = 250
    bpr_dim: int = 32
    bpr_epochs: int = 20
    # Reading your own files (dataset "table"; k-core also for "amazon2018"). See README
    # "Your own data". The CLI flags (--user-col ...) are generated from these fields.
    user_col: str = "user_id"
    item_col: str = "item_id"  # in both the interactions and the item-title table
    time_col: str = "timestamp"
    title_col: str = "title"
    sep: str = ","  # CSV field separator ("tab" or "\\t" for tabs); ignored for parquet
    k_core: int = 5  # keep users and items with >= k interactions, repeatedly (0 = off)
    order: str = "time"  # "time" (needs data.time-col) | "file": the rows' order in the file
    # The two tables' file names in data.path: the file so named, else <name>.csv or <name>.parquet.
    interactions_file: str = "interactions"
    items_file: str = "items"


@dataclass
class EvalSettings:
    interval: int = 1  # evaluate on valid users every n rounds (0 = only at the end)
    num_beams: int = 4
    max_new_tokens: int = 32
    batch_size: int = 16
    final_split: str = "test"  # split evaluated after the last round
    early_stop_patience: int = 0  # rounds without valid-loss improvement; 0 = off
    # Adapter each client is tested with after the last round: "best" = its own lowest
    # valid loss (the authors test best_client{i}), "last" = the last round's.
    test_adapter: str = "best"
    # How a user's list is made: "beam-l2" = the paper's free generation grounded by L2
    # distance; "constrained" = beam search over a trie of catalogue titles (constrained.py).
    decoding: str = "constrained"
    constrained_beams: int = 20  # live prefixes kept per user in constrained decoding
    prior_weight: float = 0.0  # constrained: subtract this x each title's log-lik under a neutral prompt
    length_norm: float = 0.0  # constrained: divide a title's log-lik by n_tokens**length_norm (0 = plain sum)


@dataclass
class RetrievalSettings:
    """The retrieval head (model.head='retrieval'); see fellrec_flwr/model/retrieval.py."""

    temperature: float = 0.05  # softmax temperature over cosine scores (RecFormer)
    negatives: int = 0  # title groups sampled uniformly per batch, besides the in-batch targets
    pooling: str = "mean"  # mean | last: how a text's final hidden states become one vector


@dataclass
class ItemHeadSettings:
    """The item-token head (model.head='item'); see fellrec_flwr/model/item_head.py."""

    layers: int = 2  # top decoder layers that model the item sequence (LoRA on them); the rest encode titles
    id_dim: int = 64  # width of the learned item-id embedding (projected to the hidden size)
    window: int = 10  # most history items per training window (as data.history-len at evaluation)
    title_tokens: int = 32  # title tokens encoded into an item vector


@dataclass
class SasrecSettings:
    """The SASRec baseline (fellrec_flwr/eval/sasrec.py): trained once per prepared data set, cached."""

    enabled: bool = True  # false: per_user.csv has popularity and Markov rows only
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 50  # training windows of at most this many items (longer sequences are cut into windows)
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 3  # stop after this many epochs without a better valid metric (0 = run max-epochs)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    weight_decay: float = 0.0
    init_std: float = 0.02
    select_metric: str = "ndcg@10"  # the valid metric that picks the kept epoch: ndcg@10 | recall@10
    # SASRec's own seed, not the run's: runs of every seed on one data set rank against the same
    # baseline (paired comparisons), and it is trained once per data set
    seed: int = 2024


@dataclass
class FellRecSettings:
    alpha: float = 0.7
    beta: float = 1.0
    temperature: float = 0.05  # loss softmax temperature T
    heating: bool = True  # False reproduces the authors' released run (beta = 1 -> off)
    heating_exponent: str = "t+1/beta"  # or "(t+1)/beta"
    similarity_basis: str = "parameters"  # or "updates" (theta_i - theta_received) or "delta-w" (B A)
    similarity_kernel: str = "linear"  # (cos+1)/2, or softmax over cosines
    similarity_temperature: float = 0.1  # only for the softmax kernel
    lr_scale: bool = False  # also scale each client's lr by its warm weight
    heating_loss: str = "raw"  # loss in the heating softmax: raw (authors) or normalised (/ own first-round loss)

    def validate(self) -> "FellRecSettings":
        """The fellrec.* checks, here once: FellRecConfig.validate and the FellRec strategy both call it."""
        _choice("fellrec.heating-exponent", self.heating_exponent, HEATING_EXPONENTS)
        _choice("fellrec.similarity-basis", self.similarity_basis, SIMILARITY_BASES)
        _choice("fellrec.similarity-kernel", self.similarity_kernel, SIMILARITY_KERNELS)
        _choice("fellrec.heating-loss", self.heating_loss, HEATING_LOSSES)
        if self.beta <= 0:
            raise ConfigError("fellrec.beta must be > 0 (the exponent uses 1/beta).")
        for key, value in (("alpha", self.alpha), ("temperature", self.temperature),
                           ("similarity-temperature", self.similarity_temperature)):
            if not value > 0:
                raise ConfigError(f"fellrec.{key}={value} must be > 0.")
        return self


@dataclass
class SplitSettings:
    enabled: bool = False
    front_k: int = 1
    back_k: int = 1
    service_url: str = ""  # "" = the ServerApp starts a service on loopback
    wire_dtype: str = "float32"  # float32 | float16 | bfloat16 on the wire
    # where the ServerApp's loopback service runs the middle layers, apart from model.device (the clients'):
    # auto | cpu | cuda | cuda:N. Ray does not count this memory: keep it off the clients' GPUs (docs/gpu.md)
    service_device: str = "auto"
    # what the client does to what it sends (fellrec_flwr/split/defence.py, docs/privacy_audit.md):
    # none | noise (clip each position to noise-clip x the median position norm, then Gaussian noise
    # of expected norm noise-sigma x that bound on activations sent and gradients returned)
    defence: str = "none"
    noise_sigma: float = 0.0  # 0 = the split without a defence, bit for bit
    noise_clip: float = 1.0
    # nopeek: add nopeek-alpha x distance correlation(token embeddings, activations sent at the front cut)
    # to the client's training loss (fellrec_flwr/split/nopeek.py); 0 = the training without it, bit for bit
    nopeek_alpha: float = 0.0


@dataclass
class FellRecConfig:
    strategy: str = "fellrec"
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    min_clients: int = 5
    node_wait_timeout: float = 300.0  # seconds to wait for min_clients before a round
    # per-client adapters (personal, best) of personalised strategies: "memory" (and the checkpoint), or
    # "disk": one file per client in <run>/personal-state/, so server memory grows with clients per round only
    personal_state: str = "memory"
    aggregation_block_mb: float = 64.0  # MiB of uploads read at a time into the Gram matrix and weighted sums
    proximal_mu: float = 0.01
    seed: int = 2024
    out_dir: str = "results"
    run_name: str = ""  # "" = <strategy>-<dataset>
    resume_from: str = ""  # a run folder (or its checkpoint.safetensors) to continue
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    fellrec: FellRecSettings = field(default_factory=FellRecSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    item_head: ItemHeadSettings = field(default_factory=ItemHeadSettings)
    sasrec: SasrecSettings = field(default_factory=SasrecSettings)

    def validate(self) -> "FellRecConfig":
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("personal-state", self.personal_state, PERSONAL_STATES)
        if not (math.isfinite(self.aggregation_block_mb) and self.aggregation_block_mb > 0):
            raise ConfigError(f"aggregation-block-mb={self.aggregation_block_mb} must be a number > 0 (MiB of "
                              "uploads the server reads at a time; default 64).")
        _choice("data.partitioner", self.data.partitioner, PARTITIONERS)
        _choice("data.dataset", self.data.dataset, DATASETS)
        _choice("data.order", self.data.order, DATA_ORDERS)
        self.fellrec.validate()
        _choice("model.quantization", self.model.quantization, QUANTIZATIONS)
        _choice("eval.decoding", self.eval.decoding, DECODINGS)
        _positive("eval.constrained-beams", self.eval.constrained_beams)
        if self.eval.length_norm < 0:
            raise ConfigError(f"eval.length-norm={self.eval.length_norm} must be >= 0 (0 = plain sum of log-probs).")
        _choice("model.head", self.model.head, HEADS)
        _choice("retrieval.pooling", self.retrieval.pooling, RETRIEVAL_POOLINGS)
        if not self.retrieval.temperature > 0:
            raise ConfigError(f"retrieval.temperature={self.retrieval.temperature} must be > 0 (RecFormer: 0.05).")
        if self.retrieval.negatives < 0:
            raise ConfigError(f"retrieval.negatives={self.retrieval.negatives} must be >= 0.")
        if self.model.head == "retrieval" and self.split.enabled:
            raise ConfigError("model.head='retrieval' does not run through the split service yet; "
                              "set split.enabled=false or model.head='generative'.")
        for key in ("layers", "id-dim", "window", "title-tokens"):
            _positive(f"item-head.{key}", getattr(self.item_head, key.replace("-", "_")))
        if self.model.head == "item" and self.split.enabled:
            raise ConfigError("model.head='item' needs no split service (a client holds only the "
                              "item-head.layers top layers); set split.enabled=false.")
        if self.model.head == "item" and self.lora.layers.strip():
            raise ConfigError("lora.layers does not apply to model.head='item' (LoRA sits on the item-head.layers "
                              "top layers); leave lora.layers empty.")
        _check_sasrec(self.sasrec)
        _choice("split.wire-dtype", self.split.wire_dtype, ("float32", "float16", "bfloat16"))
        _positive("num-server-rounds", self.num_server_rounds)
        _positive("data.num-clients", self.data.num_clients)
        _positive("train.batch-size", self.train.batch_size)
        _positive("train.grad-accum", self.train.grad_accum)
        if not (math.isfinite(self.train.data_fraction) and 0.0 < self.train.data_fraction <= 1.0):
            raise ConfigError(f"train.data-fraction={self.train.data_fraction} must be in (0, 1] (the share of a "
                              "client's training data drawn each round; 1 = all of it).")
        _choice("train.lr-schedule", self.train.lr_schedule, ("constant", "linear"))
        _choice("train.autocast", self.train.autocast, ("auto", "bf16", "off"))
        _choice("train.checkpoint-layers", self.train.checkpoint_layers, ("split", "on", "off"))
        _choice("eval.test-adapter", self.eval.test_adapter, ("best", "last"))
        if self.train.warmup_steps < 0 or self.train.prefix_cache_mb < 0 or self.train.loss_chunk_mb < 0:
            raise ConfigError("train.warmup-steps, train.prefix-cache-mb and train.loss-chunk-mb must be >= 0.")
        _positive("lora.r", self.lora.r)
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train={self.fraction_train} must be in (0, 1].")
        if self.min_clients > self.data.num_clients:
            raise ConfigError(
                f"min-clients={self.min_clients} exceeds data.num-clients={self.data.num_clients}; "
                "lower min-clients or raise data.num-clients."
            )
        if self.split.enabled and (self.split.front_k < 1 or self.split.back_k < 1):
            raise ConfigError("split.front-k and split.back-k must be >= 1 when split.enabled.")
        _choice("split.defence", self.split.defence, WIRE_DEFENCES)
        if not (math.isfinite(self.split.noise_sigma) and self.split.noise_sigma >= 0):
            raise ConfigError(f"split.noise-sigma={self.split.noise_sigma} must be a finite number >= 0 "
                              "(0 = no noise; 1 = noise as large as the clip bound).")
        if not (math.isfinite(self.split.noise_clip) and self.split.noise_clip > 0):
            raise ConfigError(f"split.noise-clip={self.split.noise_clip} must be > 0 (the per-position clip bound "
                              "as a multiple of the median position norm; 1 = the median).")
        if not (math.isfinite(self.split.nopeek_alpha) and self.split.nopeek_alpha >= 0):
            raise ConfigError(f"split.nopeek-alpha={self.split.nopeek_alpha} must be a finite number >= 0 "
                              "(0 = no NoPeek term in the client's loss).")
        if self.split.nopeek_alpha > 0 and self.split.defence != "nopeek":
            raise ConfigError(f"split.nopeek-alpha={self.split.nopeek_alpha} has no effect with "
                              f"split.defence={self.split.defence!r}; set split.defence='nopeek'.")
        if self.split.noise_sigma > 0 and self.split.defence != "noise":
            raise ConfigError(f"split.noise-sigma={self.split.noise_sigma} has no effect with "
                              f"split.defence={self.split.defence!r}; set split.defence='noise'.")
        _plain_name("run-name", self.run_name)
        if self.split.enabled and self.eval.decoding == "constrained" and self.eval.prior_weight > 0:
            # the title prior copies a prompt's KV cache, which a split session (held by the service) cannot be
            raise ConfigError("eval.prior-weight > 0 is not supported with split.enabled (the title prior copies "
                              "the prompt's KV cache, which the split service holds); set eval.prior-weight=0.")
        return self

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.strategy}-{self.data.dataset}"

    def to_run_config(self) -> dict[str, Any]:
        """Flatten back to Flower's dotted, dashed keys (inverse of from_run_config)."""
        return dict(_flatten(self))


def _check_sasrec(s: SasrecSettings) -> None:
    for key in ("hidden", "blocks", "heads", "max-len", "batch-size", "max-epochs"):
        _positive(f"sasrec.{key}", getattr(s, key.replace("-", "_")))
    if s.hidden % s.heads:
        raise ConfigError(f"sasrec.hidden={s.hidden} must be a multiple of sasrec.heads={s.heads} "
                          "(each attention head gets hidden/heads dimensions).")
    if not 0.0 <= s.dropout < 1.0:
        raise ConfigError(f"sasrec.dropout={s.dropout} must be in [0, 1) (the literature: 0.2-0.5).")
    if not s.lr > 0:
        raise ConfigError(f"sasrec.lr={s.lr} must be > 0 (the literature: 0.001).")
    if s.patience < 0 or s.grad_clip < 0 or s.weight_decay < 0:
        raise ConfigError("sasrec.patience, sasrec.grad-clip and sasrec.weight-decay must be >= 0 (0 = off).")
    if not s.init_std > 0:
        raise ConfigError(f"sasrec.init-std={s.init_std} must be > 0 (the literature: 0.02).")
    _choice("sasrec.select-metric", s.select_metric, ("ndcg@10", "recall@10"))


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}.")


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")  # "+" for strategy names such as fellrec+


def _plain_name(key: str, value: str) -> None:
    """A folder name under out-dir, never a path: an absolute or ../ name would write anywhere."""
    if value and (not _PLAIN_NAME.match(value) or ".." in value):
        raise ConfigError(f"{key}={value!r} must be a plain folder name (letters, digits, '.', '_', '+', '-'; no '/' "
                          "or '..'); choose where runs go with out-dir.")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value} must be >= 1.")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = prefix + _key(f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_flatten(value, key + "."))
        else:
            out.append((key, value))
    return out


def known_keys() -> dict[str, Any]:
    """Every accepted run-config key with its default."""
    return dict(_flatten(FellRecConfig()))


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} must be true or false.")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}={value!r} must be an integer.")
        try:
            as_float = float(value)
        except ValueError as err:
            raise ConfigError(f"{key}={value!r} must be an integer.") from err
        if as_float != int(as_float):
            raise ConfigError(f"{key}={value!r} must be an integer.")
        return int(as_float)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number.")
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}={value!r} must be a number.") from err
    return str(value)


def closest_keys(key: str, limit: int = 3) -> list[str]:
    """Known keys nearest to a mistyped one: same last part first, then difflib's ratio."""
    known = list(known_keys())
    norm = key.replace("_", "-")
    same_leaf = [k for k in known if k.split(".")[-1] == norm.split(".")[-1]]
    close = difflib.get_close_matches(norm, known, n=limit, cutoff=0.6)
    leaves = {k.split(".")[-1]: k for k in known}
    close += [leaves[m] for m in difflib.get_close_matches(norm.split(".")[-1], list(leaves), n=limit, cutoff=0.75)]
    return list(dict.fromkeys(same_leaf + close))[:limit]


def unknown_key_message(key: str) -> str:
    close = closest_keys(key)
    hint = f" Did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    return (f"Unknown config key {key!r}.{hint} Known keys are listed in the README "
            "(section 'Configuration') and in [tool.flwr.app.config] of pyproject.toml.")


def from_run_config(run_config: Mapping[str, Any]) -> FellRecConfig:
    """Build a validated config from Flower's flattened run config (or any overrides).

    Keys may use dashes or underscores. Missing keys take their defaults.
    """
    cfg = FellRecConfig()
    defaults = known_keys()
    by_norm = {k.replace("_", "-"): k for k in defaults}
    for raw_key, value in run_config.items():
        key = raw_key.replace("_", "-")
        if key not in by_norm:
            raise ConfigError(unknown_key_message(raw_key))
        value = _coerce(key, value, defaults[key])
        target: Any = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            target = getattr(target, part.replace("-", "_"))
        setattr(target, parts[-1].replace("-", "_"), value)
    return cfg.validate()


def refuse_relative_paths(cfg: FellRecConfig) -> FellRecConfig:
    """`cfg` if its data and resume paths are absolute (what the apps need); else a ConfigError
    naming each relative one and the fix."""
    import os

    values = cfg.to_run_config()
    relative = {k: values[k] for k in ABSOLUTE_IN_APPS if values[k] and not os.path.isabs(os.path.expanduser(values[k]))}
    if relative:
        named = ", ".join(f"{k}={v!r}" for k, v in relative.items())
        shell = " ".join(f"{k}='$PWD/{v}'" for k, v in relative.items())
        raise ConfigError(f"{named}: a relative path, but Flower's apps run in the SuperLink's working folder "
                          f"({os.getcwd()}), not your shell's. Give absolute paths (in the shell: {shell}), or run "
                          "python -m fellrec_flwr.run, which makes them absolute against the folder you run it in.")
    return cfg


def resolved_paths(cfg: FellRecConfig, cwd: str | None = None) -> list[str]:
    """The checker's report: each path key that is set, the absolute path it means from `cwd`,
    and whether a source the run must read is there."""
    import os

    cwd = cwd or os.getcwd()
    values = cfg.to_run_config()
    lines = []
    for key in PATH_KEYS:
        value = os.path.expanduser(values[key])
        if not value:
            continue
        notes = []
        if not os.path.isabs(value):
            notes.append("relative: python -m fellrec_flwr.run passes this absolute path; plain flwr run "
                         + ("refuses it" if key in ABSOLUTE_IN_APPS else "writes under the SuperLink's folder"))
        full = os.path.abspath(os.path.join(cwd, value))
        if key in ("data.path", "resume-from") and not os.path.exists(full):
            notes.append("not found")
        lines.append(f"  {key}={values[key]!r} -> {full}" + (f" ({'; '.join(notes)})" if notes else ""))
    return lines


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE overrides in Flower's syntax from one or several strings (or one .toml file), flat.

    Flower's ``parse_config_args`` reads each string into a nested table and ``update``s the
    result, so a later string with the same table drops the earlier one's keys ("train.lr=1"
    then "train.batch-size=2" keeps only train.batch-size). The strings are read as one here.
    """
    from flwr.common.config import parse_config_args  # Flower's own parser: same reading of quotes

    items = [item for item in items if item]
    if len(items) == 1 and items[0].endswith(".toml"):
        return parse_config_args(items)
    return parse_config_args([" ".join(items)]) if items else {}


def keys_flower_drops(items: Sequence[str]) -> list[str]:
    """The keys `flwr run` would silently lose from several --run-config strings (see parse_overrides)."""
    from flwr.common.config import parse_config_args

    if len([i for i in items if i]) < 2:
        return []
    return sorted(set(parse_overrides(items)) - set(parse_config_args(list(items))))


def check_overrides(args: list[str]) -> FellRecConfig:
    """Parse `flwr run --run-config` arguments as flwr does, then check them here.

    Flower refuses a key that pyproject.toml does not declare with only ``[code: 15] Invalid
    run configuration`` (the SuperLink checks before the app starts); this names the key. Keys
    that Flower's parser would drop (several strings with one table) are an error too.
    """
    dropped = keys_flower_drops(args)
    if dropped:
        raise ConfigError(f"flwr would drop {', '.join(dropped)}: several --run-config strings that set keys of one "
                          "table (e.g. train.*) keep only the last string's keys of that table. Pass all overrides "
                          "in one --run-config string.")
    return from_run_config(parse_overrides(args))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m fellrec_flwr.config",
        description="Check run-config overrides before `flwr run`: names an unknown or mistyped key and "
                    "the closest valid ones (flwr itself only says '[code: 15] Invalid run configuration').")
    ap.add_argument("overrides", nargs="+", help="the same text as after `flwr run . --run-config`, "
                                                  "e.g. \"data.user-col='uid' num-server-rounds=2\", or a .toml file")
    args = ap.parse_args(argv)
    try:
        cfg = check_overrides(args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    changed = {k: v for k, v in cfg.to_run_config().items() if known_keys()[k] != v}
    print("ok; settings that differ from the defaults: " + (", ".join(f"{k}={v!r}" for k, v in changed.items())
                                                            or "none"))
    for line in resolved_paths(cfg):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
