"""bench/games_federated.py aggregates through the strategy classes, not a copy of their math:
one round on a tiny model gives the same per-client adapters through the benchmark's path
(`federated_rounds`) and through the in-process ServerApp (server_app.main), with a
non-default strategy setting so that a bench that ignored the run's strategy settings would
differ (issue 21, item 4)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import server_app.app as server
from client_app.app import app as client_app
from fellrec_flwr.config import from_run_config
from fellrec_flwr.inprocess_grid import InProcessGrid
from fellrec_flwr.model.lora_state import record_to_state
from fellrec_flwr.runtime import initial_lora
from fellrec_flwr.train.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import games_federated  # noqa: E402

TINY = {
    "data.num-clients": 3, "min-clients": 3, "data.train-samples": 24, "data.valid-users": 12,
    "data.test-users": 12, "data.bpr-epochs": 1, "eval.num-beams": 1, "eval.max-new-tokens": 4,
    "eval.interval": 0, "model.tiny-layers": 2, "model.tiny-vocab": 400, "train.batch-size": 8,
    "model.tiny-pretrain-prompts": 16, "num-server-rounds": 1, "sasrec.enabled": False,
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path_factory.getbasetemp() / "fellrec-cache"))


def via_serverapp(run_config: dict, run_dir: Path) -> dict[int, dict[str, np.ndarray]]:
    """Each client's adapter after round 1 of the ServerApp run in process (its checkpoint)."""
    grid = InProcessGrid(client_app, 3, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    ckpt = load_checkpoint(run_dir)
    assert ckpt.round == 1
    if "personal" in ckpt.strategy_state:
        return {int(k): {n: np.asarray(a) for n, a in v.items()} for k, v in ckpt.strategy_state["personal"].items()}
    return {k: dict(ckpt.global_arrays) for k in range(3)}  # FedAvg: every client's adapter is the global one


@pytest.mark.parametrize("strategy, setting", [
    ("fellrec", {"fellrec.alpha": 0.2, "fellrec.similarity-kernel": "softmax"}),
    ("fedavg", {}),
])
def test_one_round_through_the_bench_equals_the_serverapp(tmp_path, strategy, setting):
    run_config = {**TINY, **setting, "strategy": strategy, "out-dir": str(tmp_path), "run-name": "app"}
    expected = via_serverapp(run_config, tmp_path / "app")

    cfg = from_run_config(run_config)
    init = initial_lora(cfg)
    bench = games_federated.federated_rounds(cfg, init, InProcessGrid(client_app, 3, run_config), rounds=1)
    got = {k: record_to_state(bench.personal_arrays(k)) for k in range(3)}

    assert got.keys() == expected.keys() == {0, 1, 2}
    for key in expected:
        assert got[key].keys() == expected[key].keys()
        for name, value in expected[key].items():
            np.testing.assert_array_equal(got[key][name], value, err_msg=f"client {key}, {name}")
    # not vacuous: the round trained, and FELLRec gave each client its own mix
    assert any(not np.array_equal(got[0][n], init[n]) for n in init)
    if strategy == "fellrec":
        assert any(not np.array_equal(got[0][n], got[1][n]) for n in init)
        weights = games_federated.recorded_weights(bench, 1, [0, 1, 2])
        assert weights is not None and np.allclose(weights.sum(axis=1), 1.0)


def test_bench_client_app_replies_as_the_strategies_expect():
    """The bench's own ClientApp: arrays, train-loss, num-examples and client-key; FFA-LoRA refused."""
    from flwr.app import ConfigRecord, Message, MessageType

    from fellrec_flwr.model.lora_state import state_to_record

    seen = []

    def train_client(c, r, state, lr_scale, proximal_mu):
        seen.append((c, r, lr_scale, proximal_mu))
        return {k: v + 1 for k, v in state.items()}, {"loss": 0.5, "examples": 7}

    app = games_federated.bench_client_app(train_client)
    sent = {"w": np.zeros((2, 2), dtype=np.float32)}
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    config = ConfigRecord({"server-round": 3, "lr-scale": 0.5, "proximal-mu": 0.1})
    reply = app(Message(RecordDict({"arrays": state_to_record(sent), "config": config}),
                        message_type=MessageType.TRAIN, dst_node_id=5), ctx)
    assert not reply.has_error(), reply.error
    assert seen == [(2, 3, 0.5, pytest.approx(0.1))]
    metrics = reply.content["metrics"]
    assert (metrics["client-key"], metrics["num-examples"], metrics["train-loss"]) == (2, 7, 0.5)
    np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), np.ones((2, 2)))
    config["freeze-lora-a"] = True
    with pytest.raises(ValueError, match="FFA-LoRA"):
        app(Message(RecordDict({"arrays": state_to_record(sent), "config": config}),
                    message_type=MessageType.TRAIN, dst_node_id=5), ctx)


def fake_setup(tmp_path: Path, rounds: int, monkeypatch) -> SimpleNamespace:
    """The bench's train phase with its model and cached states replaced by numpy stand-ins: client c
    moves every tensor by (c + 1) / 10 per round, with loss 1 + c / 10 (what FELLRec's softmax reads)."""
    def train_once(setup, state, pool, seed_tags, item_states, lr_scale=1.0, proximal_mu=0.0):
        c = pool
        setup.trained.append(seed_tags)
        return ({k: v + np.float32((c + 1) / 10 * lr_scale) for k, v in state.items()},
                {"loss": 1.0 + c / 10, "examples": 10 + c, "cpu": 0.0, "wall": 0.0, "steps": 1})

    monkeypatch.setattr(games_federated, "train_once", train_once)
    monkeypatch.setattr(games_federated, "windows_of", lambda setup, c: c)
    monkeypatch.setattr(games_federated, "_item_ids", lambda setup: [])
    monkeypatch.setattr(games_federated, "load_states", lambda path: ([], {}))
    init = {"base_model.layers.0.q_proj.lora_A.weight": np.full((2, 4), 0.5, dtype=np.float32),
            "base_model.layers.0.q_proj.lora_B.weight": np.zeros((4, 2), dtype=np.float32)}
    args = SimpleNamespace(num_clients=3, rounds=rounds, out=str(tmp_path / "out"), seed=2024, model="m")
    return SimpleNamespace(args=args, cache=tmp_path / "cache", init_state=init, start=0, trained=[],
                           run_config={"data.num-clients": 3, "min-clients": 1, "seed": 2024})


def test_bench_train_phase_writes_every_round_and_resumes_from_the_strategy_checkpoint(tmp_path, monkeypatch):
    straight = fake_setup(tmp_path / "straight", 2, monkeypatch)
    games_federated.phase_train(straight, ["fellrec", "fedavg", "local"])
    adapter = lambda setup, name: games_federated.load_adapter(games_federated.adapter_path(setup, name))  # noqa: E731
    a_key = "base_model.layers.0.q_proj.lora_A.weight"
    # local: no mixing, client 0 moved by 0.1 in each of 2 rounds; FedAvg: one adapter for all
    np.testing.assert_allclose(adapter(straight, "local-r2-c0")[a_key], 0.7, atol=1e-6)
    np.testing.assert_array_equal(adapter(straight, "fedavg-r2-c0")[a_key], adapter(straight, "fedavg-r2-c2")[a_key])
    log = json.loads((Path(straight.args.out) / "train" / "fellrec.json").read_text())
    assert [e["round"] for e in log["rounds"]] == [1, 2]
    weights = np.array(log["rounds"][1]["weights"])
    assert weights.shape == (3, 3) and np.allclose(weights.sum(axis=1), 1.0)

    # stopped after round 1, then run to round 2: resumes from the strategy's checkpoint
    stopped = fake_setup(tmp_path / "stopped", 1, monkeypatch)
    games_federated.phase_train(stopped, ["fellrec"])
    stopped.args.rounds = 2
    stopped.trained.clear()
    games_federated.phase_train(stopped, ["fellrec"])
    assert stopped.trained == [("round", 2, "client", c) for c in range(3)]  # round 1 was not redone
    for c in range(3):
        for name, value in adapter(straight, f"fellrec-r2-c{c}").items():
            np.testing.assert_array_equal(adapter(stopped, f"fellrec-r2-c{c}")[name], value)
    resumed = json.loads((Path(stopped.args.out) / "train" / "fellrec.json").read_text())
    assert [e["round"] for e in resumed["rounds"]] == [1, 2]
    assert resumed["rounds"][1]["weights"] == log["rounds"][1]["weights"]


def test_bench_train_phase_uses_the_runs_strategy_settings(tmp_path, monkeypatch):
    """A fellrec.* key in the bench's run config moves its weights, as it would in flwr run (the
    bench's former loop always used the paper's defaults)."""
    logs = {}
    for name, extra in (("default", {}), ("alpha", {"fellrec.alpha": 0.05})):
        setup = fake_setup(tmp_path / name, 2, monkeypatch)
        setup.run_config.update(extra)
        games_federated.phase_train(setup, ["fellrec"])
        logs[name] = json.loads((Path(setup.args.out) / "train" / "fellrec.json").read_text())
    default, alpha = (np.array(logs[n]["rounds"][1]["weights"]) for n in ("default", "alpha"))
    assert np.abs(default - alpha).max() > 0.1
