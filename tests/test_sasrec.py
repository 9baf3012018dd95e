"""SASRec baseline: loss, ranking, padding, windows, epoch selection, cache, settings, the --sasrec command."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fellrec_flwr.config import ConfigError, SasrecSettings, from_run_config
from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.eval.sasrec import (
    SASRec, cache_path, group_tokens, left_pad, load_or_train, rank_sasrec, sasrec_loss, should_stop, train_sasrec,
    training_windows,
)


@dataclass(frozen=True)
class Ex:
    user_id: int
    history: tuple[int, ...]
    target: int


# ids 1 and 4 share the title "B": 6 ids, 5 title groups (A=0, B=1, C=2, D=3, E=4)
TITLES = {0: "A", 1: "B", 2: "C", 3: "D", 4: "B", 5: "E"}
SMALL = SasrecSettings(hidden=8, blocks=2, heads=2, max_len=4, dropout=0.0, batch_size=4, max_epochs=3)


def tiny_model(seed: int = 0, s: SasrecSettings = SMALL) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(len(TitleGroups.from_titles(TITLES)), replace(s, init_std=0.5))  # large init: varied scores
    return model.eval()


def test_loss_is_cross_entropy_over_all_groups_at_every_real_position():
    model = tiny_model()
    inputs = left_pad([np.array([1, 2, 3]), np.array([5])])  # tokens = group + 1
    targets = left_pad([np.array([2, 3, 4]), np.array([2])])
    logits = (model.encode(inputs) @ model.item_emb.weight[1:].T).detach().numpy()  # (B, L, 5)
    by_hand = []
    for b in range(2):
        for pos in range(3):
            t = int(targets[b, pos])
            if t:
                row = logits[b, pos].astype(np.float64)
                by_hand.append(np.log(np.exp(row).sum()) - row[t - 1])
    assert len(by_hand) == 4
    assert sasrec_loss(model, inputs, targets).item() == pytest.approx(np.mean(by_hand), rel=1e-5)


def test_ranks_are_an_argsort_of_the_scores_with_history_groups_masked():
    groups = TitleGroups.from_titles(TITLES)
    model = tiny_model(1)
    examples = [Ex(0, (0, 4), 2), Ex(1, (3,), 1), Ex(2, (5, 1, 2), 0)]
    got = rank_sasrec(model, examples, groups, k=3)
    for row, ex in enumerate(examples):
        scores = model.last_scores(left_pad([group_tokens(ex.history, groups)])).detach().numpy()[0]
        scores[groups.group_index(ex.history)] = -np.inf  # id 4 masks id 1 too: one title
        order = [g for g in np.argsort(-scores, kind="stable")[:3] if np.isfinite(scores[g])]
        expected = groups.rep_ids[order].tolist() + [-1] * (3 - len(order))  # fewer unseen groups than k: -1
        assert got[row].tolist() == expected
    assert 1 not in got[0] and 4 not in got[0]  # "B" was in user 0's history
    assert got[2].tolist()[2] == -1  # user 2 has only two unseen groups left
    assert rank_sasrec(model, [Ex(3, (0, 1, 2, 3), 5)], groups, k=3)[0].tolist() == [5, -1, -1]


def test_padding_does_not_change_a_sequence_s_scores():
    model = tiny_model(2)
    alone = model.last_scores(left_pad([np.array([2, 3])]))
    padded = model.last_scores(left_pad([np.array([2, 3]), np.array([1, 5, 4, 2])]))[:1]
    torch.testing.assert_close(alone, padded)


def test_windows_cover_every_next_item_position_once():
    groups = TitleGroups.from_titles({i: str(i) for i in range(10)})
    windows = training_windows([list(range(10)), [3], [4, 5]], groups, max_len=4)
    targets = sorted(int(t) - 1 for _, t in windows for t in t)
    assert targets == sorted(list(range(1, 10)) + [5])
    for inputs, targets in windows:  # each target is the item after its input
        assert len(inputs) == len(targets) <= 4 and (targets[:-1] == inputs[1:]).all()


def test_length_batches_hold_every_index_once_and_similar_lengths():
    from fellrec_flwr.eval.sasrec import length_batches

    lengths = np.random.default_rng(0).integers(1, 50, size=1000)
    batches = length_batches(lengths, 10, torch.Generator().manual_seed(0), chunk_batches=100)
    assert sorted(i for b in batches for i in b) == list(range(1000)) and max(map(len, batches)) == 10
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 3  # one chunk = all 1000: sorted, so a batch spans about 1/100 of the lengths
    again = length_batches(lengths, 10, torch.Generator().manual_seed(0), chunk_batches=100)
    assert again == batches


def test_should_stop_after_patience_epochs_without_improvement():
    assert not should_stop([0.1, 0.3, 0.2], patience=2)
    assert should_stop([0.1, 0.3, 0.2, 0.3], patience=2)  # equal is no improvement
    assert not should_stop([0.1, 0.3, 0.2, 0.31], patience=2)
    assert not should_stop([0.3, 0.1, 0.1, 0.1], patience=0)  # 0 = off


def test_the_epoch_with_the_best_valid_metric_is_kept_and_training_stops_early():
    curve = [0.10, 0.30, 0.20, 0.25, 0.90]  # the 0.90 is never reached: patience 2 stops after epoch 4
    snapshots = []

    def scripted(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return curve[len(snapshots) - 1]

    s = replace(SMALL, max_epochs=5, patience=2, lr=0.05)
    sequences = [[0, 1, 2, 3], [2, 3, 5], [0, 2, 3]]
    model, record = train_sasrec(sequences, TitleGroups.from_titles(TITLES), s, seed=3, evaluate=scripted)
    assert record.curve == curve[:4] and record.best_epoch == 2 and record.best_value == 0.30
    assert len(record.losses) == 4
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][name])
    assert any(not torch.equal(snapshots[1][n], snapshots[3][n]) for n in snapshots[1])  # training moved on


def test_training_is_deterministic_given_the_seed():
    sequences = [[0, 1, 2, 3], [2, 3, 5], [0, 2, 3]]
    groups = TitleGroups.from_titles(TITLES)
    s = replace(SMALL, dropout=0.3)
    a, _ = train_sasrec(sequences, groups, s, seed=5, evaluate=lambda m: 0.0)
    b, _ = train_sasrec(sequences, groups, s, seed=5, evaluate=lambda m: 0.0)
    c, _ = train_sasrec(sequences, groups, s, seed=6, evaluate=lambda m: 0.0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


# ---------------------------------------------------------------------------
# A synthetic data set with a strong sequential pattern: every user walks a cycle of 30 titles
# ---------------------------------------------------------------------------

N_ITEMS = 30


class CycleData:
    """A `PreparedData` stand-in: users walk i, i+1, i+2, ... (mod 30), starting anywhere."""

    num_clients = 1

    def __init__(self, path: Path, users: int = 240, tag: str = "a") -> None:
        rng = np.random.default_rng(0)
        self.path = path
        self.titles = {i: f"title {i}" for i in range(N_ITEMS)}
        self.manifest = {"checksums": {"train_sequences.parquet": f"digest-{tag}"}}
        self.train_sequences, self.examples = [], {"valid": [], "test": []}
        for user in range(users):
            start = int(rng.integers(N_ITEMS))
            walk = [(start + j) % N_ITEMS for j in range(int(rng.integers(6, 12)))]
            self.train_sequences.append(walk[:-2])
            self.examples["valid"].append(Ex(user, tuple(walk[-7:-2]), walk[-2]))
            self.examples["test"].append(Ex(user, tuple(walk[-6:-1]), walk[-1]))
        self.train_calls = 0

    def split(self, name: str, client: int | None = None) -> list[Ex]:
        return self.examples[name]


FAST = SasrecSettings(hidden=16, blocks=1, heads=1, max_len=10, dropout=0.1, lr=0.01, batch_size=32,
                      max_epochs=15, patience=3)


def test_sasrec_learns_the_sequential_pattern_and_beats_popularity(tmp_path):
    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.eval.metrics import ranking_metrics

    data = CycleData(tmp_path)
    fitted = FittedBaselines.fit_prepared(data, FAST, seed=0)
    test = data.split("test")
    sasrec = ranking_metrics(fitted.ranks("sasrec", test))["recall@10"]
    popularity = ranking_metrics(fitted.ranks("popularity", test))["recall@10"]
    assert sasrec > 0.9 and sasrec > popularity + 0.5, (sasrec, popularity)
    assert fitted.sasrec.record.best_value > 0.5


def test_baseline_rows_hold_sasrec_rows_only_when_enabled(tmp_path):
    from fellrec_flwr.eval.baselines import FittedBaselines, baseline_rows

    data = CycleData(tmp_path, users=30)
    rows = baseline_rows(data, ["test"], sasrec=replace(FAST, max_epochs=1), seed=0)
    assert {r["method"] for r in rows} == {"popularity", "markov", "sasrec"} and len(rows) == 90
    off = baseline_rows(data, ["test"], sasrec=replace(FAST, enabled=False), seed=0)
    assert {r["method"] for r in off} == {"popularity", "markov"}
    with pytest.raises(ValueError, match="sasrec needs a trained model"):
        FittedBaselines.fit(data.train_sequences, data.titles).ranks("sasrec", data.split("test"))


def test_the_cache_is_reused_and_invalidated_by_data_settings_or_seed(tmp_path, monkeypatch):
    import fellrec_flwr.eval.sasrec as sasrec_module

    trained = []
    real_train = sasrec_module.train_sasrec

    def counting_train(*args, **kwargs):
        trained.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(sasrec_module, "train_sasrec", counting_train)
    s = replace(FAST, max_epochs=2)
    data = CycleData(tmp_path, users=40)
    first = load_or_train(data, s, seed=0)
    assert len(trained) == 1 and first.path.exists() and first.path.parent == tmp_path / "baselines"
    second = load_or_train(data, s, seed=0)
    assert len(trained) == 1 and second.path == first.path  # from the cache
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(value, second.model.state_dict()[name])
    assert second.record.curve == first.record.curve and second.record.best_epoch == first.record.best_epoch
    load_or_train(CycleData(tmp_path, users=41), s, seed=0)  # another data set
    load_or_train(data, replace(s, hidden=8), seed=0)  # another setting
    load_or_train(data, s, seed=1)  # another seed
    assert len(trained) == 4 and len(list((tmp_path / "baselines").glob("sasrec-*.safetensors"))) == 4


def test_the_cache_key_follows_what_sasrec_reads_not_the_partition():
    from fellrec_flwr.eval.sasrec import cache_key, data_digest

    def frame(clients, last_item=3):
        return pd.DataFrame({"user_id": [7, 3], "client": clients, "items": [[1, 2, last_item], [2, 4]]})

    class Data:
        def __init__(self, seqs, titles=None, valid=(Ex(3, (2,), 4),)):
            self.train_sequences, self.titles, self._valid = seqs, titles or {i: f"t{i}" for i in range(6)}, valid

        def split(self, name, client=None):
            assert name == "valid"
            return list(self._valid)

    base = data_digest(Data(frame([0, 1])))
    assert data_digest(Data(frame([1, 1]))) == base  # another partition of the same users: one SASRec
    assert data_digest(Data(frame([0, 1]).iloc[::-1])) == base  # row order does not matter
    assert data_digest(Data(frame([0, 1], last_item=5))) != base  # a training sequence differs
    assert data_digest(Data(frame([0, 1]), titles={i: f"u{i}" for i in range(6)})) != base
    assert data_digest(Data(frame([0, 1]), valid=(Ex(3, (2,), 5),))) != base
    s = SasrecSettings()
    assert cache_key(base, s, 1) != cache_key(base, s, 2)
    assert cache_key(base, s, 1) == cache_key(base, replace(s, seed=99, enabled=False), 1)  # seed passed resolved


def test_sasrec_uses_its_own_seed_not_the_runs(tmp_path, monkeypatch):
    import fellrec_flwr.eval.sasrec as sasrec_module

    seeds = []

    def record_seed(train_sequences, groups, settings, seed, *rest, **kwargs):
        seeds.append(seed)
        raise RuntimeError("stop")  # the seed is all this test needs

    monkeypatch.setattr(sasrec_module, "train_sasrec", record_seed)
    with pytest.raises(RuntimeError, match="stop"):
        load_or_train(CycleData(tmp_path, users=20), replace(FAST, seed=123))
    assert seeds == [123]


def test_a_corrupt_or_foreign_cache_file_is_rebuilt_with_a_log_line(tmp_path, caplog):
    s = replace(FAST, max_epochs=2)
    data = CycleData(tmp_path, users=40)
    path = load_or_train(data, s, seed=0).path
    other = load_or_train(data, s, seed=1).path
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rebuilt = load_or_train(data, s, seed=0)
    assert "unusable" in caplog.text and "not a readable SASRec cache file" in caplog.text
    assert rebuilt.path == path and load_or_train(data, s, seed=0).record.curve == rebuilt.record.curve
    caplog.clear()
    path.write_bytes(other.read_bytes())  # a valid file of another key under this key's name
    with caplog.at_level(logging.WARNING, logger="flwr"):
        load_or_train(data, s, seed=0)
    assert "written for key" in caplog.text


@pytest.mark.parametrize("overrides, message", [
    ({"sasrec.hidden": 0}, "sasrec.hidden=0 must be >= 1"),
    ({"sasrec.hidden": 64, "sasrec.heads": 3}, "multiple of sasrec.heads"),
    ({"sasrec.dropout": 1.0}, r"sasrec.dropout=1.0 must be in \[0, 1\)"),
    ({"sasrec.lr": 0}, "sasrec.lr=0.0 must be > 0"),
    ({"sasrec.patience": -1}, "must be >= 0"),
    ({"sasrec.select-metric": "mrr"}, "sasrec.select-metric='mrr' is not one of ndcg@10, recall@10"),
    ({"sasrec.max-len": 0}, "sasrec.max-len=0 must be >= 1"),
])
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_run_config(overrides)


def test_a_sequence_longer_than_max_len_is_refused_by_the_model():
    with pytest.raises(ValueError, match="exceeds sasrec.max-len=4"):
        tiny_model().encode(left_pad([np.array([1, 2, 3, 4, 5])]))


def test_sasrec_command_writes_a_run_folder_with_sasrec_rows_and_intervals(tmp_path, tmp_path_factory, monkeypatch):
    from fellrec_flwr.train.centralized import main

    # the data settings and cache of tests/test_app_inprocess.py: one demo preparation for both in a suite run
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path_factory.getbasetemp() / "fellrec-cache"))
    data = ("data.num-clients=2 min-clients=2 data.train-samples=48 data.valid-users=16 data.test-users=16 "
            "data.bpr-epochs=2")
    main(["--sasrec", "--run-config",
          f"out-dir='{tmp_path / 'out'}' run-name='s' {data} sasrec.max-epochs=2 sasrec.hidden=16"])
    run_dir = tmp_path / "out" / "s"
    per_user = pd.read_csv(run_dir / "per_user.csv")
    test = per_user[per_user["split"] == "test"]
    assert set(test["method"]) == {"popularity", "markov", "sasrec"}
    assert (test.groupby("method").size() == 16).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "sasrec" and summary["intervals"]["n_users"] == 16
    assert {"recall@10 - popularity", "recall@10 - markov", "markov ndcg@10"} <= set(summary["intervals"])
    assert summary["sasrec"]["best_epoch"] in (1, 2) and len(summary["sasrec"]["valid_curve"]) == 2
    own = test[test["method"] == "sasrec"]
    assert summary["overall"]["recall@10"] == pytest.approx(((own["target_rank"] >= 0) & (own["target_rank"] < 10)).mean())
    assert {"recall_by_round.png", "final_by_client.png", "config.json", "metrics.csv"} <= {
        p.name for p in run_dir.iterdir()}
    assert Path(summary["sasrec"]["cache"]).exists()
    # a run on the prepared folder alone records the folder's data settings in config.json
    prepared = Path(summary["sasrec"]["cache"]).parent.parent
    main(["--popularity", "--run-config", f"out-dir='{tmp_path / 'out'}' run-name='p' data.prepared-dir='{prepared}' "
          "data.num-clients=2 min-clients=2 sasrec.max-epochs=2 sasrec.hidden=16"])
    config = json.loads((tmp_path / "out" / "p" / "config.json").read_text())
    assert (config["data.valid-users"], config["data.train-samples"], config["data.bpr-epochs"]) == (16, 48, 2)


def test_training_and_ranking_never_initialise_cuda(tmp_path, monkeypatch):
    """The ServerApp trains SASRec on the CPU: it must not open a CUDA context on a GPU server."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("SASRec touched CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    data = CycleData(tmp_path, users=20)
    fitted = load_or_train(data, replace(FAST, max_epochs=1), seed=0)
    assert rank_sasrec(fitted.model, data.split("test"), fitted.groups, k=5).shape == (20, 5)
