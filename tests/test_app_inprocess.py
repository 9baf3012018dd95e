"""The ServerApp and ClientApp together, without Ray: an in-process Grid calls the ClientApp.

Covers the run folder, resume (2 + 2 rounds == 4 rounds, identical per-client LoRA) and the
ClientApp called directly with a built Message.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import server_app.app as server
from client_app.app import app as client_app
from fellrec_flwr.train.checkpoint import load_checkpoint
from fellrec_flwr.config import ConfigError
from fellrec_flwr.inprocess_grid import InProcessGrid

SMALL = {
    "data.num-clients": 2, "min-clients": 2, "data.train-samples": 48, "data.valid-users": 16,
    "data.test-users": 16, "data.bpr-epochs": 2, "eval.num-beams": 2, "eval.max-new-tokens": 8,
    "model.tiny-layers": 2, "model.tiny-vocab": 800, "train.batch-size": 8, "model.tiny-pretrain-prompts": 64,
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path_factory.getbasetemp() / "fellrec-cache"))


def run_server(run_config: dict) -> None:
    grid = InProcessGrid(client_app, 2, run_config)
    server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


def personal_state(run_dir) -> dict[int, dict[str, np.ndarray]]:
    state = load_checkpoint(run_dir).strategy_state
    return {int(k): {n: np.asarray(a) for n, a in v.items()} for k, v in state["personal"].items()}


@pytest.mark.parametrize("strategy", ["fellrec", "local"])
def test_resume_two_plus_two_equals_four_rounds(tmp_path, strategy):
    base = {**SMALL, "strategy": strategy, "out-dir": str(tmp_path), "eval.interval": 0}
    run_server({**base, "num-server-rounds": 4, "run-name": "straight"})
    run_server({**base, "num-server-rounds": 2, "run-name": "stopped"})
    assert load_checkpoint(tmp_path / "stopped").round == 2
    run_server({**base, "num-server-rounds": 4, "run-name": "stopped", "resume-from": str(tmp_path / "stopped")})
    assert load_checkpoint(tmp_path / "stopped").round == 4
    straight, resumed = personal_state(tmp_path / "straight"), personal_state(tmp_path / "stopped")
    assert straight.keys() == resumed.keys() == {0, 1}
    for key in straight:
        for name, value in straight[key].items():
            np.testing.assert_array_equal(value, resumed[key][name])
    # the LoRA moved away from its initialisation, so the equality above is not vacuous
    init = load_checkpoint(tmp_path / "straight").strategy_state["initial"]
    assert any(not np.array_equal(np.asarray(init[n]), straight[0][n]) for n in straight[0])


def test_run_folder_has_metrics_summary_plots_and_adapters(tmp_path):
    run_server({**SMALL, "num-server-rounds": 1, "out-dir": str(tmp_path), "run-name": "r"})
    run_dir = tmp_path / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["split"] == "test" and set(summary["per_client"]) == {"0", "1"}
    assert set(summary["balance"]["recall@10"]) >= {"mean", "std", "cv", "worst_client", "gap"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-server-rounds"] == 1
    assert {"recall_by_round.png", "final_by_client.png", "metrics.csv"} <= {p.name for p in run_dir.iterdir()}
    # system costs: the server's round time and every client's training time (no GPU here)
    rows = pd.read_csv(run_dir / "metrics.csv")
    timing = rows[rows["metric"].isin(["round-seconds", "train-seconds"])]
    assert set(map(tuple, timing[["metric", "client"]].values)) == {("round-seconds", -1), ("train-seconds", 0),
                                                                   ("train-seconds", 1)}
    assert (timing["value"] > 0).all() and "peak-gpu-mb" not in set(rows["metric"])
    # per-user target ranks of the run and of every baseline on the same test users, and their intervals
    per_user = pd.read_csv(run_dir / "per_user.csv")
    test = per_user[per_user["split"] == "test"]
    assert set(test["method"]) == {"fellrec", "popularity", "markov", "sasrec"}
    users = {m: set(part["user_id"]) for m, part in test.groupby("method")}
    assert users["fellrec"] == users["popularity"] == users["markov"] == users["sasrec"] and len(users["fellrec"]) == 16
    own = test[test["method"] == "fellrec"]
    hits = ((own["target_rank"] >= 0) & (own["target_rank"] < 10)).mean()
    assert summary["overall"]["recall@10"] == pytest.approx(hits)
    low, high = summary["intervals"]["recall@10 - popularity"][1:]
    assert "recall@10 - sasrec" in summary["intervals"]
    assert summary["intervals"]["n_users"] == 16 and low <= high

    from peft import PeftModel
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.loading import load_base_model
    from fellrec_flwr.runtime import prepare_data

    cfg = from_run_config(SMALL)
    data = prepare_data(cfg)
    # each user's target and top 10 come back from the clients: the rank is the target's place in them
    targets = {ex.user_id: ex.target for ex in data.split("test")}
    assert (own["target"] == own["user_id"].map(targets)).all()
    assert (own["original_target_item"].astype(str) == own["target"].map(data.original_item_ids)).all()
    for rank, top, target in zip(own["target_rank"], own["top10"].map(json.loads), own["target"]):
        assert len(top) == 10
        if 0 <= rank < 10:
            assert data.titles[top[rank]] == data.titles[target]
        else:
            assert data.titles[target] not in {data.titles[i] for i in top}
    base, _ = load_base_model(cfg.model, data.titles, data.path)
    loaded = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "client-1"))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


def test_resume_with_changed_settings_is_refused(tmp_path):
    base = {**SMALL, "out-dir": str(tmp_path), "run-name": "a", "eval.interval": 0}
    run_server({**base, "num-server-rounds": 1})
    with pytest.raises(ConfigError, match="lora.r"):
        run_server({**base, "num-server-rounds": 2, "lora.r": 4, "resume-from": str(tmp_path / "a")})


def test_clientapp_called_directly_trains_and_reports_its_key(tmp_path):
    from fellrec_flwr.config import from_run_config
    from fellrec_flwr.model.lora_state import get_lora_state, state_to_record
    from fellrec_flwr.runtime import get_runtime

    rt = get_runtime(from_run_config(SMALL))
    sent = state_to_record(get_lora_state(rt.model))
    msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1, "proximal-mu": 0.0})}),
                  message_type=MessageType.TRAIN, dst_node_id=5)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config=SMALL)
    reply = client_app(msg, ctx)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["client-key"] == 1 and metrics["num-examples"] > 0 and np.isfinite(metrics["train-loss"])
    got = reply.content["arrays"]
    assert isinstance(got, ArrayRecord) and list(got.keys()) == list(sent.keys())
    assert any(not np.array_equal(got[k].numpy(), sent[k].numpy()) for k in sent.keys())


def test_clientapp_without_partition_id_fails_with_a_clear_error():
    # Flower turns this exception into an error reply that the strategy logs and tolerates.
    msg = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=5)
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config=SMALL)
    with pytest.raises(ValueError, match="--node-config \"partition-id="):
        client_app(msg, ctx)


def test_split_run_trains_through_the_service_and_matches_the_unsplit_run(tmp_path):
    """Flexible storage changes where the middle layers run, not what is learned."""
    base = {**SMALL, "model.tiny-layers": 4, "lora.layers": "0,3", "out-dir": str(tmp_path),
            "num-server-rounds": 2, "eval.interval": 0}  # default decoding: constrained, through the service
    run_server({**base, "run-name": "whole"})
    run_server({**base, "run-name": "split", "split.enabled": True, "split.front-k": 1, "split.back-k": 1})
    whole, split = personal_state(tmp_path / "whole"), personal_state(tmp_path / "split")
    assert whole.keys() == split.keys() == {0, 1}
    for key in whole:
        for name, value in whole[key].items():
            np.testing.assert_allclose(split[key][name], value, atol=1e-5, rtol=1e-4)
    summary_whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    summary_split = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary_split["overall"]["recall@10"] == pytest.approx(summary_whole["overall"]["recall@10"])


def test_split_lora_lives_only_on_client_layers(tmp_path):
    cfg = {**SMALL, "model.tiny-layers": 4, "split.enabled": True, "out-dir": str(tmp_path), "run-name": "s",
           "num-server-rounds": 1, "eval.interval": 0}
    run_server(cfg)
    names = list(load_checkpoint(tmp_path / "s").strategy_state["initial"])
    layers = {int(n.split("layers.")[1].split(".")[0]) for n in names}
    assert layers == {0, 3}
