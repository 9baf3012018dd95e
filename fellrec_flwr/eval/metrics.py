"""Top-K ranking metrics with one relevant item per user (pure numpy).

Every user has exactly one target item and a ranked list of item ids (best first).
The target's *rank* is its 0-based position in that list (-1 if absent); then

    Recall@K = 1 if rank < K else 0
    NDCG@K   = 1 / log2(rank + 2) if rank < K else 0   (the ideal DCG is 1)

averaged over users. Lists may be padded with -1 (fewer candidates than K).

Duplicate titles: several item ids can carry the same title, and a generated title cannot
tell them apart. Pass ``canonical`` (an array: item id -> the id that stands for its title
group, e.g. ``Catalogue.canonical``); both the ranked ids and the targets are mapped through
it, so the target counts as hit at the FIRST position holding any id with the target's
title. Without ``canonical`` ids are compared as they are.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

DEFAULT_KS = (10, 20)


class MetricsInputError(ValueError):
    """Ranked lists or targets have the wrong shape or hold unknown ids."""


def _as_canonical(ids: np.ndarray, canonical: np.ndarray | None) -> np.ndarray:
    if canonical is None:
        return ids
    canonical = np.asarray(canonical)
    out = np.full(ids.shape, -1, dtype=np.int64)  # padding (-1) stays padding
    real = ids >= 0
    if real.any() and ids[real].max() >= len(canonical):
        raise MetricsInputError(
            f"item id {int(ids[real].max())} is outside the canonical map (size {len(canonical)}); "
            "build the map from the same catalogue the ranking came from."
        )
    out[real] = canonical[ids[real]]
    return out


def target_ranks(ranked_item_ids: np.ndarray, target_ids: np.ndarray,
                 canonical: np.ndarray | None = None) -> np.ndarray:
    """0-based position of each user's target in its ranked list, -1 when absent.

    ranked_item_ids: (num_users, L) ints, best first, -1 = padding.
    target_ids: (num_users,) ints, all >= 0.
    """
    ranked = np.asarray(ranked_item_ids, dtype=np.int64)
    targets = np.asarray(target_ids, dtype=np.int64)
    if ranked.ndim != 2 or targets.ndim != 1 or len(ranked) != len(targets):
        raise MetricsInputError(
            f"expected ranked ids of shape (users, L) and targets of shape (users,); got "
            f"{ranked.shape} and {targets.shape}."
        )
    if (targets < 0).any():
        raise MetricsInputError("target ids must be >= 0 (-1 is reserved for padding).")
    ranked = _as_canonical(ranked, canonical)
    targets = _as_canonical(targets, canonical)
    hit = ranked == targets[:, None]
    found = hit.any(axis=1)
    first = hit.argmax(axis=1)  # first True: the first position of the target's group
    return np.where(found, first, -1)


def target_ranks_from_scores(scores: np.ndarray, masks: np.ndarray, target_cols: np.ndarray, k: int) -> np.ndarray:
    """0-based rank of each row's target column among the unmasked columns (-1 = not in the top k).

    Columns ahead of the target: a higher score, or an equal score and a smaller index (the
    order a stable sort gives). A masked target (e.g. a title the user already had) is a miss.
    """
    _check_k(k)
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    target_cols = np.asarray(target_cols, dtype=np.int64)
    if scores.ndim != 2 or masks.shape != scores.shape or target_cols.shape != (len(scores),):
        raise MetricsInputError(f"expected scores and masks of one shape (users, columns) and one target per row; "
                                f"got {scores.shape}, {masks.shape} and {target_cols.shape}.")
    scores = np.where(masks, -np.inf, scores)
    rows = np.arange(len(scores))
    target = scores[rows, target_cols]
    ahead = (scores > target[:, None]).sum(axis=1)
    ahead += (scores == target[:, None]).cumsum(axis=1)[rows, target_cols] - 1
    return np.where(np.isfinite(target) & (ahead < k), ahead, -1).astype(np.int64)


def _check_k(k: int) -> None:
    if k < 1:
        raise MetricsInputError(f"k={k} must be >= 1.")


def recall_from_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@k (0/1) from 0-based target ranks (-1 = miss)."""
    _check_k(k)
    ranks = np.asarray(ranks)
    return ((ranks >= 0) & (ranks < k)).astype(np.float64)


def ndcg_from_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k from 0-based target ranks (-1 = miss); one relevant item, so IDCG = 1."""
    hit = recall_from_ranks(ranks, k) > 0
    safe = np.where(hit, ranks, 0)
    return np.where(hit, 1.0 / np.log2(safe + 2.0), 0.0)


def recall_at_k(ranked_item_ids: np.ndarray, target_ids: np.ndarray, k: int,
                canonical: np.ndarray | None = None) -> float:
    """Mean Recall@k over users (see module docstring for ``canonical``)."""
    ranks = target_ranks(ranked_item_ids, target_ids, canonical)
    return float(recall_from_ranks(ranks, k).mean()) if len(ranks) else 0.0


def ndcg_at_k(ranked_item_ids: np.ndarray, target_ids: np.ndarray, k: int,
              canonical: np.ndarray | None = None) -> float:
    """Mean NDCG@k over users (see module docstring for ``canonical``)."""
    ranks = target_ranks(ranked_item_ids, target_ids, canonical)
    return float(ndcg_from_ranks(ranks, k).mean()) if len(ranks) else 0.0


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """{"recall@K": ..., "ndcg@K": ...} for each K, plus "num-users"; means over users.

    With no users every metric is 0.0 (and num-users 0), so callers can weight by num-users.
    """
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(recall_from_ranks(ranks, k).mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(ndcg_from_ranks(ranks, k).mean()) if len(ranks) else 0.0
    out["num-users"] = len(ranks)
    return out
