"""The popularity baseline on a hand-made interaction set."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pytest

from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.eval.popularity import evaluate_popularity, popularity_scores, rank_popular


@dataclass(frozen=True)
class Ex:
    user_id: int
    history: tuple[int, ...]
    target: int


# ids 1 and 4 share the title "B".
TITLES = {0: "A", 1: "B", 2: "C", 3: "D", 4: "B", 5: "E"}
SEQUENCES = [[0, 1, 2], [0, 2, 3], [0, 4, 2], [3, 5]]


def test_counts_accept_lists_mappings_and_frames():
    expected = {0: 3, 1: 1, 2: 3, 3: 2, 4: 1, 5: 1}
    assert dict(popularity_scores(SEQUENCES)) == expected
    assert dict(popularity_scores({u: s for u, s in enumerate(SEQUENCES)})) == expected
    assert dict(popularity_scores(pd.DataFrame({"user_id": range(4), "items": SEQUENCES}))) == expected


def test_order_sums_duplicate_titles_breaks_ties_by_id_and_skips_history():
    groups = TitleGroups.from_titles(TITLES)
    counts = popularity_scores(SEQUENCES)
    # group counts: A=3, B=1+1=2, C=3, D=2, E=1 -> A(0), C(2), B(1), D(3), E(5)
    ranked = rank_popular([Ex(0, (), 5), Ex(1, (0, 4), 5)], counts, groups, k=5)
    assert ranked.tolist() == [[0, 2, 1, 3, 5], [2, 3, 5, -1, -1]]  # history 4 masks the whole "B" group


def test_metrics_hand_computed():
    counts = popularity_scores(SEQUENCES)
    examples = [
        Ex(0, (0,), 2),  # list C, B, D, E -> rank 0
        Ex(1, (2,), 4),  # list A, B(1), D, E -> id 4 hits at B's position 1
        Ex(2, (0, 2), 5),  # list B, D, E -> rank 2
    ]
    out = evaluate_popularity(examples, counts, TITLES, k_list=(1, 2))
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert out["num-users"] == 3


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the catalogue"):
        evaluate_popularity([Ex(0, (), 99)], popularity_scores(SEQUENCES), TITLES)
