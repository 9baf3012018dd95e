"""Leave-one-out splits and BIGRec few-shot sampling (pure functions, no I/O).

For a user's sequence ``s`` (oldest first, at least 3 items):

- test:  history = the items before ``s[-1]`` (the last ``history_len``), target = ``s[-1]``;
- valid: history = the items before ``s[-2]`` (the last ``history_len``), target = ``s[-2]``;
- train: the training sequence is ``s[:-2]``; each position ``j >= 1`` in it gives one prompt
  with history ``train[max(0, j - history_len):j]`` and target ``train[j]``.

Few-shot sampling as BIGRec: ``train_samples`` prompts drawn uniformly without replacement
from all training prompts of all users (0 = all of them); ``valid_users`` and ``test_users``
users drawn uniformly (0 = all). Each draw has its own seeded stream, so changing one size
does not reshuffle the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from data_prep.errors import DataPrepError

MIN_SEQUENCE = 3  # one training item + the valid target + the test target


@dataclass(frozen=True)
class LeaveOneOut:
    train_items: tuple[int, ...]
    valid_history: tuple[int, ...]
    valid_target: int
    test_history: tuple[int, ...]
    test_target: int


def leave_one_out(seq: Sequence[int], history_len: int) -> LeaveOneOut:
    if len(seq) < MIN_SEQUENCE:
        raise DataPrepError(f"A sequence of {len(seq)} items cannot be split; it needs at least {MIN_SEQUENCE}.")
    seq = tuple(int(i) for i in seq)
    return LeaveOneOut(
        train_items=seq[:-2],
        valid_history=seq[:-2][-history_len:],
        valid_target=seq[-2],
        test_history=seq[:-1][-history_len:],
        test_target=seq[-1],
    )


def training_prompt(train_items: Sequence[int], j: int, history_len: int) -> tuple[tuple[int, ...], int]:
    """The prompt at position ``j >= 1`` of a training sequence: (history, target)."""
    return tuple(train_items[max(0, j - history_len):j]), int(train_items[j])


def training_prompts(train_items: Sequence[int], history_len: int) -> list[tuple[tuple[int, ...], int]]:
    return [training_prompt(train_items, j, history_len) for j in range(1, len(train_items))]


def sample_indices(total: int, wanted: int, rng: np.random.Generator) -> np.ndarray:
    """`wanted` of ``range(total)`` uniformly without replacement, sorted; 0 or more than
    `total` gives all of them."""
    if wanted <= 0 or wanted >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, size=wanted, replace=False))


def drop_short_users(sequences: Mapping[int, Sequence[int]]) -> tuple[dict[int, list[int]], int]:
    """Users with fewer than MIN_SEQUENCE items cannot give train, valid and test rows."""
    kept = {u: list(s) for u, s in sequences.items() if len(s) >= MIN_SEQUENCE}
    return kept, len(sequences) - len(kept)


@dataclass
class Splits:
    """Frames without the ``client`` column (added once users have clients)."""

    train: pd.DataFrame  # user_id, history, target
    valid: pd.DataFrame
    test: pd.DataFrame
    train_sequences: pd.DataFrame  # user_id, items
    available_train_prompts: int


def build_splits(sequences: Mapping[int, Sequence[int]], history_len: int, train_samples: int,
                 valid_users: int, test_users: int, seed: int) -> Splits:
    """Leave-one-out for every user, then the few-shot samples. Users must have >= 3 items."""
    if history_len < 1:
        raise DataPrepError(f"data.history-len={history_len} must be >= 1.")
    for name, value in (("train-samples", train_samples), ("valid-users", valid_users),
                        ("test-users", test_users)):
        if value < 0:
            raise DataPrepError(f"data.{name}={value} must be >= 0 (0 = all).")
    users = sorted(sequences)
    if not users:
        raise DataPrepError("No users to split.")
    loo = [leave_one_out(sequences[u], history_len) for u in users]
    train_rng, valid_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    # Training prompts are numbered user by user; sample numbers, then decode (user, position).
    per_user = np.array([len(x.train_items) - 1 for x in loo])
    ends = np.cumsum(per_user)
    total = int(ends[-1])
    if total == 0:
        raise DataPrepError("No training prompts: every user has exactly 3 items. Users need at least 4 "
                            "items for a training prompt.")
    picked = sample_indices(total, train_samples, train_rng)
    user_idx = np.searchsorted(ends, picked, side="right")
    train_rows = []
    for g, ui in zip(picked.tolist(), user_idx.tolist()):
        j = g - int(ends[ui] - per_user[ui]) + 1
        history, target = training_prompt(loo[ui].train_items, j, history_len)
        train_rows.append((users[ui], list(history), target))

    def eval_frame(wanted: int, rng: np.random.Generator, valid: bool) -> pd.DataFrame:
        rows = []
        for ui in sample_indices(len(users), wanted, rng).tolist():
            x = loo[ui]
            history, target = (x.valid_history, x.valid_target) if valid else (x.test_history, x.test_target)
            rows.append((users[ui], list(history), target))
        return pd.DataFrame(rows, columns=["user_id", "history", "target"])

    return Splits(
        train=pd.DataFrame(train_rows, columns=["user_id", "history", "target"]),
        valid=eval_frame(valid_users, valid_rng, valid=True),
        test=eval_frame(test_users, test_rng, valid=False),
        train_sequences=pd.DataFrame({"user_id": users, "items": [list(x.train_items) for x in loo]}),
        available_train_prompts=total,
    )
