"""Recall@K / NDCG@K against hand-computed values, including duplicates and padding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fellrec_flwr.eval.metrics import (MetricsInputError, ndcg_at_k, ranking_metrics, recall_at_k,
                                  target_ranks)

RANKED = np.array([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
TARGETS = np.array([3, 4, 0])  # ranks 1, 2, absent


def test_target_ranks_positions_and_misses():
    assert target_ranks(RANKED, TARGETS).tolist() == [1, 2, -1]


def test_recall_cutoffs_hand_computed():
    assert recall_at_k(RANKED, TARGETS, 1) == 0.0
    assert recall_at_k(RANKED, TARGETS, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, TARGETS, 3) == pytest.approx(2 / 3)
    assert recall_at_k(RANKED, TARGETS, 10) == pytest.approx(2 / 3)  # k beyond the list length


def test_ndcg_exact_values():
    # rank 1 -> 1/log2(3), rank 2 -> 1/log2(4) = 0.5, miss -> 0
    assert ndcg_at_k(RANKED, TARGETS, 3) == pytest.approx((1 / math.log2(3) + 0.5) / 3, abs=1e-15)
    assert ndcg_at_k(RANKED, TARGETS, 2) == pytest.approx((1 / math.log2(3)) / 3, abs=1e-15)
    assert ndcg_at_k(np.array([[4]]), np.array([4]), 1) == 1.0  # top hit: 1/log2(2)


def test_padding_never_matches():
    ranked = np.array([[2, -1, -1], [-1, -1, -1]])
    assert target_ranks(ranked, np.array([2, 0])).tolist() == [0, -1]


def test_duplicates_hit_at_first_position_of_the_title_group():
    # ids 0 and 2 share a title; 3 and 4 share another. canonical = smallest id of the title.
    canonical = np.array([0, 1, 0, 3, 3, 5])
    ranked = np.array([[1, 2, 0], [4, 5, 3], [1, 5, -1]])
    targets = np.array([0, 3, 2])
    assert target_ranks(ranked, targets).tolist() == [2, 2, -1]  # ids compared as they are
    assert target_ranks(ranked, targets, canonical).tolist() == [1, 0, -1]
    assert recall_at_k(ranked, targets, 1, canonical) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranked, targets, 2, canonical) == pytest.approx((1 / math.log2(3) + 1.0) / 3)


def test_ranking_metrics_match_a_direct_loop():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(60)[:25] for _ in range(200)])
    targets = rng.integers(0, 60, size=200)
    out = ranking_metrics(target_ranks(ranked, targets), ks=(10, 20))
    for k in (10, 20):
        recall = ndcg = 0.0
        for row, target in zip(ranked, targets):
            for pos, item in enumerate(row[:k]):
                if item == target:
                    recall += 1
                    ndcg += 1 / math.log2(pos + 2)
                    break
        assert out[f"recall@{k}"] == pytest.approx(recall / 200)
        assert out[f"ndcg@{k}"] == pytest.approx(ndcg / 200)
    assert out["num-users"] == 200
    assert 0 < out["recall@10"] < out["recall@20"] < 1


def test_no_users_gives_zeros():
    out = ranking_metrics(np.array([], dtype=int))
    assert out == {"recall@10": 0.0, "ndcg@10": 0.0, "recall@20": 0.0, "ndcg@20": 0.0, "num-users": 0}


@pytest.mark.parametrize(
    "ranked, targets, k, canonical",
    [
        (np.array([1, 2]), np.array([1]), 1, None),  # ranked not 2-D
        (np.array([[1, 2]]), np.array([1, 2]), 1, None),  # user counts differ
        (np.array([[1, 2]]), np.array([-1]), 1, None),  # negative target
        (np.array([[1, 2]]), np.array([1]), 0, None),  # k < 1
        (np.array([[1, 9]]), np.array([1]), 1, np.array([0, 1, 2])),  # id outside the map
    ],
)
def test_bad_input_raises_a_value_error(ranked, targets, k, canonical):
    with pytest.raises(MetricsInputError):
        recall_at_k(ranked, targets, k, canonical)
