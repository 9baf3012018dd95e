"""FFA-LoRA, FedSA-LoRA, FELLRec's delta-w basis and balance records, and the zero-copy conversions.

Hand-made LoRA arrays (two modules with A (r x k) and B (d x r)) through the real start()
loop with an in-process Grid and numpy ClientApps; every aggregate is checked against a
direct computation.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fellrec_flwr.config import ConfigError, FellRecConfig, FellRecSettings, from_run_config
from fellrec_flwr.inprocess_grid import InProcessGrid
from strategies import FedSaLora, FellRec, FfaLora, make_strategy
from strategies import fellrec_math as fm
from strategies.arrays import ArrayLayoutError, FlatLayout, array_from_values, array_view
from strategies.fellrec_plus import PRESET
from strategies.ffa_lora import FREEZE_LORA_A, LoraANotFrozenError

R = 2
SHAPES = {"m0.lora_A.weight": (R, 5), "m0.lora_B.weight": (4, R),
          "m1.lora_A.weight": (R, 3), "m1.lora_B.weight": (6, R)}
SIZES = {0: 10, 1: 30, 2: 20}  # examples per client (the FedAvg weights)


def initial_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array((rng.standard_normal(s) if "lora_A" in k else np.zeros(s)).astype(np.float32))
                        for k, s in SHAPES.items()})


def upload(pid: int, server_round: int, received: dict[str, np.ndarray], freeze_a: bool) -> dict[str, np.ndarray]:
    """A deterministic 'training': every trainable tensor moves by a client- and round-specific step."""
    rng = np.random.default_rng(1000 * server_round + pid)
    return {k: v if (freeze_a and "lora_A" in k) else (v + rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in received.items()}


def lora_app(respect_freeze: bool = True) -> tuple[ClientApp, dict]:
    """A ClientApp that records what it received and uploaded per (round, pid)."""
    app, log = ClientApp(), {"received": {}, "uploaded": {}, "config": {}}

    @app.train()
    def _train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        config = msg.content["config"]
        server_round = int(config["server-round"])
        received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        freeze = respect_freeze and bool(config.get(FREEZE_LORA_A, False))
        new = upload(pid, server_round, received, freeze)
        log["received"][server_round, pid] = received
        log["uploaded"][server_round, pid] = new
        log["config"][server_round, pid] = dict(config)
        metrics = MetricRecord({"train-loss": 0.5 + 0.1 * pid, "num-examples": SIZES[pid], "client-key": pid})
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                                   "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"eval-loss": 1.0, "num-examples": SIZES[pid], "client-key": pid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.query()
    def _query(msg: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"client-key": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    return app, log


def build(cls, n: int = 3, **kw):
    """`cls` with Flower's sampling for n clients; for FellRec, `kw` are fellrec.* settings."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                  min_available_nodes=n, node_wait_timeout=0.5, node_poll_interval=0.01)
    if cls is FellRec:
        return FellRec(FellRecSettings(**kw), **common)
    return cls(**common, **kw)


def weighted_mean(values: dict[int, np.ndarray]) -> np.ndarray:
    total = sum(SIZES[p] for p in values)
    return sum(SIZES[p] * values[p].astype(np.float64) for p in values) / total


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


# --------------------------------------------------------------------------- FFA-LoRA
def test_ffa_lora_freezes_a_and_averages_b_exactly_in_delta_w():
    n, rounds = 3, 2
    app, log = lora_app()
    strategy = build(FfaLora, n)
    init = initial_arrays()
    strategy.start(InProcessGrid(app, n), init, num_rounds=rounds)
    assert all(c[FREEZE_LORA_A] is True for c in log["config"].values())
    final = as_numpy(strategy.global_arrays)
    for key in SHAPES:
        if "lora_A" in key:  # A is the initial A, bit for bit
            assert np.array_equal(final[key], init[key].numpy())
        else:  # B is the size-weighted mean of the last round's uploads
            expected = weighted_mean({p: log["uploaded"][rounds, p][key] for p in range(n)})
            np.testing.assert_allclose(final[key], expected, rtol=1e-5, atol=1e-6)
    # Exact in dW: the mean of the clients' products B_i A equals the product of the mean.
    for m in ("m0", "m1"):
        a = init[f"{m}.lora_A.weight"].numpy().astype(np.float64)
        mean_product = weighted_mean({p: log["uploaded"][rounds, p][f"{m}.lora_B.weight"] @ a for p in range(n)})
        np.testing.assert_allclose(final[f"{m}.lora_B.weight"] @ a, mean_product, rtol=1e-5, atol=1e-6)
    # Every client trains from the global arrays of the previous round.
    assert all(np.array_equal(log["received"][2, p]["m0.lora_B.weight"], log["received"][2, 0]["m0.lora_B.weight"])
               for p in range(n))


def test_ffa_lora_rejects_a_client_that_trains_a():
    app, _ = lora_app(respect_freeze=False)
    with pytest.raises(LoraANotFrozenError, match="freeze lora_A"):
        build(FfaLora).start(InProcessGrid(app, 3), initial_arrays(), num_rounds=1)


def test_client_freezes_lora_a_only_when_asked():
    torch = pytest.importorskip("torch")
    from client_app.app import lora_a_frozen

    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.ones(2, 3))
    model.lora_B = torch.nn.Parameter(torch.zeros(3, 2))
    with lora_a_frozen(model, True):
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lora_B"]
    assert all(p.requires_grad for p in model.parameters())  # restored for the next (non-FFA) use
    with lora_a_frozen(model, False):
        assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- FedSA-LoRA
def test_fedsa_lora_shares_a_keeps_b():
    n = 3
    app, log = lora_app()
    strategy = build(FedSaLora, n)
    strategy.start(InProcessGrid(app, n), initial_arrays(), num_rounds=2)
    for p in range(n):
        mine = as_numpy(strategy.personal_arrays(p))
        for key in SHAPES:
            if "lora_A" in key:
                expected = weighted_mean({q: log["uploaded"][2, q][key] for q in range(n)})
                np.testing.assert_allclose(mine[key], expected, rtol=1e-5, atol=1e-6)
            else:
                assert np.array_equal(mine[key], log["uploaded"][2, p][key])
    # Round 2 trained from the shared A of round 1 and the client's own B of round 1.
    shared_a = weighted_mean({q: log["uploaded"][1, q]["m1.lora_A.weight"] for q in range(n)})
    for p in range(n):
        np.testing.assert_allclose(log["received"][2, p]["m1.lora_A.weight"], shared_a, rtol=1e-5, atol=1e-6)
        assert np.array_equal(log["received"][2, p]["m1.lora_B.weight"], log["uploaded"][1, p]["m1.lora_B.weight"])


def test_fedsa_lora_unsampled_and_new_clients():
    n = 3
    app, log = lora_app()
    strategy = build(FedSaLora, n)
    init = initial_arrays()
    strategy.start(InProcessGrid(app, n), init, num_rounds=1)
    old_b = log["uploaded"][1, 2]["m0.lora_B.weight"]
    # Round 2 with only clients 0 and 1: client 2 keeps its B and gets the new shared A.
    grid = InProcessGrid(app, n, connected=[100, 107])
    strategy.min_available_nodes = strategy.min_train_nodes = strategy.min_evaluate_nodes = 2
    strategy.start(grid, strategy.global_arrays, num_rounds=1)
    shared_a = weighted_mean({q: log["uploaded"][2, q]["m0.lora_A.weight"] for q in range(2)})
    mine = as_numpy(strategy.personal_arrays(2))
    assert np.array_equal(mine["m0.lora_B.weight"], old_b)
    np.testing.assert_allclose(mine["m0.lora_A.weight"], shared_a, rtol=1e-5, atol=1e-6)
    # An unknown node joins with the shared A and the initial (zero) B.
    joined = as_numpy(strategy.arrays_for_node(999, init))
    np.testing.assert_allclose(joined["m0.lora_A.weight"], strategy.global_arrays["m0.lora_A.weight"].numpy())
    assert np.array_equal(joined["m0.lora_B.weight"], init["m0.lora_B.weight"].numpy())


# --------------------------------------------------------------------------- FELLRec: delta-w and balance records
def test_fellrec_delta_w_basis_equals_formula_on_products():
    n = 3
    app, log = lora_app()
    strategy = build(FellRec, n, similarity_basis="delta-w", similarity_kernel="softmax", similarity_temperature=0.5)
    strategy.start(InProcessGrid(app, n), initial_arrays(), num_rounds=1)
    up = {p: log["uploaded"][1, p] for p in range(n)}
    dw = [np.concatenate([(up[p][f"{m}.lora_B.weight"].astype(np.float64) @ up[p][f"{m}.lora_A.weight"]).ravel()
                          for m in ("m0", "m1")]) for p in range(n)]
    cos = np.array([[dw[i] @ dw[j] / np.sqrt((dw[i] @ dw[i]) * (dw[j] @ dw[j])) for j in range(n)] for i in range(n)])
    losses = np.array([0.5 + 0.1 * p for p in range(n)])
    w = fm.warm_weights(fm.loss_softmax(losses, 0.05), 0, 0.7, 1.0, "t+1/beta")
    weights = np.exp((cos - 1) / 0.5) * w[:, None]
    np.fill_diagonal(weights, 1.0)
    weights /= weights.sum(axis=1, keepdims=True)
    flat = {p: np.concatenate([up[p][k].ravel() for k in SHAPES]).astype(np.float64) for p in range(n)}
    for i in range(n):
        got = np.concatenate([strategy.personal_arrays(i)[k].numpy().ravel() for k in SHAPES])
        np.testing.assert_allclose(got, sum(weights[i, j] * flat[j] for j in range(n)), rtol=1e-5, atol=1e-6)
    # The full weight matrix is recorded every round (split "balance"), rows summing to 1.
    rows = [r for r in strategy.records if r["split"] == "balance" and r["round"] == 1]
    recorded = np.zeros((n, n))
    for r in rows:
        recorded[r["client"], int(r["metric"].split(":")[1])] = r["value"]
    np.testing.assert_allclose(recorded, weights, rtol=1e-6)
    self_rows = {r["client"]: r["value"] for r in strategy.records if r["metric"] == "self-weight"}
    assert self_rows == pytest.approx({i: weights[i, i] for i in range(n)})


def test_fellrec_delta_w_compares_other_tensors_by_their_change_since_the_start():
    """A trainable tensor outside any LoRA pair (the item head's id table, a modules_to_save copy) enters the
    delta-w cosine as x_i - x_initial: its shared, large initialisation must not make every client alike."""
    n = 3
    table = "item_head.id_emb.modules_to_save.weight"
    init = initial_arrays()
    init[table] = Array((100 * np.ones((8, 4))).astype(np.float32))  # large, the same for every client
    app, log = lora_app()
    strategy = build(FellRec, n, similarity_basis="delta-w", similarity_kernel="softmax", similarity_temperature=0.5)
    strategy.start(InProcessGrid(app, n), init, num_rounds=1)
    up = {p: log["uploaded"][1, p] for p in range(n)}
    start = init[table].numpy().astype(np.float64)
    learned = [np.concatenate([*((up[p][f"{m}.lora_B.weight"].astype(np.float64) @ up[p][f"{m}.lora_A.weight"]).ravel()
                                 for m in ("m0", "m1")), (up[p][table] - start).ravel()]) for p in range(n)]
    cos = np.array([[a @ b / np.sqrt((a @ a) * (b @ b)) for b in learned] for a in learned])
    w = fm.warm_weights(fm.loss_softmax(np.array([0.5 + 0.1 * p for p in range(n)]), 0.05), 0, 0.7, 1.0, "t+1/beta")
    weights = np.exp((cos - 1) / 0.5) * w[:, None]
    np.fill_diagonal(weights, 1.0)
    weights /= weights.sum(axis=1, keepdims=True)
    self_rows = {r["client"]: r["value"] for r in strategy.records if r["metric"] == "self-weight"}
    assert self_rows == pytest.approx({i: weights[i, i] for i in range(n)})
    assert min(self_rows.values()) > 0.45  # engaged; with the raw table every cosine is ~1 and W_ii ~ 1/3
    with pytest.raises(ValueError, match="pass `initial`"):
        from strategies.fellrec import round_balance

        round_balance(FellRecSettings(similarity_basis="delta-w"), FlatLayout.of(init), [init] * n, np.ones(n), 0)


def test_fellrec_normalised_heating_loss_uses_first_round_loss_and_survives_resume():
    n = 3
    app, _ = lora_app()
    strategy = build(FellRec, n, heating_loss="normalised")
    strategy.start(InProcessGrid(app, n), initial_arrays(), num_rounds=1)
    assert strategy.first_loss == pytest.approx({p: 0.5 + 0.1 * p for p in range(n)})
    # Round 1: every normalised loss is 1, so every client gets the same warm weight.
    warm = [r["value"] for r in strategy.records if r["metric"] == "warm-weight" and r["round"] == 1]
    assert max(warm) == pytest.approx(min(warm))
    restored = build(FellRec, n, heating_loss="normalised")
    restored.load_state_dict(strategy.state_dict())
    assert restored.first_loss == strategy.first_loss


def test_config_and_factory_for_the_new_strategies():
    assert isinstance(make_strategy(from_run_config({"strategy": "ffa-lora"})), FfaLora)
    assert isinstance(make_strategy(from_run_config({"strategy": "fedsa-lora"})), FedSaLora)
    plus = make_strategy(from_run_config({"strategy": "fellrec+", "fellrec.alpha": 0.3}))
    assert isinstance(plus, FellRec) and plus.settings.alpha == 0.3  # other fellrec.* keys still apply
    assert all(getattr(plus.settings, k) == v for k, v in PRESET.items())
    paper = make_strategy(FellRecConfig()).settings  # the default stays the paper's method
    assert (paper.similarity_basis, paper.similarity_kernel, paper.heating_loss) == ("parameters", "linear", "raw")
    assert make_strategy(from_run_config({"fellrec.similarity-basis": "delta-w"})).settings.similarity_basis == "delta-w"
    with pytest.raises(ConfigError, match="heating-loss"):
        from_run_config({"fellrec.heating-loss": "relative"})


# --------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("values", [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((0,), np.float32),
                                    np.linspace(0, 1, 6).reshape(2, 3), np.array(2.5, dtype=np.float32)])
def test_zero_copy_view_and_one_copy_array_match_flower(values):
    flower = Array(values)
    view = array_view(flower)
    assert np.array_equal(view, values) and view.dtype == values.dtype and not view.flags.writeable
    mine = array_from_values(values)
    assert (mine.data, mine.shape, mine.dtype, mine.stype) == (flower.data, flower.shape, flower.dtype, flower.stype)
    assert np.array_equal(mine.numpy(), values)


def test_layout_mix_equals_weighted_rows_for_any_block_size():
    rng = np.random.default_rng(3)
    records = [ArrayRecord({k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()})
               for _ in range(3)]
    layout = FlatLayout.of(records[0])
    weights = rng.random((4, 3))
    for block in (1, 7, 18, 10_000):
        mixed = layout.mix(weights, records, block_columns=block)
        assert len(mixed) == 4
        for i, record in enumerate(mixed):
            for key in SHAPES:
                expected = sum(weights[i, j] * records[j][key].numpy().astype(np.float64) for j in range(3))
                np.testing.assert_allclose(record[key].numpy(), expected, rtol=1e-5, atol=1e-6)
                assert record[key].numpy().dtype == np.float32


def test_layout_lora_pairs_and_tensor_views():
    record = ArrayRecord({**{k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()},
                          "bias": Array(np.arange(3, dtype=np.float32))})
    layout = FlatLayout.of(record)
    pairs, others = layout.lora_pairs()
    assert pairs == [("m0.lora_A.weight", "m0.lora_B.weight"), ("m1.lora_A.weight", "m1.lora_B.weight")]
    assert others == ["bias"]
    stacked = layout.stack([record, record])
    assert layout.tensor(stacked, "bias").tolist() == [[0, 1, 2], [0, 1, 2]]
    assert layout.tensor(stacked, "m1.lora_B.weight").shape == (2, 6, R)
    lonely = FlatLayout.of(ArrayRecord({"x.lora_B.weight": Array(np.zeros((2, 2), np.float32))}))
    with pytest.raises(ArrayLayoutError, match="no matching lora_A"):
        lonely.lora_pairs()


# --------------------------------------------------------------------------- balance report
def test_balance_report_reads_back_the_recorded_matrix(tmp_path):
    from fellrec_flwr.eval.balance_report import HEATMAP_FILE, balance_summary, plot_balance, weight_matrix
    from fellrec_flwr.eval.results import metrics_frame

    n = 3
    app, _ = lora_app()
    strategy = build(FellRec, n, similarity_kernel="softmax")
    strategy.start(InProcessGrid(app, n), initial_arrays(), num_rounds=2)
    frame = metrics_frame(strategy.metric_rows())
    matrix = weight_matrix(frame)
    assert matrix.attrs["round"] == 2 and matrix.shape == (n, n)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-9)
    self_2 = {r["client"]: r["value"] for r in strategy.records if r["metric"] == "self-weight" and r["round"] == 2}
    assert [matrix.loc[c, c] for c in range(n)] == pytest.approx([self_2[c] for c in range(n)])
    summary = balance_summary(frame)
    assert summary["clients"] == n and summary["self_min"] == pytest.approx(min(self_2.values()))
    assert plot_balance(frame, tmp_path, "test") == tmp_path / HEATMAP_FILE
    assert (tmp_path / HEATMAP_FILE).read_bytes()[:4] == b"\x89PNG"
    # a strategy without weights (FedAvg) gives no matrix and no figure
    empty = metrics_frame([{"round": 1, "client": 0, "split": "train", "metric": "train-loss", "value": 1.0}])
    assert weight_matrix(empty) is None and plot_balance(empty, tmp_path / "x", "t") is None


def test_compare_report_shows_the_last_rounds_weights(tmp_path):
    import json

    from fellrec_flwr.eval.compare import compare
    from fellrec_flwr.eval.results import write_metrics_csv

    for name, self_w in (("fellrec", 0.9), ("fedavg", None)):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"method": name, "per_client": {"0": {"recall@10": 0.1}},
                                                      "overall": {"recall@10": 0.1}}))
        rows = [{"round": 1, "client": 0, "split": "train", "metric": "train-loss", "value": 1.0}]
        if self_w is not None:  # two clients, each keeping 0.9 of itself
            rows += [{"round": 1, "client": i, "split": "balance", "metric": f"weight:{j}",
                      "value": self_w if i == j else 1 - self_w} for i in range(2) for j in range(2)]
            rows += [{"round": 1, "client": i, "split": "train", "metric": "warm-weight", "value": 0.5 + i / 4}
                     for i in range(2)]
        write_metrics_csv(run / "metrics.csv", rows)
    compare([tmp_path / "fellrec", tmp_path / "fedavg"], tmp_path / "out")
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "### Aggregation weights (last round)" in md
    assert "| fellrec | 1 | 2 | 0.500 | 0.900 / 0.900 / 0.900 | 0.500 |" in md
    assert "| fedavg |" not in md.split("### Aggregation weights")[1]  # no weights recorded, no row


# --------------------------------------------------------------------------- the real apps (tiny model)
@pytest.mark.slow
def test_real_apps_ffa_lora_keeps_peft_lora_a_and_fellrec_writes_its_heatmap(tmp_path, monkeypatch):
    from flwr.app import Context

    import server_app.app as server
    from client_app.app import app as client_app
    from fellrec_flwr.train.checkpoint import load_checkpoint

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    small = {"data.num-clients": 2, "min-clients": 2, "data.train-samples": 32, "data.valid-users": 8,
             "data.test-users": 8, "data.bpr-epochs": 2, "eval.num-beams": 1, "eval.max-new-tokens": 4,
             "model.tiny-layers": 2, "model.tiny-vocab": 800, "train.batch-size": 8,
             "model.tiny-pretrain-prompts": 32, "num-server-rounds": 1, "out-dir": str(tmp_path), "eval.interval": 0}
    for strategy in ("ffa-lora", "fellrec"):
        run_config = {**small, "strategy": strategy, "run-name": strategy}
        grid = InProcessGrid(client_app, 2, run_config)
        server.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    state = load_checkpoint(tmp_path / "ffa-lora").strategy_state
    initial, final = state["initial"], state["global"]
    a_keys = [k for k in initial if "lora_A" in k]
    assert a_keys and all(np.array_equal(np.asarray(initial[k]), np.asarray(final[k])) for k in a_keys)
    assert any(not np.array_equal(np.asarray(initial[k]), np.asarray(final[k])) for k in initial if "lora_B" in k)
    assert (tmp_path / "fellrec" / "balance_weights.png").exists()
    assert not (tmp_path / "ffa-lora" / "balance_weights.png").exists()  # FFA-LoRA records no weights


def test_large_empty_is_plain_writable_memory():
    from strategies.arrays import large_empty

    big = large_empty((20, 1 << 20))  # 80 MB: the mmap path
    big[:] = 2.0
    assert big.shape == (20, 1 << 20) and big.dtype == np.float32 and float(big[7, 99]) == 2.0
    assert large_empty((2, 3)).shape == (2, 3)  # small: numpy's allocator
