"""Client state on the client's disk (fellrec_flwr.train.client_state) and the node config it reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fellrec_flwr.train.client_state import (
    HISTORY_LIMIT,
    ClientRecord,
    ClientStateError,
    ClientStateStore,
    adapter_digest,
    adapter_fingerprint,
    apply_node_settings,
    begin_round,
    finish_round,
    node_settings,
)
from fellrec_flwr.config import FellRecConfig

SMALL = {
    "data.num-clients": 2, "min-clients": 2, "data.train-samples": 48, "data.valid-users": 16,
    "data.test-users": 16, "data.bpr-epochs": 2, "eval.num-beams": 2, "eval.max-new-tokens": 8,
    "model.tiny-layers": 2, "model.tiny-vocab": 800, "train.batch-size": 8,
    "model.tiny-pretrain-prompts": 0,  # a random tiny base is enough to test state keeping
}


def lora(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"b.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32),
            "a.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32)}


# --------------------------------------------------------------------------- node config


def test_node_settings_reads_keys_and_defaults_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    node = node_settings({"partition-id": 2, "num-partitions": 3})
    assert (node.partition_id, node.num_partitions) == (2, 3)
    assert node.state_dir == tmp_path / "cache" / "client-state"
    assert node.split_key() == "client-2"
    node = node_settings({"partition-id": "1", "state-dir": str(tmp_path / "s"), "data-path": "/d",
                          "split-client-key": "node-7"})
    assert node.state_dir == tmp_path / "s" and node.data_path == "/d" and node.split_key() == "node-7"
    # the ClientApp passes its run id: simulations without a state-dir get one folder per run,
    # an explicit state-dir (deployment) is kept as given
    assert node_settings({"partition-id": 2}, run_id=41).state_dir == tmp_path / "cache" / "client-state" / "run-41"
    assert node_settings({"partition-id": 2, "state-dir": str(tmp_path / "s")}, run_id=41).state_dir == tmp_path / "s"


def test_two_runs_training_the_same_client_at_once_do_not_collide(tmp_path, monkeypatch):
    """Two simulations on one machine: both begin round 1 for client 0, then both finish it."""
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    stores = [ClientStateStore(node_settings({"partition-id": 0}, run_id=run).state_dir, 0) for run in (1, 2)]
    for run, store in zip((1, 2), stores):
        store.begin_training(run_id=run, server_round=1, node_id=9, received=lora(0))
    for store in stores:
        assert store.finish_training(lora(1), loss=1.0, fingerprint="fp").rounds_trained == 1
    # sharing one folder is exactly what used to fail: the second begin overwrote the first
    shared = [ClientStateStore(tmp_path / "shared", 0) for _ in range(2)]
    for run, store in zip((1, 2), shared):
        store.begin_training(run_id=run, server_round=1, node_id=9, received=lora(0))
    shared[1].finish_training(lora(1), loss=1.0, fingerprint="fp")
    with pytest.raises(ClientStateError, match="finish_round without begin_round"):
        shared[0].finish_training(lora(1), loss=1.0, fingerprint="fp")


@pytest.mark.parametrize("config, match", [
    ({}, "--node-config \"partition-id="),
    ({"partition-id": "x"}, "not an integer"),
    ({"partition-id": 3, "num-partitions": 3}, "0..num-partitions-1"),
    ({"partition-id": -1}, "0..num-partitions-1"),
])
def test_bad_node_config_is_refused_naming_the_fix(config, match):
    with pytest.raises(ClientStateError, match=match):
        node_settings(config)


def test_data_path_becomes_the_prepared_dir_and_keeps_the_fingerprint():
    cfg = FellRecConfig()
    assert apply_node_settings(cfg, node_settings({"partition-id": 0})) is cfg
    moved = apply_node_settings(cfg, node_settings({"partition-id": 0, "data-path": "/data/c0"}))
    assert moved.data.prepared_dir == "/data/c0" and cfg.data.prepared_dir == ""
    assert adapter_fingerprint(moved) == adapter_fingerprint(cfg)  # where data lives is not what it is
    other = FellRecConfig()
    other.lora.r = 4
    assert adapter_fingerprint(other) != adapter_fingerprint(cfg)


def test_split_token_comes_from_the_node_file(tmp_path):
    with pytest.raises(ClientStateError, match="split-token-file"):
        node_settings({"partition-id": 0}).split_token()
    with pytest.raises(ClientStateError, match="cannot read"):
        node_settings({"partition-id": 0, "split-token-file": str(tmp_path / "none")}).split_token()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClientStateError, match="empty"):
        node_settings({"partition-id": 0, "split-token-file": str(tmp_path / "empty")}).split_token()
    (tmp_path / "t").write_text("abc123\n")
    assert node_settings({"partition-id": 0, "split-token-file": str(tmp_path / "t")}).split_token() == "abc123"


# --------------------------------------------------------------------------- pure updates


def test_adapter_digest_is_a_content_hash():
    a = lora(0)
    assert adapter_digest(a) == adapter_digest(dict(reversed(list(a.items()))))  # insertion order is irrelevant
    changed = {k: v.copy() for k, v in a.items()}
    changed["a.lora_A.weight"][0, 0] += 1e-6
    assert adapter_digest(changed) != adapter_digest(a)
    renamed = {("x" + k): v for k, v in a.items()}
    assert adapter_digest(renamed) != adapter_digest(a)
    assert adapter_digest({k: v.astype(np.float64) for k, v in a.items()}) != adapter_digest(a)


def test_begin_and_finish_round_count_only_finished_training():
    record = ClientRecord(client_key=1)
    record = begin_round(record, run_id=7, server_round=3, node_id=42, received_digest="r", now=1.0)
    assert record.rounds_trained == 0 and record.history[-1]["status"] == "started"
    record = finish_round(record, loss=0.5, sent_digest="s", fingerprint="f", now=2.0)
    assert (record.rounds_trained, record.last_round, record.last_run_id, record.last_loss) == (1, 3, 7, 0.5)
    assert record.history[-1] == {"run_id": 7, "round": 3, "node_id": 42, "received": "r", "sent": "s",
                                  "loss": 0.5, "status": "done", "started": 1.0, "finished": 2.0}
    with pytest.raises(ClientStateError, match="begin_round"):
        finish_round(record, 0.1, "s", "f", 3.0)
    # a crashed message leaves a 'started' entry and no count
    record = begin_round(record, 7, 4, 42, "r2", 4.0)
    record = begin_round(record, 8, 1, 42, "r3", 5.0)
    assert record.rounds_trained == 1 and [e["status"] for e in record.history] == ["done", "started", "started"]


def test_history_is_capped():
    record = ClientRecord(client_key=0)
    for r in range(HISTORY_LIMIT + 5):
        record = finish_round(begin_round(record, 1, r, 1, "x", 0.0), 1.0, "y", "f", 0.0)
    assert len(record.history) == HISTORY_LIMIT and record.history[0]["round"] == 5
    assert record.rounds_trained == HISTORY_LIMIT + 5


# --------------------------------------------------------------------------- on disk


def test_store_round_trip_and_adapter_checks(tmp_path):
    store = ClientStateStore(tmp_path, 3)
    assert store.load() == ClientRecord(client_key=3) and store.load_adapter() is None
    store.begin_training(run_id=1, server_round=1, node_id=9, received=lora(0))
    store.finish_training(lora(1), loss=2.5, fingerprint="fp")
    again = ClientStateStore(tmp_path, 3)  # a new process after a restart
    record = again.load()
    assert record.rounds_trained == 1 and record.adapter_digest == adapter_digest(lora(1))
    assert record.history[0]["received"] == adapter_digest(lora(0))
    got = again.load_adapter("fp")
    assert got is not None and all(np.array_equal(got[k], lora(1)[k]) for k in got)
    assert again.load_adapter("another-model") is None
    assert sorted(p.name for p in (tmp_path / "client-3").iterdir()) == ["adapter.safetensors", "state.json"]
    # an adapter that does not match its record (crash between the two writes) is not trusted
    again.save_adapter(lora(2))
    assert again.load_adapter("fp") is None


def test_unreadable_or_foreign_state_is_a_clear_error(tmp_path):
    store = ClientStateStore(tmp_path, 0)
    store.folder.mkdir(parents=True)
    store.state_file.write_text("{not json")
    with pytest.raises(ClientStateError, match="delete it"):
        store.load()
    store.state_file.write_text(json.dumps({"client_key": 5}))
    with pytest.raises(ClientStateError, match="own state-dir"):
        store.load()


# --------------------------------------------------------------------------- the ClientApp uses it


@pytest.fixture()
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path_factory.getbasetemp() / "fellrec-cache"))


def test_clientapp_keeps_its_counters_across_fresh_contexts(tmp_path, private_cache):
    """Two train messages with a fresh Context each (a restarted SuperNode): the disk state carries on."""
    from client_app.app import app as client_app
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.lora_state import get_lora_state, record_to_state, state_to_record
    from fellrec_flwr.runtime import get_runtime

    sent = state_to_record(get_lora_state(get_runtime(from_run_config(SMALL)).model))
    node_config = {"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path / "state")}
    replies = []
    for server_round in (1, 2):
        msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": server_round})}),
                      message_type=MessageType.TRAIN, dst_node_id=5)
        ctx = Context(run_id=11, node_id=5, node_config=node_config, state=RecordDict(), run_config=SMALL)
        reply = client_app(msg, ctx)
        assert not reply.has_error(), reply.error
        replies.append(reply)
        assert len(ctx.state) == 0  # nothing large (nothing at all) kept in context.state
    store = ClientStateStore(tmp_path / "state", 1)
    record = store.load()
    assert record.rounds_trained == 2 and [e["round"] for e in record.history] == [1, 2]
    assert record.last_loss == pytest.approx(float(replies[-1].content["metrics"]["train-loss"]))
    assert all(e["received"] == adapter_digest(record_to_state(sent)) for e in record.history)
    trained = record_to_state(replies[-1].content["arrays"])
    assert record.adapter_digest == adapter_digest(trained) != adapter_digest(record_to_state(sent))
    saved = store.load_adapter(adapter_fingerprint(from_run_config(SMALL)))
    assert saved is not None and all(np.array_equal(saved[k], trained[k]) for k in trained)
