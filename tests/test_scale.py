"""Aggregation at scale (issue 23): the streamed aggregation equals the in-memory formulas,
per-client state on disk round-trips (and through checkpoints), and the memory-bound
settings refuse bad values.

Hand-made arrays and the real strategy classes through Flower's loop (in-process Grid,
numpy ClientApps from tests/test_lora_strategies.py); every aggregate is checked against
a direct computation.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fellrec_flwr.config import ConfigError, FellRecSettings, from_run_config
from fellrec_flwr.inprocess_grid import InProcessGrid
from strategies import FedSaLora, FellRec, LocalOnly, RecordingFedAvg, make_strategy
from strategies import fellrec_math as fm
from strategies.arrays import FlatLayout, block_columns
from strategies.store import DiskRecordStore, PersonalStateError
from tests.test_lora_strategies import SHAPES, as_numpy, initial_arrays, lora_app

COMMON = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=3, min_evaluate_nodes=3,
              min_available_nodes=3, node_wait_timeout=0.5, node_poll_interval=0.01)


def records(n: int, seed: int = 0) -> list[ArrayRecord]:
    rng = np.random.default_rng(seed)
    return [ArrayRecord({k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()})
            for _ in range(n)]


def flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([record[k].numpy().ravel() for k in SHAPES]).astype(np.float64)


# --------------------------------------------------------------------------- the streamed math
@pytest.mark.parametrize("columns", [1, 7, 18, 10_000])
def test_streamed_gram_equals_x_xt_for_any_block(columns):
    uploads, sent = records(4, 1), records(4, 2)
    layout = FlatLayout.of(uploads[0])
    x = np.stack([flat(r) for r in uploads])
    ref = np.stack([flat(r) for r in sent])
    blocks = [b.copy() for _, _, b in layout.blocks(uploads, columns)]
    assert sum(b.shape[1] for b in blocks) == layout.size  # every column once
    np.testing.assert_allclose(fm.gram_of_blocks(blocks, 4), x @ x.T, rtol=1e-5)
    updates = fm.gram_of_blocks((b for _, _, b in layout.blocks(uploads, columns, sent)), 4)
    np.testing.assert_allclose(updates, (x - ref) @ (x - ref).T, rtol=1e-5)


def test_gram_of_blocks_refuses_a_block_of_other_clients():
    with pytest.raises(fm.FellRecMathError, match=r"expected \(3, columns\)"):
        fm.gram_of_blocks([np.ones((2, 4), np.float32)], 3)


def test_fedavg_streamed_mean_equals_flowers_mean():
    uploads = records(5, 3)
    replies = []
    for i, record in enumerate(uploads):
        metrics = MetricRecord({"num-examples": 10 + 7 * i, "train-loss": 1.0, "client-key": i})
        replies.append(Message(RecordDict({"arrays": record, "metrics": metrics}), dst_node_id=i + 10,
                               message_type="train"))
    strategy = RecordingFedAvg(aggregation_block_mb=1e-5)  # blocks of a few values: many blocks
    ours = strategy.aggregate_arrays(1, [(i, i + 10, m) for i, m in enumerate(replies)])
    flowers = aggregate_arrayrecords([m.content for m in replies], "num-examples")
    assert list(ours.keys()) == list(flowers.keys())
    for key in SHAPES:
        assert ours[key].numpy().dtype == np.float32
        np.testing.assert_allclose(ours[key].numpy(), flowers[key].numpy(), rtol=1e-5, atol=1e-6)


def run_fellrec(tmp_path, state_dir=None, block_mb=64.0, rounds=3):
    app, _ = lora_app()
    strategy = FellRec(FellRecSettings(similarity_basis="updates"), state_dir=state_dir,
                       aggregation_block_mb=block_mb, **COMMON)
    strategy.start(InProcessGrid(app, 3), initial_arrays(), num_rounds=rounds)
    return strategy


def test_fellrec_personal_arrays_are_w_times_uploads_in_memory_and_on_disk(tmp_path):
    memory = run_fellrec(tmp_path)
    disk = run_fellrec(tmp_path, state_dir=tmp_path / "state", block_mb=1e-5)  # tiny blocks, files
    assert isinstance(disk.personal, DiskRecordStore) and isinstance(disk.best.arrays, DiskRecordStore)
    for key in range(3):
        mine, theirs = as_numpy(memory.personal_arrays(key)), as_numpy(disk.personal_arrays(key))
        assert list(mine) == list(theirs) == list(SHAPES)
        for k in SHAPES:
            np.testing.assert_allclose(theirs[k], mine[k], rtol=1e-5, atol=1e-6)
    # the files hold what the disk store hands out: the last round, and the round before
    files = sorted(p.name for p in (tmp_path / "state" / "personal").iterdir())
    assert files == [f"client-{k}.round-{r}.safetensors" for k in range(3) for r in (2, 3)]


def test_fellrec_streamed_weights_are_the_direct_formula():
    """One aggregation: personal arrays = W @ X with W from the in-memory dynamic_balance."""
    uploads = records(3, 5)
    replies = [(i, i + 10, Message(RecordDict({"arrays": r, "metrics": MetricRecord(
        {"num-examples": 5 + i, "train-loss": 0.4 + 0.2 * i, "client-key": i})}), dst_node_id=i + 10,
        message_type="train")) for i, r in enumerate(uploads)]
    strategy = FellRec(FellRecSettings(), aggregation_block_mb=1e-5)
    mean = strategy.aggregate_arrays(1, replies)
    x = np.stack([flat(r) for r in uploads])
    w = fm.dynamic_balance(x, np.array([0.4, 0.6, 0.8]), 0, FellRecSettings()).weights
    for i in range(3):
        np.testing.assert_allclose(flat(strategy.personal[i]), w[i] @ x, rtol=1e-5, atol=1e-6)
    sizes = np.array([5.0, 6.0, 7.0])
    np.testing.assert_allclose(flat(mean), sizes / sizes.sum() @ x, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- personal state on disk
def test_disk_store_round_trips_and_keeps_two_versions(tmp_path):
    store = DiskRecordStore(tmp_path / "s")
    first, second, third = records(3, 7)
    store.put(4, first, 1)
    assert 4 in store and len(store) == 1 and list(store) == [4]
    got = store[4]
    assert list(got.keys()) == list(SHAPES)
    for k in SHAPES:
        assert np.array_equal(got[k].numpy(), first[k].numpy())
    store.put(4, second, 2)
    store.put(4, third, 3)  # round 1's file goes: the last checkpoint refers to round 2's at most
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "client-4.round-2.safetensors", "client-4.round-3.safetensors"]
    assert np.array_equal(store[4]["m1.lora_B.weight"].numpy(), third["m1.lora_B.weight"].numpy())
    # a checkpoint's state finds the same files (e.g. a resumed server)
    again = DiskRecordStore(tmp_path / "s")
    again.load(store.state())
    assert np.array_equal(again[4]["m0.lora_A.weight"].numpy(), third["m0.lora_A.weight"].numpy())
    from safetensors.numpy import load_file  # the files are plain safetensors, readable by the library
    assert np.array_equal(load_file(store.files[4])["m0.lora_B.weight"], third["m0.lora_B.weight"].numpy())


def test_disk_store_writer_streams_rows_and_is_all_or_nothing(tmp_path):
    store = DiskRecordStore(tmp_path)
    uploads = records(2, 8)
    layout = FlatLayout.of(uploads[0])
    weights = np.array([[0.25, 0.75], [1.0, 0.0]])
    with store.writer(layout, [7, 9], server_round=1) as rows:
        for t0, t1, block in layout.mixed_blocks(weights, uploads, block_columns=5):
            rows.add(t0, t1, block)
    x = np.stack([flat(r) for r in uploads])
    np.testing.assert_allclose(flat(store[7]), weights[0] @ x, rtol=1e-6)
    np.testing.assert_allclose(flat(store[9]), x[0], rtol=1e-6)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="killed"):
        with store.writer(layout, [7, 9], server_round=2) as rows:
            raise RuntimeError("killed mid-round")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no round-2 file, no temporary
    np.testing.assert_allclose(flat(store[7]), weights[0] @ x, rtol=1e-6)


def test_disk_store_names_missing_files(tmp_path):
    store = DiskRecordStore(tmp_path)
    store.put(1, records(1)[0], 1)
    state = store.state()
    next(tmp_path.glob("*.safetensors")).unlink()
    with pytest.raises(PersonalStateError, match="missing.*latest checkpoint"):
        DiskRecordStore(tmp_path).load(state)
    with pytest.raises(PersonalStateError, match="client-key 1.*cannot be read"):
        store[1]


def test_disk_checkpoint_names_files_and_resumes(tmp_path):
    strategy = run_fellrec(tmp_path, state_dir=tmp_path / "run", rounds=2)
    state = strategy.state_dict()
    assert "personal" not in state and set(state["personal_files"]["files"]) == {"0", "1", "2"}
    assert "best_arrays" not in state and "best_files" in state
    resumed = FellRec(FellRecSettings(similarity_basis="updates"), state_dir=tmp_path / "run", **COMMON)
    resumed.load_state_dict(state)
    memory = FellRec(FellRecSettings(similarity_basis="updates"), **COMMON)  # a disk checkpoint into memory
    memory.load_state_dict(state)
    for key in range(3):
        for other in (resumed, memory):
            for k in SHAPES:
                assert np.array_equal(other.personal_arrays(key)[k].numpy(), strategy.personal_arrays(key)[k].numpy())
                assert np.array_equal(other.best_personal_arrays(key)[k].numpy(),
                                      strategy.best_personal_arrays(key)[k].numpy())


@pytest.mark.parametrize("cls", [LocalOnly, FedSaLora])
def test_other_personalised_strategies_on_disk_equal_memory(tmp_path, cls):
    results = []
    for state_dir in (None, tmp_path / cls.__name__):
        app, _ = lora_app()
        strategy = cls(state_dir=state_dir, **COMMON)
        strategy.start(InProcessGrid(app, 3), initial_arrays(), num_rounds=2)
        results.append({key: as_numpy(strategy.personal_arrays(key)) for key in range(3)})
    for key in range(3):
        for k in SHAPES:
            np.testing.assert_allclose(results[1][key][k], results[0][key][k], rtol=1e-6)


# --------------------------------------------------------------------------- settings
def test_block_size_is_validated_with_clear_errors():
    assert block_columns(64, 100) == 64 * 2**20 // 400
    assert block_columns(1e-9, 3) == 1  # never zero columns
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="aggregation-block-mb.*> 0"):
            block_columns(bad, 10)
        with pytest.raises(ValueError, match="aggregation-block-mb"):
            RecordingFedAvg(aggregation_block_mb=bad)
    with pytest.raises(ConfigError, match="aggregation-block-mb=0.0 must be a number > 0"):
        from_run_config({"aggregation-block-mb": 0.0})
    with pytest.raises(ConfigError, match="personal-state='ram' is not one of memory, disk"):
        from_run_config({"personal-state": "ram"})


def test_make_strategy_puts_disk_state_in_the_run_folder(tmp_path):
    cfg = from_run_config({"personal-state": "disk", "aggregation-block-mb": 8.0})
    strategy = make_strategy(cfg, tmp_path)
    assert strategy.personal.folder == (tmp_path / "personal-state" / "personal").resolve()
    assert strategy.aggregation_block_mb == 8.0
    assert not hasattr(make_strategy(from_run_config({"strategy": "fedavg", "personal-state": "disk"}), tmp_path),
                       "personal")  # FedAvg keeps no adapter per client
    with pytest.raises(ValueError, match="pass run_dir"):
        make_strategy(cfg)


def test_aggregation_bench_end_to_end_runs_in_memory_and_on_disk(tmp_path):
    """bench/aggregation_time.py --end-to-end drives FellRec.aggregate_train (both personal states)."""
    from bench.aggregation_time import time_end_to_end

    for state_dir in (None, tmp_path):
        rows = time_end_to_end(3, 65536, "parameters", 2, np.random.default_rng(0), block_mb=0.5, state_dir=state_dir)
        assert [r["round"] for r in rows] == ["first", "later (median of 1)"]
        assert all(r["end_to_end_s"] > 0 and r["balance_s"] > 0 for r in rows)
    # the untimed memory pass (3 clients, round 1) and the timed server (3 clients, rounds 1 and 2)
    assert len(list(tmp_path.rglob("client-*.safetensors"))) == 3 + 3 * 2
