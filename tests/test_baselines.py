"""Markov (item-to-item) baseline and the per-user rows of both baselines, on hand-made data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fellrec_flwr.eval.baselines import (FittedBaselines, baseline_ranks, baseline_rows, evaluate_markov,
                                    transition_counts)
from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.eval.popularity import evaluate_popularity, popularity_scores


@dataclass(frozen=True)
class Ex:
    user_id: int
    history: tuple[int, ...]
    target: int


# ids 1 and 4 share the title "B" (group 1); groups: A=0, B=1, C=2, D=3, E=4.
TITLES = {0: "A", 1: "B", 2: "C", 3: "D", 4: "B", 5: "E"}
SEQUENCES = [[0, 1, 2], [0, 2, 3], [0, 4, 2], [3, 5], [1, 4]]


def test_transitions_count_group_steps_and_skip_steps_within_a_group():
    groups = TitleGroups.from_titles(TITLES)
    t = transition_counts(SEQUENCES, groups)
    # A->B twice (ids 1 and 4), B->C twice, A->C, C->D, D->E; 1->4 stays in group B: not counted.
    assert {a: dict(c) for a, c in t.items()} == {0: {1: 2, 2: 1}, 1: {2: 2}, 2: {3: 1}, 3: {4: 1}}


def test_markov_ranks_successors_of_last_item_then_popularity_with_history_masked():
    fitted = FittedBaselines.fit(SEQUENCES, TITLES)
    # popularity (group counts): A=3, B=4, C=3, D=2, E=1 -> B, A, C, D, E
    ranked = fitted.ranked("markov", [Ex(0, (0,), 2), Ex(1, (3, 2), 5), Ex(2, (5,), 0)], k=4)
    # last A: B(2), C(1), then popularity D, E.
    # last C: successor D is in the history -> popularity B, A, E (C, D masked).
    # last E: no successors -> popularity B, A, C, D.
    assert ranked.tolist() == [[1, 2, 3, 5], [1, 0, 5, -1], [1, 0, 2, 3]]


def test_markov_metrics_hand_computed():
    examples = [Ex(0, (0,), 2), Ex(1, (0,), 4), Ex(2, (3, 2), 5)]
    # user 0: list B, C, ... -> rank 1; user 1: target "B" -> rank 0; user 2: list B, A, E -> rank 2.
    assert baseline_ranks("markov", examples, SEQUENCES, TITLES, k=3).tolist() == [1, 0, 2]
    out = evaluate_markov(examples, SEQUENCES, TITLES, k_list=(1, 2))
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 3)


def test_without_transitions_markov_is_popularity():
    sequences = [[0], [0], [2], [3]]  # no sequence has two items
    examples = [Ex(0, (5,), 0), Ex(1, (0,), 2), Ex(2, (2,), 1)]
    markov = evaluate_markov(examples, sequences, TITLES)
    popularity = evaluate_popularity(examples, popularity_scores(sequences), TITLES)
    assert markov == popularity


def test_popularity_ranks_match_evaluate_popularity():
    examples = [Ex(0, (0,), 2), Ex(1, (2,), 4), Ex(2, (0, 2), 5)]
    ranks = baseline_ranks("popularity", examples, SEQUENCES, TITLES, k=5)
    metrics = evaluate_popularity(examples, popularity_scores(SEQUENCES), TITLES, k_list=(1, 2))
    assert metrics["recall@1"] == pytest.approx(np.mean((ranks >= 0) & (ranks < 1)))
    assert metrics["recall@2"] == pytest.approx(np.mean((ranks >= 0) & (ranks < 2)))


def test_unknown_method_and_unknown_target_are_clear_errors():
    with pytest.raises(ValueError, match="unknown baseline 'mf'"):
        baseline_ranks("mf", [Ex(0, (0,), 2)], SEQUENCES, TITLES)
    with pytest.raises(ValueError, match="not in the catalogue"):
        baseline_ranks("markov", [Ex(0, (0,), 99)], SEQUENCES, TITLES)


class _Data:
    num_clients = 2
    train_sequences = SEQUENCES
    titles = TITLES

    def split(self, name, client):
        return {("test", 0): [Ex(7, (0,), 2)], ("test", 1): [Ex(8, (0,), 4), Ex(9, (3, 2), 5)]}[(name, client)]


def test_baseline_rows_cover_both_methods_and_every_client():
    rows = baseline_rows(_Data(), ["test"], round_=3)
    got = {(r["method"], r["client"], r["user_id"]): r["target_rank"] for r in rows}
    assert got == {("popularity", 0, 7): 1, ("popularity", 1, 8): 0, ("popularity", 1, 9): 2,
                   ("markov", 0, 7): 1, ("markov", 1, 8): 0, ("markov", 1, 9): 2}
    assert {r["round"] for r in rows} == {3} and {r["split"] for r in rows} == {"test"}


def test_group_counts_sum_a_groups_ids():
    from fellrec_flwr.eval.baselines import group_counts

    # A=3, B=4 (ids 1 and 4), C=3, D=2, E=1
    assert group_counts(SEQUENCES, TitleGroups.from_titles(TITLES)).tolist() == [3, 4, 3, 2, 1]
