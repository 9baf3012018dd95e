"""Leave-one-out on hand-made sequences and the few-shot sampling."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.splits import build_splits, drop_short_users, leave_one_out, sample_indices, training_prompts


def test_leave_one_out_by_hand():
    s = leave_one_out([10, 11, 12, 13, 14, 15, 16], history_len=3)
    assert s.test_target == 16 and s.test_history == (13, 14, 15)
    assert s.valid_target == 15 and s.valid_history == (12, 13, 14)
    assert s.train_items == (10, 11, 12, 13, 14)
    assert training_prompts(s.train_items, 3) == [
        ((10,), 11), ((10, 11), 12), ((10, 11, 12), 13), ((11, 12, 13), 14)]


def test_leave_one_out_minimum_sequence():
    s = leave_one_out([1, 2, 3], history_len=10)
    assert (s.train_items, s.valid_history, s.valid_target, s.test_history, s.test_target) == \
        ((1,), (1,), 2, (1, 2), 3)
    assert training_prompts(s.train_items, 10) == []
    with pytest.raises(DataPrepError, match="at least 3"):
        leave_one_out([1, 2], history_len=10)


def test_drop_short_users():
    kept, dropped = drop_short_users({0: [1, 2, 3], 1: [1, 2], 2: [4]})
    assert kept == {0: [1, 2, 3]} and dropped == 2


def test_sample_indices():
    rng = np.random.default_rng(0)
    assert sample_indices(5, 0, rng).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(5, 9, rng).tolist() == [0, 1, 2, 3, 4]
    picked = sample_indices(100, 10, rng)
    assert len(set(picked.tolist())) == 10 and picked.tolist() == sorted(picked.tolist())


SEQS = {u: list(range(100 * u, 100 * u + 4 + u % 7)) for u in range(40)}  # lengths 4..10


def all_prompts(history_len: int) -> set:
    out = set()
    for u, seq in SEQS.items():
        for history, target in training_prompts(seq[:-2], history_len):
            out.add((u, history, target))
    return out


def test_build_splits_all_rows():
    parts = build_splits(SEQS, history_len=2, train_samples=0, valid_users=0, test_users=0, seed=1)
    expected = all_prompts(2)
    got = {(u, tuple(h), t) for u, h, t in parts.train.itertuples(index=False)}
    assert got == expected and len(parts.train) == len(expected)
    assert parts.available_train_prompts == sum(len(s) - 3 for s in SEQS.values())
    assert parts.test["user_id"].tolist() == list(range(40))
    assert parts.test["target"].tolist() == [s[-1] for s in SEQS.values()]
    assert parts.valid["history"].map(list).tolist() == [s[:-2][-2:] for s in SEQS.values()]
    assert parts.train_sequences["items"].map(list).tolist() == [s[:-2] for s in SEQS.values()]


def test_build_splits_sampling_is_seeded_and_uniform_subset():
    a = build_splits(SEQS, 3, train_samples=25, valid_users=7, test_users=9, seed=5)
    b = build_splits(SEQS, 3, train_samples=25, valid_users=7, test_users=9, seed=5)
    c = build_splits(SEQS, 3, train_samples=25, valid_users=7, test_users=9, seed=6)
    assert (len(a.train), len(a.valid), len(a.test)) == (25, 7, 9)
    assert a.train.equals(b.train) and a.valid.equals(b.valid) and a.test.equals(b.test)
    assert not a.train.equals(c.train)
    rows = {(u, tuple(h), t) for u, h, t in a.train.itertuples(index=False)}
    assert len(rows) == 25 and rows <= all_prompts(3)
    # each draw has its own stream: changing one size leaves the other samples as they were
    d = build_splits(SEQS, 3, train_samples=30, valid_users=7, test_users=20, seed=5)
    assert d.valid.equals(a.valid) and not d.train.equals(a.train)


def test_build_splits_rejects_bad_settings():
    with pytest.raises(DataPrepError, match="history-len"):
        build_splits(SEQS, 0, 10, 1, 1, 0)
    with pytest.raises(DataPrepError, match="train-samples"):
        build_splits(SEQS, 3, -1, 1, 1, 0)
    with pytest.raises(DataPrepError, match="No training prompts"):
        build_splits({0: [1, 2, 3]}, 3, 0, 0, 0, 0)
