"""The popularity baseline: recommend the most interacted-with titles the user has not had.

Counts come from the training interactions only (each user's training sequence, without
its valid and test targets), over all users or over one client's users. Ranking and
scoring use the same title groups and metrics as the generative recommender (see
`fellrec_flwr.eval.grounding`): items sharing a title form one group whose count is the sum of
its members' counts; groups are ranked by count (ties: smaller item id first); the user's
history groups are skipped; the target is hit at its group's position.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.eval.metrics import DEFAULT_KS, ranking_metrics, target_ranks


def _sequences(train_sequences: Any) -> Iterable[Sequence[int]]:
    """Accept a DataFrame with an `items` column, a {user: items} mapping, or an iterable of sequences."""
    if hasattr(train_sequences, "columns"):
        if "items" not in train_sequences.columns:
            raise ValueError("train_sequences DataFrame needs an `items` column (train_sequences.parquet).")
        return train_sequences["items"]
    if isinstance(train_sequences, Mapping):
        return train_sequences.values()
    return train_sequences


def popularity_scores(train_sequences: Any) -> Counter[int]:
    """Interaction count per item id over the given training sequences."""
    counts: Counter[int] = Counter()
    for items in _sequences(train_sequences):
        counts.update(int(i) for i in items)
    return counts


def popularity_order(counts: Mapping[int, int], groups: TitleGroups) -> np.ndarray:
    """Title-group indices, most popular first (group count = sum over its ids; ties: smaller id)."""
    group_counts = np.zeros(len(groups), dtype=np.int64)
    if counts:
        items = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        values = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        np.add.at(group_counts, groups.group_index(items), values)
    # Groups are numbered in ascending smallest-id order, so a stable sort breaks ties by id.
    return np.argsort(-group_counts, kind="stable")


def rank_popular(examples: Sequence[Any], counts: Mapping[int, int], groups: TitleGroups, k: int) -> np.ndarray:
    """(users, k) item ids (smallest id of each group), skipping each user's history groups."""
    order = popularity_order(counts, groups)
    out = np.full((len(examples), k), -1, dtype=np.int64)
    for row, ex in enumerate(examples):
        seen = set(groups.group_index(ex.history).tolist()) if len(ex.history) else set()
        # At most len(seen) of the first k + len(seen) groups are skipped.
        head = [g for g in order[: k + len(seen)] if g not in seen][:k]
        out[row, : len(head)] = groups.rep_ids[head]
    return out


def evaluate_popularity(examples: Sequence[Any], counts: Mapping[int, int], titles: Mapping[int, str],
                        k_list: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """recall@K, ndcg@K (K in k_list) and num-users of the popularity ranking on `examples`."""
    groups = TitleGroups.from_titles(titles)
    targets = np.array([int(ex.target) for ex in examples], dtype=np.int64)
    ranked = rank_popular(examples, counts, groups, max(k_list))
    groups.group_index(targets)  # unknown targets: a clear error
    return ranking_metrics(target_ranks(ranked, targets, canonical=groups.canonical), k_list)
