"""Client heterogeneity of a prepared folder (fellrec_flwr/eval/heterogeneity.py): the math against
hand computations, and the report on a tiny hand-made folder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fellrec_flwr.eval.heterogeneity import (
    HeterogeneityInputError, client_group_counts, divergence_from_whole, iid_assignment, js_divergence, measure,
    write_report,
)


def test_js_divergence_matches_a_hand_computation():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); KL(p|m) = log2(4/3) = 0.415037,
    # KL(q|m) = 1/2 log2(2/3) + 1/2 log2(2) = 0.207519; JS = (0.415037 + 0.207519) / 2
    assert js_divergence(np.array([1, 0]), np.array([3, 3])) == pytest.approx(0.311278, abs=1e-6)
    assert js_divergence(np.array([2, 5]), np.array([4, 10])) == pytest.approx(0.0, abs=1e-12)  # same distribution
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)  # disjoint: the maximum


def test_counts_and_divergence_from_the_whole_match_a_hand_computation():
    # interactions (client, group): client 0 saw groups 0 and 1, client 1 saw group 1 twice
    counts = client_group_counts(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), num_clients=2, num_groups=2)
    np.testing.assert_array_equal(counts, [[1, 1], [0, 2]])
    # whole = (1/4, 3/4). Client 0, p = (1/2, 1/2): m = (3/8, 5/8),
    #   KL(p|m) = 1/2 log2(4/3) + 1/2 log2(4/5) = 0.046555, KL(w|m) = 1/4 log2(2/3) + 3/4 log2(6/5) = 0.051035
    # client 1, p = (0, 1): m = (1/8, 7/8), KL(p|m) = log2(8/7) = 0.192645,
    #   KL(w|m) = 1/4 log2(2) + 3/4 log2(6/7) = 0.083206
    js = divergence_from_whole(counts)
    np.testing.assert_allclose(js, [(0.046555 + 0.051035) / 2, (0.192645 + 0.083206) / 2], atol=2e-6)


def test_bad_counts_are_refused_with_the_reason():
    with pytest.raises(HeterogeneityInputError, match="positive total"):
        js_divergence(np.array([0, 0]), np.array([1, 1]))
    with pytest.raises(HeterogeneityInputError, match="one length"):
        js_divergence(np.array([1, 0, 0]), np.array([1, 1]))
    with pytest.raises(HeterogeneityInputError, match="client ids must be in 0..1"):
        client_group_counts(np.array([0, 2]), np.array([0, 0]), num_clients=2, num_groups=1)


def test_iid_assignment_keeps_the_client_sizes_and_its_seed():
    a = iid_assignment([3, 1, 2], seed=7)
    np.testing.assert_array_equal(np.bincount(a), [3, 1, 2])
    np.testing.assert_array_equal(a, iid_assignment([3, 1, 2], seed=7))
    assert any(not np.array_equal(a, iid_assignment([3, 1, 2], seed=s)) for s in range(8, 20))


def tiny_folder(tmp_path: Path) -> SimpleNamespace:
    """Two clients; items 0 and 1 share a title, so they count as one group."""
    titles = {0: "A", 1: "A", 2: "B", 3: "C"}
    seqs = pd.DataFrame({"user_id": [10, 11, 12], "items": [[0, 1], [1, 2, 2], [3, 3]], "client": [0, 0, 1]})
    train = pd.DataFrame({"user_id": [10, 11, 11, 12], "client": [0, 0, 0, 1]})
    return SimpleNamespace(titles=titles, train_sequences=seqs, num_clients=2, path=tmp_path / "tiny",
                           manifest={"settings": {"dataset": "table", "partitioner": "kmeans", "seed": 1}},
                           split_frame=lambda name: train)


def test_measure_counts_title_groups_users_and_windows_per_client(tmp_path):
    rows, summary = measure(tiny_folder(tmp_path), seed=0)
    assert [(r["users"], r["train_windows"], r["train_interactions"], r["title_groups_seen"]) for r in rows] == [
        (2, 3, 5, 2), (1, 1, 2, 1)]
    # groups A (items 0, 1), B, C: client 0 = (3, 2, 0), client 1 = (0, 0, 2), whole = (3, 2, 2)
    expected = divergence_from_whole(np.array([[3, 2, 0], [0, 0, 2]]))
    assert [r["js"] for r in rows] == pytest.approx(expected.tolist())
    assert summary["title_groups"] == 3 and summary["users_per_client"] == {"min": 1, "median": 1.5, "max": 2}
    assert summary["js"]["max"] == pytest.approx(expected.max())
    write_report(rows, summary, tmp_path / "out")
    assert pd.read_csv(tmp_path / "out" / "heterogeneity.csv")["users"].tolist() == [2, 1]
    assert json.loads((tmp_path / "out" / "heterogeneity.json").read_text())["summary"]["num_clients"] == 2
    assert (tmp_path / "out" / "heterogeneity.png").stat().st_size > 0
