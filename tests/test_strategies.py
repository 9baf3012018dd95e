"""The four strategies through the whole start() loop, with an in-process Grid and a numpy ClientApp."""

from __future__ import annotations

import dataclasses
import math
import pickle
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fellrec_flwr.config import FellRecConfig, FellRecSettings
from fellrec_flwr.inprocess_grid import InProcessGrid
from strategies import (
    FellRec,
    LocalOnly,
    NoNodesConnectedError,
    RecordingFedAvg,
    RecordingFedProx,
    make_strategy,
    sampling_settings,
)
from strategies.base import TIMING_METRICS, CheckpointMismatchError

SHAPES = {"lora_A": (2, 6), "lora_B": (6, 2), "bias": (3,)}


def target_for(pid: int) -> dict[str, np.ndarray]:
    """Two clusters (even / odd partition ids) pulling in opposite directions, plus client noise."""
    sign = 1.0 if pid % 2 == 0 else -1.0
    rng = np.random.default_rng(100 + pid)
    pattern = np.random.default_rng(7)  # the same pattern for every client
    return {k: (sign * pattern.standard_normal(s) + 0.2 * rng.standard_normal(s)).astype(np.float32)
            for k, s in SHAPES.items()}


def initial_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array((0.01 * rng.standard_normal(s)).astype(np.float32)) for k, s in SHAPES.items()})


def num_examples(pid: int) -> int:
    return 10 + 5 * pid


def distance(a: ArrayRecord, b: dict[str, np.ndarray] | ArrayRecord) -> float:
    get = (lambda r, k: r[k].numpy()) if isinstance(b, ArrayRecord) else (lambda r, k: r[k])
    return float(sum(np.sum((a[k].numpy() - get(b, k)) ** 2) for k in SHAPES))


app = ClientApp()


@app.train()
def train(msg: Message, context) -> Message:
    pid = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    lr = float(context.run_config.get("lr", 0.5)) * float(cfg["lr-scale"])
    target = target_for(pid)
    theta = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    loss = float(np.mean(np.concatenate([((theta[k] - target[k]) ** 2).ravel() for k in SHAPES])))
    new = {k: Array((theta[k] + lr * (target[k] - theta[k])).astype(np.float32)) for k in SHAPES}
    metrics = MetricRecord({"train-loss": loss, "num-examples": num_examples(pid), "client-key": pid})
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    best = context.run_config.get("eval-best-round")
    if best is not None:  # a valid loss that bottoms out at a chosen round (early-stop test)
        loss = 1.0 + (server_round - int(best)) ** 2
    else:
        loss = distance(msg.content["arrays"], target_for(pid)) / sum(int(np.prod(s)) for s in SHAPES.values())
    metrics = MetricRecord({"eval-loss": loss, "num-examples": num_examples(pid), "client-key": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"client-key": pid})}), reply_to=msg)


def build(name: str, n: int, **kw):
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                  min_available_nodes=n, node_wait_timeout=0.5, node_poll_interval=0.01)
    common.update(kw)
    if name == "fedavg":
        return RecordingFedAvg(**common)
    if name == "fedprox":
        return RecordingFedProx(proximal_mu=0.1, **common)
    if name == "local":
        return LocalOnly(**common)
    fellrec_keys = {f.name for f in dataclasses.fields(FellRecSettings)}
    settings = FellRecSettings(**{k: common.pop(k) for k in list(common) if k in fellrec_keys})
    return FellRec(settings, **common)


def snapshot(strategy, keys) -> dict[int, dict[str, np.ndarray]]:
    return {k: {n: a.numpy().copy() for n, a in strategy.personal_arrays(k).items()} for k in keys}


ALL = ["fellrec", "fedavg", "fedprox", "local"]


# --------------------------------------------------------------------------- factory
def test_make_strategy_picks_class_and_sampling():
    kinds = {"fellrec": FellRec, "fedavg": RecordingFedAvg, "fedprox": RecordingFedProx, "local": LocalOnly}
    for name, cls in kinds.items():
        cfg = FellRecConfig(strategy=name)
        cfg.eval.early_stop_patience = 3
        strategy = make_strategy(cfg.validate())
        assert type(strategy) is cls and strategy.best.patience == 3
    cfg = FellRecConfig(strategy="fedprox", fraction_train=0.4, min_clients=5, proximal_mu=0.3)
    settings = sampling_settings(cfg)
    assert settings["min_train_nodes"] == 2 and settings["min_available_nodes"] == 5
    assert make_strategy(cfg).proximal_mu == 0.3
    cfg = FellRecConfig(strategy="fellrec")
    cfg.fellrec.similarity_basis, cfg.fellrec.lr_scale = "updates", True
    strategy = make_strategy(cfg)
    assert strategy.settings.similarity_basis == "updates" and strategy.settings.lr_scale


def test_fraction_samples_fewer_nodes():
    cfg = FellRecConfig(strategy="fedavg", fraction_train=0.4, min_clients=5)
    cfg.node_wait_timeout = 0.5
    strategy = make_strategy(cfg)
    grid = InProcessGrid(app, 5)
    strategy.start(grid, initial_arrays(), num_rounds=1)
    assert sum(m.metadata.message_type == "train" for m in grid.sent) == 2
    assert sum(m.metadata.message_type == "evaluate" for m in grid.sent) == 5


# --------------------------------------------------------------------------- loop + failures
@pytest.mark.parametrize("name", ALL)
def test_loop_with_a_failing_client(name):
    n = 4
    strategy = build(name, n)
    grid = InProcessGrid(app, n, fail={2: {1}})
    train_config = ConfigRecord({"seed": 7})
    after_round: dict[int, dict] = {}
    result = strategy.start(grid, initial_arrays(), num_rounds=3, train_config=train_config,
                            evaluate_config=ConfigRecord({"split": "valid"}),
                            on_round_end=lambda r, s: after_round.__setitem__(r, snapshot(s, range(n))))
    assert dict(train_config) == {"seed": 7}  # per-node copies: the caller's record is untouched
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert "client-key" not in result.train_metrics_clientapp[1]

    # The failed client is identified through reply_to_message_id, the others were aggregated.
    assert strategy.failed_clients(2) == [1]
    assert strategy.failed_clients(1) == [] and strategy.failed_clients(3) == []
    assert strategy.failed_clients() == {2: [1]}
    assert strategy.client_keys() == [0, 1, 2, 3]
    assert strategy.metric_rows() == strategy.records and strategy.metric_rows() is not strategy.records
    trained = {(r["round"], r["client"]) for r in strategy.records if r["metric"] == "train-loss"}
    assert (2, 1) not in trained and {(2, 0), (2, 2), (2, 3), (3, 1)} <= trained

    # Every message carries the absolute round, lr-scale and (FedProx) proximal-mu.
    cfg = grid.sent_to(0, "train", 3).content["config"]
    assert cfg["seed"] == 7 and cfg["lr-scale"] == 1.0
    assert ("proximal-mu" in cfg) == (name == "fedprox")
    assert grid.sent_to(0, "evaluate", 2).content["config"]["split"] == "valid"

    # Round 3: the failed client trains from what it had after round 1 (its personal arrays),
    # or from the round-2 global mean for the FedAvg family.
    sent = grid.sent_to(1, "train", 3).content["arrays"]
    if name in ("fellrec", "local"):
        assert distance(sent, after_round[1][1]) == 0.0
        assert distance(sent, after_round[2][1]) == 0.0  # round 2 did not touch it
    else:
        assert distance(sent, after_round[2][0]) == 0.0  # everyone gets the same global arrays
        assert distance(sent, _mean_of_round_uploads(grid, [0, 2, 3], 2)) < 1e-10  # mean of the 3 that replied
    if name == "local":  # no aggregation at all: client 0 got back its own round-1 upload
        upload = _mean_of_round_uploads(grid, [0], 1)
        assert distance(grid.sent_to(0, "train", 2).content["arrays"], upload) < 1e-12


def _mean_of_round_uploads(grid, pids, server_round):
    """Recompute each client's round upload with the toy update rule and average by num-examples."""
    total = sum(num_examples(p) for p in pids)
    mean = {k: np.zeros(s) for k, s in SHAPES.items()}
    for p in pids:
        sent = grid.sent_to(p, "train", server_round).content["arrays"]
        target = target_for(p)
        for k in SHAPES:
            theta = sent[k].numpy()
            mean[k] += num_examples(p) / total * (theta + 0.5 * (target[k] - theta)).astype(np.float32)
    return mean


def test_client_failing_before_it_was_ever_seen_gets_initial_arrays():
    strategy = build("fellrec", 3)
    grid = InProcessGrid(app, 3, fail={1: {2}})
    strategy.start(grid, initial_arrays(), num_rounds=2)
    assert strategy.failed_clients(1) == [None]  # unknown key: the node never replied
    assert distance(grid.sent_to(2, "train", 2).content["arrays"], initial_arrays()) == 0.0


def test_missing_reply_counts_as_failure():
    strategy = build("fedavg", 3)
    grid = InProcessGrid(app, 3, drop={2: {0}})
    strategy.start(grid, initial_arrays(), num_rounds=2)
    assert strategy.failed_clients(2) == [0]
    assert "no reply" in strategy.failures[0]["reason"]


# --------------------------------------------------------------------------- FELLRec's aggregate
def _fixed_app(uploads: dict[int, dict[str, np.ndarray]], losses: dict[int, float]) -> ClientApp:
    fixed = ClientApp()

    @fixed.train()
    def _train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = ArrayRecord({k: Array(v) for k, v in uploads[pid].items()})
        metrics = MetricRecord({"train-loss": losses[pid], "num-examples": 5, "client-key": pid})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @fixed.evaluate()
    def _evaluate(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"eval-loss": 1.0, "num-examples": 5, "client-key": pid})}),
                       reply_to=msg)

    return fixed


@pytest.mark.parametrize("basis", ["parameters", "updates"])
@pytest.mark.parametrize("heating,exponent,beta,offset", [(True, "t+1/beta", 1.0, 0), (True, "(t+1)/beta", 2.0, 2),
                                                          (False, "t+1/beta", 1.0, 0)])
def test_fellrec_aggregate_equals_formula(basis, heating, exponent, beta, offset):
    rng = np.random.default_rng(5)
    n = 3
    uploads = {p: {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for p in range(n)}
    losses = {0: 0.61, 1: 0.66, 2: 0.58}
    strategy = build("fellrec", n, similarity_basis=basis, heating=heating, heating_exponent=exponent, beta=beta)
    strategy.round_offset = offset  # heating round t = absolute round - 1 = offset
    init = initial_arrays()
    strategy.start(InProcessGrid(_fixed_app(uploads, losses), n), init, num_rounds=1)

    # Reference, element by element.
    flat = [np.concatenate([uploads[p][k].ravel() for k in SHAPES]).astype(np.float64) for p in range(n)]
    init_flat = np.concatenate([init[k].numpy().ravel() for k in SHAPES]).astype(np.float64)
    basis_vec = [v - init_flat if basis == "updates" else v for v in flat]
    m = max(losses.values())
    z = sum(math.exp((losses[p] - m) / 0.05) for p in range(n))
    e = offset + 1 / beta if exponent == "t+1/beta" else (offset + 1) / beta
    for i in range(n):
        p_i = math.exp((losses[i] - m) / 0.05) / z
        w_i = math.tanh(0.7 / p_i**e) if heating else 1.0
        weights = []
        for j in range(n):
            if i == j:
                weights.append(1.0)
            else:
                a, b = basis_vec[i], basis_vec[j]
                cos = float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
                weights.append(w_i * (cos + 1) / 2)
        expected = sum(weights[j] * flat[j] for j in range(n)) / sum(weights)
        got = strategy.personal_arrays(i)
        got_flat = np.concatenate([got[k].numpy().ravel() for k in SHAPES])
        np.testing.assert_allclose(got_flat, expected, rtol=1e-5, atol=1e-6)
        assert got["lora_A"].numpy().shape == SHAPES["lora_A"] and got["lora_A"].numpy().dtype == np.float32
        if heating:
            assert strategy.warm[i] == pytest.approx(math.tanh(0.7 / p_i**e))
    # The global arrays are the plain size-weighted mean (equal sizes here).
    mean = np.mean(flat, axis=0)
    got_global = np.concatenate([strategy.global_arrays[k].numpy().ravel() for k in SHAPES])
    np.testing.assert_allclose(got_global, mean, rtol=1e-5, atol=1e-6)


def test_lr_scale_sends_warm_weights():
    strategy = build("fellrec", 3, lr_scale=True)
    grid = InProcessGrid(app, 3)
    strategy.start(grid, initial_arrays(), num_rounds=2)
    assert all(grid.sent_to(p, "train", 1).content["config"]["lr-scale"] == 1.0 for p in range(3))
    warm_after_1 = {r["client"]: r["value"] for r in strategy.records
                    if r["metric"] == "warm-weight" and r["round"] == 1}
    scales = [grid.sent_to(p, "train", 2).content["config"]["lr-scale"] for p in range(3)]
    assert scales == pytest.approx([warm_after_1[p] for p in range(3)])
    assert min(scales) < 1.0


# --------------------------------------------------------------------------- personalisation
def test_fellrec_personalises_by_cluster():
    n, rounds = 6, 5
    results = {}
    for name in ("fellrec", "fedavg"):
        strategy = build(name, n)
        strategy.start(InProcessGrid(app, n), initial_arrays(), num_rounds=rounds)
        results[name] = strategy
    fell = results["fellrec"]
    same = np.mean([distance(fell.personal_arrays(i), fell.personal_arrays(j))
                    for i in range(n) for j in range(i + 1, n) if i % 2 == j % 2])
    cross = np.mean([distance(fell.personal_arrays(i), fell.personal_arrays(j))
                     for i in range(n) for j in range(i + 1, n) if i % 2 != j % 2])
    assert same < 0.1 * cross  # clients of one cluster end up together, apart from the other cluster
    to_target = {name: np.mean([distance(s.personal_arrays(i), target_for(i)) for i in range(n)])
                 for name, s in results.items()}
    assert to_target["fellrec"] < 0.2 * to_target["fedavg"]  # FedAvg's one model fits neither cluster


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name", ["fellrec", "fedavg"])
def test_resume_equals_uninterrupted_run(name):
    n = 4
    kw = {"similarity_basis": "updates", "lr_scale": True} if name == "fellrec" else {}
    full = build(name, n, **kw)
    full.start(InProcessGrid(app, n), initial_arrays(), num_rounds=4)

    first = build(name, n, **kw)
    first.start(InProcessGrid(app, n), initial_arrays(), num_rounds=2)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert state["round"] == 2

    resumed = build(name, n, **kw)
    resumed.load_state_dict(state)
    assert resumed.round_offset == 2
    grid = InProcessGrid(app, n, first_node_id=5000)  # new node ids, as after a restart
    resumed.start(grid, resumed.global_arrays, num_rounds=2)
    assert resumed.round_offset == 4
    trained_rounds = {int(m.content["config"]["server-round"]) for m in grid.sent if m.metadata.message_type == "train"}
    assert trained_rounds == {3, 4}
    for key in range(n):
        for k in SHAPES:
            np.testing.assert_array_equal(resumed.personal_arrays(key)[k].numpy(), full.personal_arrays(key)[k].numpy())
    untimed = lambda records: [r for r in records if r["metric"] not in TIMING_METRICS]  # noqa: E731
    assert untimed(resumed.records) == untimed(full.records)
    assert [r["round"] for r in resumed.records if r["metric"] == "round-seconds"] == [1, 2, 3, 4]


def test_load_state_from_other_strategy_is_rejected():
    state = build("fedavg", 2).state_dict()
    with pytest.raises(CheckpointMismatchError, match="resume with the same strategy"):
        build("fellrec", 2).load_state_dict(state)


# --------------------------------------------------------------------------- evaluation schedule
def test_eval_interval_and_final_round():
    strategy = build("fellrec", 2, eval_interval=2)
    grid = InProcessGrid(app, 2)
    result = strategy.start(grid, initial_arrays(), num_rounds=5)
    eval_rounds = {int(m.content["config"]["server-round"]) for m in grid.sent if m.metadata.message_type == "evaluate"}
    assert eval_rounds == {2, 4, 5} and sorted(result.evaluate_metrics_clientapp) == [2, 4, 5]
    assert {r["round"] for r in strategy.records if r["split"] == "valid"} == {2, 4, 5}


def test_final_test_evaluation_records_split():
    strategy = build("local", 2)
    grid = InProcessGrid(app, 2)
    strategy.start(grid, initial_arrays(), num_rounds=1)
    metrics = strategy.evaluate_all(grid, split="test")
    assert metrics is not None and "eval-loss" in metrics
    assert {r["client"] for r in strategy.records if r["split"] == "test"} == {0, 1}
    assert strategy.best.best_round == 1  # the test split does not feed early stopping


def test_early_stop_on_weighted_valid_loss():
    strategy = build("fedavg", 3, early_stop_patience=2)
    grid = InProcessGrid(app, 3, run_config={"eval-best-round": 2})
    ended: list[int] = []
    result = strategy.start(grid, initial_arrays(), num_rounds=10,
                            on_round_end=lambda r, s: ended.append(r) if s is strategy else None)
    assert ended == [1, 2, 3, 4] and strategy.best.stopped_early
    assert strategy.best.best_round == 2 and strategy.best.best_loss == pytest.approx(1.0)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4]
    assert all(strategy.best.client_best[k] == (2, 1.0) for k in range(3))
    assert strategy.best_personal_arrays(0) is not None


# --------------------------------------------------------------------------- node wait
def test_node_wait_times_out_and_proceeds_with_connected_nodes():
    grid = InProcessGrid(app, 3)
    grid.connected = [grid.node_of(0), grid.node_of(1)]
    strategy = build("fellrec", 3, node_wait_timeout=1.0)
    t0 = time.monotonic()
    strategy.start(grid, initial_arrays(), num_rounds=3)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 2.5  # one timeout, not one per round and stage
    assert sorted(strategy.node_to_key.values()) == [0, 1]
    grid.connected = [grid.node_of(0)]  # fewer still: wait again, then go on with one node
    t0 = time.monotonic()
    strategy.start(grid, initial_arrays(), num_rounds=1)
    assert time.monotonic() - t0 >= 1.0 and strategy.round_offset == 4


def test_no_nodes_raises_clear_error():
    grid = InProcessGrid(app, 2)
    grid.connected = []
    with pytest.raises(NoNodesConnectedError, match="node-wait-timeout"):
        build("fedavg", 2, node_wait_timeout=0.05).start(grid, initial_arrays(), num_rounds=1)


# --------------------------------------------------------------------------- bad replies
def _app_with(reply_fn) -> ClientApp:
    bad = ClientApp()

    @bad.train()
    def _train(msg: Message, context) -> Message:
        return Message(reply_fn(int(context.node_config["partition-id"])), reply_to=msg)

    return bad


def _content(pid: int, key: int, shape=(3,), loss: bool = True) -> RecordDict:
    metrics = {"num-examples": 5, "client-key": key}
    if loss:
        metrics["train-loss"] = 1.0
    return RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(shape, dtype=np.float32))}),
                       "metrics": MetricRecord(metrics)})


@pytest.mark.parametrize("reply_fn,error", [
    (lambda pid: _content(pid, key=0), "both replied as client-key 0"),
    (lambda pid: _content(pid, key=pid, shape=(3,) if pid == 0 else (4,)), "shape"),
    (lambda pid: _content(pid, key=pid, loss=False), "train-loss"),
])
def test_bad_replies_raise_clear_errors(reply_fn, error):
    with pytest.raises(ValueError, match=error):
        initial = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
        build("fellrec", 2).start(InProcessGrid(_app_with(reply_fn), 2), initial, num_rounds=1)


# --------------------------------------------------------------------------- what comes from Flower
def test_strategies_are_flowers_fedavg_and_override_only_what_base_explains():
    from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

    from strategies import FedSaLora, FfaLora, StrategyBase

    for cls in (RecordingFedAvg, RecordingFedProx, FellRec, LocalOnly, FfaLora, FedSaLora):
        assert issubclass(cls, FedAvg)
    assert issubclass(RecordingFedProx, FedProx)
    # Each of these overrides has its reason in strategies/base.py's docstring; a new one (say a
    # copy of summary() or of FedAvg's reply checks) has to be added here and explained there.
    flower_names = {name for cls in (FedAvg, Strategy) for name in vars(cls) if callable(getattr(cls, name))}
    overridden = flower_names & set(vars(StrategyBase))
    assert overridden == {"__init__", "configure_train", "configure_evaluate", "aggregate_train", "aggregate_evaluate",
                          "start"}


def test_start_runs_no_round_of_its_own(monkeypatch):
    """Every round is Flower's Strategy.start: with that loop stubbed out, start() sends nothing."""
    from flwr.serverapp.strategy import Result, Strategy

    calls = []
    monkeypatch.setattr(Strategy, "start", lambda self, *args, **kwargs: calls.append(kwargs) or Result())
    strategy = build("fellrec", 2)
    grid = InProcessGrid(app, 2)
    result = strategy.start(grid, initial_arrays(), num_rounds=3)
    assert grid.sent == [] and strategy.round_offset == 0 and strategy.records == []
    assert len(calls) == 1 and calls[0]["num_rounds"] == 3 and calls[0]["evaluate_fn"] == strategy.end_round
    assert distance(result.arrays, initial_arrays()) == 0.0  # no aggregate: the arrays it started from


def test_resumed_start_keeps_rounds_absolute():
    n = 2
    first = build("fedavg", n)
    first.start(InProcessGrid(app, n), initial_arrays(), num_rounds=2)
    resumed = build("fedavg", n)
    resumed.load_state_dict(first.state_dict())
    evaluated: list[int] = []
    ended: list[int] = []
    result = resumed.start(InProcessGrid(app, n, first_node_id=5000), resumed.global_arrays, num_rounds=2,
                           evaluate_fn=lambda r, arrays: evaluated.append(r) or MetricRecord({"r": r}),
                           on_round_end=lambda r, s: ended.append(r))
    assert evaluated == [3, 4] and ended == [3, 4]  # no round-0 evaluation: the first run did it
    assert sorted(result.train_metrics_clientapp) == [3, 4] and sorted(result.evaluate_metrics_serverapp) == [3, 4]
    assert {r["round"] for r in resumed.records if r["split"] == "train"} == {1, 2, 3, 4}
    assert resumed.absolute_round(1) == 1  # outside start() Flower's round is the run's round


def test_rounds_left_after_early_stop_send_nothing():
    strategy = build("fedavg", 3, early_stop_patience=2)
    grid = InProcessGrid(app, 3, run_config={"eval-best-round": 2})
    strategy.start(grid, initial_arrays(), num_rounds=10)
    sent_rounds = {int(m.content["config"]["server-round"]) for m in grid.sent}
    assert sent_rounds == {1, 2, 3, 4} and strategy.failures == []
    # The stop lasts only for that start(): the final test evaluation still goes out.
    assert strategy.evaluate_all(grid, split="test") is not None


# --------------------------------------------------------------------------- readable logs
def test_fellrec_round_log_is_one_short_summary_at_100_clients():
    """One line per round with the spread of self-weights (it used to list all 100 clients); the full
    matrix W still goes to the records that become metrics.csv."""
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    n = 100
    strategy = build("fellrec", n)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    FLOWER_LOGGER.addHandler(handler)
    try:
        strategy.start(InProcessGrid(app, n), initial_arrays(), num_rounds=1)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    summaries = [line for line in lines if "FELLRec balance" in line]
    assert len(summaries) == 1 and len(summaries[0]) < 250, summaries
    assert "over 100 clients" in summaries[0]
    self_weights = {r["client"]: r["value"] for r in strategy.records
                    if r["split"] == "train" and r["metric"] == "self-weight"}
    values = np.array(list(self_weights.values()))
    for word, value in (("min", values.min()), ("median", np.median(values)), ("max", values.max())):
        assert f"{word} {value:.3f}" in summaries[0]
    low = min(self_weights, key=self_weights.get)
    assert f"min {values.min():.3f} (client {low})" in summaries[0]
    matrix = [r for r in strategy.records if r["split"] == "balance"]
    assert len(matrix) == n * n  # every W_ij, for metrics.csv


# --------------------------------------------------------------------------- one typed source per setting
def test_fellrec_takes_its_settings_object_and_checks_it_as_the_config_does():
    from fellrec_flwr.config import ConfigError

    settings = FellRecSettings(similarity_basis="updates", alpha=0.4)
    assert FellRec(settings).settings is settings
    with pytest.raises(ConfigError, match="fellrec.similarity-kernel='cubic' is not one of linear, softmax"):
        FellRec(FellRecSettings(similarity_kernel="cubic"))
    with pytest.raises(TypeError, match="settings"):
        FellRec(alpha=0.4)  # the loose keywords of old: one field at a time, defaults written twice


def test_fellrec_math_has_no_defaults_of_its_own():
    """The paper's values are FellRecSettings' defaults; the math takes them, it does not repeat them."""
    import inspect

    from strategies import fellrec_math

    setting_like = {"alpha", "beta", "temperature", "heating", "exponent", "kernel", "similarity_temperature"}
    repeated = [f"{name}({p.name}={p.default!r})" for name, fn in vars(fellrec_math).items()
                if inspect.isfunction(fn) and fn.__module__ == fellrec_math.__name__
                for p in inspect.signature(fn).parameters.values()
                if p.name in setting_like and p.default is not inspect.Parameter.empty]
    assert not repeated, repeated


# --------------------------------------------------------------------------- base.py's pieces, alone
def test_best_adapters_track_each_clients_own_best_and_stop_on_the_weighted_loss():
    from strategies.best import BestAdapters

    a1, a2, b1 = initial_arrays(), initial_arrays(), initial_arrays()
    best = BestAdapters(patience=2)
    assert best.observe(1, [(0, 2.0, 1.0, a1), (1, 1.0, 3.0, b1)]) == pytest.approx(1.25)
    assert best.observe(2, [(0, 1.5, 1.0, a2), (1, 2.0, 3.0, initial_arrays())]) == pytest.approx(1.875)
    assert best.client_best == {0: (2, 1.5), 1: (1, 1.0)} and best.arrays[0] is a2 and best.arrays[1] is b1
    assert (best.best_round, best.evals_since_best, best.stopped_early) == (1, 1, False)
    best.observe(3, [(0, 9.0, 1.0, a1), (1, 9.0, 3.0, a1)])
    assert best.stopped_early  # two validation rounds without a better weighted loss
    assert best.observe(4, [(0, 1.0, 0.0, a1)]) is None  # no examples: no weighted loss
    again = BestAdapters()
    again.load(best.state())
    assert again.client_best == best.client_best and again.best_loss == best.best_loss and again.stopped_early
    assert again.arrays[1]["bias"].numpy().tolist() == b1["bias"].numpy().tolist()


def test_run_recorder_rows_failures_and_state():
    from fellrec_flwr.eval.recorder import SERVER, RunRecorder

    rec = RunRecorder()
    rec.add_metrics(1, 3, "train", {"train-loss": 0.5, "client-key": 3, "note": "text"}, skip=("client-key",))
    rec.add(1, SERVER, "server", "round-seconds", 2.0)
    rec.add_failure(1, "train", node_id=9, client=None, reason="no reply before the timeout")
    assert rec.metric_rows() == [{"round": 1, "client": 3, "split": "train", "metric": "train-loss", "value": 0.5},
                                 {"round": 1, "client": -1, "split": "server", "metric": "round-seconds", "value": 2.0}]
    assert rec.clients() == {3} and rec.failed_clients(1) == [None] and rec.failed_clients() == {1: [None]}
    again = RunRecorder()
    again.load(rec.state())
    assert again.metric_rows() == rec.metric_rows() and again.failures == rec.failures


def test_evaluate_modes_are_explicit_and_the_round_end_hook_has_one_door():
    """evaluate_all's mode travels as an Evaluation, not as flags left on the strategy; the hook is
    start()'s parameter only (an attribute of the same name was a second way to set it)."""
    from strategies.base import Evaluation, StrategyBase

    strategy = build("fedavg", 2)
    grid = InProcessGrid(app, 2)
    strategy.start(grid, initial_arrays(), num_rounds=1)
    before = dict(vars(strategy))
    strategy.evaluate_all(grid, split="test", adapter="best")
    assert not any(name.startswith(("_force", "_send_best", "_eval_split")) for name in vars(strategy))
    assert strategy._evaluation == before["_evaluation"]  # the loop's evaluation is left as it was
    assert Evaluation("test", send_best=True) != Evaluation("test")
    assert not hasattr(StrategyBase, "on_round_end")


def test_checkpoint_format_is_unchanged_by_the_pieces():
    """Old checkpoints still load: the pieces' keys side by side, as before base.py was split."""
    strategy = build("fedavg", 2)
    strategy.start(InProcessGrid(app, 2), initial_arrays(), num_rounds=1)
    assert set(strategy.state_dict()) == {
        "version", "strategy", "round", "records", "failures", "node_to_key", "best_loss", "best_round",
        "evals_since_best", "stopped_early", "rng_state", "global", "initial", "client_best", "best_arrays",
        "best_index"}
