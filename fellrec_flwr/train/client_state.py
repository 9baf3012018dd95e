"""A client's own state on its own disk, for deployments where every message is a fresh process.

Under `flower-supernode` each train/evaluate message runs in a new `flwr-clientapp` process:
module caches start empty, and `context.state` is lost when the SuperNode restarts. What has
to survive is small and personal, so it lives on the client's disk, keyed by the stable client
key (the partition id), never in `context.state`:

    <state-dir>/client-<key>/state.json          counters + a short history (atomic JSON)
    <state-dir>/client-<key>/adapter.safetensors the LoRA after the latest successful training

`state-dir` comes from the node config (default ``<FELLREC_CACHE>/client-state/run-<run id>``,
so simulations running side by side never share a file). A restarted SuperNode with the same
key and state dir continues its counters; with an explicit state-dir a new run does too.

The base model needs no cache of its own here: `tiny` is rebuilt deterministically from a
fixed seed (its tokenizer is saved next to the prepared data), a GGUF file is converted to
safetensors once under the prepared folder (`model.load_base_model`), and the catalogue
embeddings are cached by `grounding.Catalogue`.

Node-config keys a SuperNode may set (`flower-supernode --node-config "k=v ..."`):
``partition-id`` (required), ``num-partitions``, ``state-dir``, ``data-path`` (this client's
prepared-data folder; overrides ``data.prepared-dir``), ``split-token-file``, ``split-ca-file``
and ``split-client-key`` (split-service credentials: a file on the client machine, never the
run config, which every node sees).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fellrec_flwr.atomic import atomic_write_bytes, atomic_write_json
from fellrec_flwr.config import FellRecConfig

STATE_VERSION = 1
HISTORY_LIMIT = 20  # train messages remembered in state.json (keeps the file small)
STATE_FILE = "state.json"
ADAPTER_FILE = "adapter.safetensors"

LoraState = Mapping[str, np.ndarray]


class ClientStateError(ValueError):
    """A node config value or a client state file is missing or malformed."""


# --------------------------------------------------------------------------- node config


@dataclass(frozen=True)
class NodeSettings:
    """What one SuperNode's `--node-config` says about its client."""

    partition_id: int
    num_partitions: int | None
    state_dir: Path
    data_path: str = ""
    split_token_file: str = ""
    split_ca_file: str = ""
    split_client_key: str = ""  # "" = "client-<partition-id>"

    def split_key(self) -> str:
        """The client key the split service knows this client by (its token is bound to it)."""
        return self.split_client_key or f"client-{self.partition_id}"

    def split_token(self) -> str:
        """The split-service token from `split-token-file` (one line of hex)."""
        if not self.split_token_file:
            raise ClientStateError(
                "split.enabled needs this node's split-service token: start the SuperNode with "
                "--node-config \"... split-token-file='/path/client-<i>.token'\" "
                "(deploy/make_split_credentials.sh writes the files)."
            )
        path = Path(self.split_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ClientStateError(f"cannot read split-token-file {path}: {err.strerror}. Copy this client's "
                                   "token file there or fix the node config.") from None
        if not token:
            raise ClientStateError(f"split-token-file {path} is empty; re-issue it with "
                                   "deploy/make_split_credentials.sh.")
        return token


def default_state_dir(run_id: int | None = None) -> Path:
    """``<FELLREC_CACHE>/client-state``, or its ``run-<run_id>`` folder when the run is known.

    Per-run folders keep simultaneous simulations apart (two `flwr run .` on one machine
    would otherwise write the same client's state.json). Deployments set `state-dir`.
    """
    from fellrec_flwr.paths import cache_root

    root = cache_root() / "client-state"
    return root if run_id is None else root / f"run-{run_id}"


def _int_value(node_config: Mapping[str, Any], key: str) -> int | None:
    if key not in node_config:
        return None
    try:
        return int(node_config[key])
    except (TypeError, ValueError):
        raise ClientStateError(f"node config {key}={node_config[key]!r} is not an integer.") from None


def node_settings(node_config: Mapping[str, Any], run_id: int | None = None) -> NodeSettings:
    """Parse the node config; a missing partition-id is an error naming the fix.

    Without a `state-dir`, the state lives in :func:`default_state_dir` (per run if run_id is given).
    """
    partition_id = _int_value(node_config, "partition-id")
    if partition_id is None:
        raise ClientStateError(
            "This SuperNode has no 'partition-id' in its node config. Start it with "
            "--node-config \"partition-id=<i> num-partitions=<N>\"."
        )
    num_partitions = _int_value(node_config, "num-partitions")
    if partition_id < 0 or (num_partitions is not None and partition_id >= num_partitions):
        raise ClientStateError(f"partition-id={partition_id} must be in 0..num-partitions-1 "
                               f"(num-partitions={num_partitions}).")
    text = {k: str(node_config.get(k, "")).strip() for k in
            ("state-dir", "data-path", "split-token-file", "split-ca-file", "split-client-key")}
    state_dir = Path(text["state-dir"]).expanduser() if text["state-dir"] else default_state_dir(run_id)
    return NodeSettings(partition_id, num_partitions, state_dir, text["data-path"], text["split-token-file"],
                        text["split-ca-file"], text["split-client-key"])


def apply_node_settings(cfg: FellRecConfig, node: NodeSettings) -> FellRecConfig:
    """The run config as this client sees it: its own data folder when `data-path` is set."""
    if not node.data_path:
        return cfg
    return replace(cfg, data=replace(cfg.data, prepared_dir=node.data_path))


def adapter_fingerprint(cfg: FellRecConfig) -> str:
    """What an adapter's meaning depends on (model, LoRA layout, data, seed), not where data lives."""
    data = asdict(cfg.data)
    data.pop("prepared_dir")
    blob = json.dumps({"model": asdict(cfg.model), "lora": asdict(cfg.lora), "data": data, "seed": cfg.seed},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- pure state updates


def adapter_digest(state: LoraState) -> str:
    """A content hash of a LoRA state (names, dtypes, shapes, bytes): equal digests = same adapter."""
    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


@dataclass
class ClientRecord:
    """Counters of one client, across SuperNode restarts and runs."""

    client_key: int
    rounds_trained: int = 0  # successful train messages, all runs
    last_run_id: int = 0
    last_round: int = 0  # server round of the last successful training
    last_loss: float | None = None
    adapter_digest: str = ""  # of adapter.safetensors
    adapter_fingerprint: str = ""  # adapter_fingerprint(cfg) it was trained under
    # newest last: {run_id, round, node_id, received, sent, loss, status: started|done, started, finished}
    history: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION


def begin_round(record: ClientRecord, run_id: int, server_round: int, node_id: int, received_digest: str,
                now: float) -> ClientRecord:
    """Note that a train message arrived (kept even if the process dies before it finishes)."""
    entry = {"run_id": int(run_id), "round": int(server_round), "node_id": int(node_id),
             "received": received_digest, "sent": "", "loss": None, "status": "started",
             "started": now, "finished": None}
    return replace(record, history=(record.history + [entry])[-HISTORY_LIMIT:])


def finish_round(record: ClientRecord, loss: float, sent_digest: str, fingerprint: str,
                 now: float) -> ClientRecord:
    """Count a successful training; completes the newest 'started' history entry."""
    history = [dict(e) for e in record.history]
    if not history or history[-1]["status"] != "started":
        raise ClientStateError("finish_round without begin_round: call begin_round when the message arrives.")
    last = history[-1]
    last.update(sent=sent_digest, loss=float(loss), status="done", finished=now)
    return replace(record, rounds_trained=record.rounds_trained + 1, last_run_id=last["run_id"],
                   last_round=last["round"], last_loss=float(loss), adapter_digest=sent_digest,
                   adapter_fingerprint=fingerprint, history=history)


# --------------------------------------------------------------------------- on disk


class ClientStateStore:
    """Reads and writes `<state_dir>/client-<key>/` atomically (temp file + os.replace)."""

    def __init__(self, state_dir: str | Path, client_key: int):
        self.client_key = int(client_key)
        self.folder = Path(state_dir).expanduser() / f"client-{self.client_key}"

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def adapter_file(self) -> Path:
        return self.folder / ADAPTER_FILE

    def load(self) -> ClientRecord:
        """The saved record, or a fresh one if this client never trained here."""
        if not self.state_file.exists():
            return ClientRecord(client_key=self.client_key)
        try:
            raw = json.loads(self.state_file.read_text())
            record = ClientRecord(**raw)
        except (ValueError, TypeError) as err:
            raise ClientStateError(f"client state {self.state_file} is unreadable ({err}); delete it to start "
                                   "this client's counters afresh.") from None
        if record.version != STATE_VERSION or record.client_key != self.client_key:
            raise ClientStateError(f"client state {self.state_file} has version {record.version} / client "
                                   f"{record.client_key}; expected {STATE_VERSION} / {self.client_key}. "
                                   "Give each client its own state-dir or delete the file.")
        return record

    def save(self, record: ClientRecord) -> None:
        atomic_write_json(self.state_file, asdict(record))

    def save_adapter(self, state: LoraState) -> None:
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
        atomic_write_bytes(self.adapter_file, save(tensors))

    def load_adapter(self, fingerprint: str | None = None) -> dict[str, np.ndarray] | None:
        """The saved adapter; None if there is none or it was trained under another fingerprint."""
        if not self.adapter_file.exists():
            return None
        record = self.load()
        if fingerprint is not None and record.adapter_fingerprint != fingerprint:
            return None
        from safetensors.numpy import load

        state = dict(load(self.adapter_file.read_bytes()))
        # A crash between writing the adapter and its record leaves them disagreeing: trust neither.
        return state if adapter_digest(state) == record.adapter_digest else None

    # -- the two calls the ClientApp makes around local training --------------------------

    def begin_training(self, run_id: int, server_round: int, node_id: int, received: LoraState) -> ClientRecord:
        record = begin_round(self.load(), run_id, server_round, node_id, adapter_digest(received), time.time())
        self.save(record)
        return record

    def finish_training(self, trained: LoraState, loss: float, fingerprint: str) -> ClientRecord:
        """Adapter first, then the record naming it: a crash in between leaves the old counters."""
        record = finish_round(self.load(), loss, adapter_digest(trained), fingerprint, time.time())
        self.save_adapter(trained)
        self.save(record)
        return record
