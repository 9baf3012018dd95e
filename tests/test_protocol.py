"""The authors' training protocol: LR warm-up + linear decay, and the best adapter by valid loss tested."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fellrec_flwr.config import ConfigError, TrainSettings, from_run_config
from fellrec_flwr.inprocess_grid import InProcessGrid
from fellrec_flwr.train.trainer import TrainingError, lr_factor, train_local
from strategies import make_strategy

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TITLES, TRAIN, fresh  # noqa: E402

# ---------------------------------------------------------------- learning-rate schedule


def test_lr_factor_matches_the_formula():
    # 10 steps, 4 warm-up: (s+1)/4 for s < 4, then (10 - s)/(10 - 4).
    expected_linear = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert [lr_factor(s, 10, 4, "linear") for s in range(10)] == pytest.approx(expected_linear)
    assert [lr_factor(s, 10, 4, "constant") for s in range(10)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)
    assert [lr_factor(s, 4, 0, "linear") for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_factor(0, 3, 0, "constant") == 1.0
    # More warm-up steps than steps: the ramp never reaches the full rate.
    assert [lr_factor(s, 3, 20, "linear") for s in range(3)] == pytest.approx([0.05, 0.10, 0.15])
    with pytest.raises(TrainingError, match="lr-schedule"):
        lr_factor(0, 3, 0, "cosine")
    with pytest.raises(TrainingError, match="warmup-steps"):
        lr_factor(0, 3, -1, "linear")


def test_train_local_steps_follow_the_schedule(work_dir, monkeypatch):
    import fellrec_flwr.train.trainer as trainer

    seen: list[float] = []

    def record_lr(model, optimizer, group, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return 1.0

    monkeypatch.setattr(trainer, "optimizer_step", record_lr)
    model, tok = fresh(work_dir)
    # 20 examples, batch 4 -> 5 steps per epoch, 2 epochs -> 10 steps, lr 0.1 * lr_scale 0.5.
    cfg = TrainSettings(batch_size=4, local_epochs=2, lr=0.1, warmup_steps=4, lr_schedule="linear", autocast="off")
    train_local(model, tok, TRAIN[:20], TITLES, cfg, seed=0, lr_scale=0.5, progress=False)
    assert seen == pytest.approx([0.05 * lr_factor(s, 10, 4, "linear") for s in range(10)])


def test_protocol_settings_are_checked():
    cfg = from_run_config({"train.warmup-steps": 20, "train.lr-schedule": "linear", "eval.test-adapter": "last"})
    assert (cfg.train.warmup_steps, cfg.train.lr_schedule, cfg.eval.test_adapter) == (20, "linear", "last")
    assert from_run_config({}).eval.test_adapter == "best"
    with pytest.raises(ConfigError, match="lr-schedule"):
        from_run_config({"train.lr-schedule": "cosine"})
    with pytest.raises(ConfigError, match="test-adapter"):
        from_run_config({"eval.test-adapter": "first"})
    with pytest.raises(ConfigError, match="warmup-steps"):
        from_run_config({"train.warmup-steps": -1})


# ---------------------------------------------------------------- best adapter is the one tested

BEST_ROUND, ROUNDS = 2, 4
app = ClientApp()


@app.train()
def _train(msg: Message, context) -> Message:
    """Each round moves the adapter by +1 (plus the client's id): adapters of different rounds differ."""
    pid = int(context.node_config["partition-id"])
    w = msg.content["arrays"]["w"].numpy() + 1.0 + pid
    metrics = MetricRecord({"train-loss": 1.0, "num-examples": 10, "client-key": pid})
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w.astype(np.float32))}), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def _evaluate(msg: Message, context) -> Message:
    """Valid loss lowest after round BEST_ROUND, worse at the last round; test loss = the adapter's value."""
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    if config["split"] == "valid":
        loss = 1.0 + (int(config["server-round"]) - BEST_ROUND - pid % 2) ** 2  # client 1's best: round 3
    else:
        loss = float(msg.content["arrays"]["w"].numpy()[0])
    metrics = MetricRecord({"eval-loss": loss, "num-examples": 10, "client-key": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _run(strategy_name: str, adapter: str) -> tuple[dict[int, float], dict[int, float], object]:
    """Per client: the value of the adapter it was tested with, and of its last-round adapter."""
    cfg = from_run_config({"strategy": strategy_name, "data.num-clients": 2, "min-clients": 2})
    strategy = make_strategy(cfg)
    grid = InProcessGrid(app, 2)
    strategy.start(grid, ArrayRecord({"w": Array(np.zeros(1, np.float32))}), num_rounds=ROUNDS)
    strategy.evaluate_all(grid, split="test", adapter=adapter)
    tested = {r["client"]: r["value"] for r in strategy.records if r["split"] == "test" and r["metric"] == "eval-loss"}
    last = {}
    for message in grid.sent:
        if message.metadata.message_type == "evaluate" and message.content["config"]["server-round"] == ROUNDS \
                and message.content["config"]["split"] == "valid":
            last[strategy.node_to_key[message.metadata.dst_node_id]] = float(message.content["arrays"]["w"].numpy()[0])
    return tested, last, strategy


@pytest.mark.parametrize("strategy_name", ["fellrec", "local", "fedavg"])
def test_the_best_adapter_by_own_valid_loss_is_tested(strategy_name):
    tested, last, strategy = _run(strategy_name, "best")
    assert {k: r for k, (r, _) in strategy.best.client_best.items()} == {0: BEST_ROUND, 1: BEST_ROUND + 1}
    for key in (0, 1):
        best_round = strategy.best.client_best[key][0]
        best_value = float(strategy.best_personal_arrays(key)["w"].numpy()[0])
        assert tested[key] == pytest.approx(best_value)  # the test evaluation got the best adapter
        assert tested[key] != pytest.approx(last[key])  # ... which is not the last round's
        if strategy_name == "local":  # no mixing: the adapter is the sum of the client's own steps
            assert best_value == pytest.approx(best_round * (1.0 + key))
    tested_last, last_again, _ = _run(strategy_name, "last")
    assert tested_last == pytest.approx(last_again)


def test_unknown_adapter_choice_is_refused():
    strategy = make_strategy(from_run_config({"data.num-clients": 2, "min-clients": 2}))
    with pytest.raises(ValueError, match="test-adapter"):
        strategy.evaluate_all(InProcessGrid(app, 2), split="test", adapter="first")
