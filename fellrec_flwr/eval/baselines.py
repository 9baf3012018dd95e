"""Non-LLM baselines on the same training interactions the LLM sees: popularity, Markov, SASRec.

First-order Markov ("item-to-item transitions"): count, over every user's training
sequence, how often title group b directly follows title group a. A user is recommended
the groups that most often followed the title group of their LAST history item; when
fewer than K such groups remain (after masking the user's history), the list is filled
in popularity order (`fellrec_flwr.eval.popularity`). Ties between equal transition counts
are broken by popularity order, so with no transitions at all Markov *is* popularity.

SASRec (`fellrec_flwr.eval.sasrec`) is trained once per prepared data set and cached in it.

Title groups, history masking and hit semantics are those of `fellrec_flwr.eval.grounding`
(items sharing a title are one group; a hit is at the group's position).

`baseline_ranks` gives the per-user 0-based target rank (-1 = not in the top K) that the
run folder's per_user.csv stores for every method, so baselines and the LLM can be
compared user by user (paired bootstrap, `fellrec_flwr.eval.bootstrap`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from fellrec_flwr.eval.grounding import TitleGroups
from fellrec_flwr.eval.metrics import DEFAULT_KS, ranking_metrics, target_ranks
from fellrec_flwr.eval.popularity import _sequences, popularity_order, popularity_scores, rank_popular
from fellrec_flwr.eval.results import BASELINE_METHODS, per_user_rows

if TYPE_CHECKING:
    from fellrec_flwr.config import SasrecSettings
    from fellrec_flwr.eval.sasrec import FittedSasrec

BASELINES = BASELINE_METHODS  # one list of names, kept in results (per_user.csv)


def transition_counts(train_sequences: Any, groups: TitleGroups) -> dict[int, Counter[int]]:
    """{group a: Counter(group b -> times b directly followed a)} over the training sequences.

    A step within one title group (a re-release after the original) is not a transition.
    """
    out: dict[int, Counter[int]] = defaultdict(Counter)
    for items in _sequences(train_sequences):
        if len(items) < 2:
            continue
        g = groups.group_index([int(i) for i in items])
        for a, b in zip(g[:-1].tolist(), g[1:].tolist()):
            if a != b:
                out[a][b] += 1
    return dict(out)


def rank_markov(examples: Sequence[Any], transitions: Mapping[int, Counter[int]], pop_order: np.ndarray,
                groups: TitleGroups, k: int) -> np.ndarray:
    """(users, k) item ids: successors of the last history item's group, then popularity."""
    position = np.empty(len(pop_order), dtype=np.int64)
    position[pop_order] = np.arange(len(pop_order))  # popularity rank of each group (tie-break)
    out = np.full((len(examples), k), -1, dtype=np.int64)
    for row, ex in enumerate(examples):
        history = groups.group_index(ex.history) if len(ex.history) else np.zeros(0, dtype=np.int64)
        seen = set(history.tolist())
        successors = transitions.get(int(history[-1]), Counter()) if len(history) else Counter()
        head = sorted((g for g in successors if g not in seen), key=lambda g: (-successors[g], position[g]))[:k]
        taken = seen | set(head)
        if len(head) < k:  # back off to popularity; at most len(taken) groups are skipped
            head += [g for g in pop_order[: k + len(taken)].tolist() if g not in taken][: k - len(head)]
        out[row, : len(head)] = groups.rep_ids[head]
    return out


@dataclass(frozen=True, eq=False)
class FittedBaselines:
    """Popularity counts, transitions (and a trained SASRec) of one training set, ranked many times."""

    groups: TitleGroups
    counts: Counter[int]
    pop_order: np.ndarray
    transitions: dict[int, Counter[int]]
    sasrec: "FittedSasrec | None" = None

    @classmethod
    def fit(cls, train_sequences: Any, titles: Mapping[int, str],
            sasrec: "FittedSasrec | None" = None) -> "FittedBaselines":
        groups = sasrec.groups if sasrec is not None else TitleGroups.from_titles(titles)
        counts = popularity_scores(train_sequences)
        return cls(groups, counts, popularity_order(counts, groups), transition_counts(train_sequences, groups),
                   sasrec)

    @classmethod
    def fit_prepared(cls, data: Any, sasrec: "SasrecSettings | None" = None,
                     seed: int | None = None) -> "FittedBaselines":
        """All baselines of a `PreparedData`; SASRec (from its cache, or trained) when `sasrec` is enabled."""
        fitted_sasrec = None
        if sasrec is not None and sasrec.enabled:
            from fellrec_flwr.eval.sasrec import load_or_train

            fitted_sasrec = load_or_train(data, sasrec, seed)
        return cls.fit(data.train_sequences, data.titles, fitted_sasrec)

    @property
    def methods(self) -> tuple[str, ...]:
        """The baselines this object can rank (SASRec only when it holds a trained model)."""
        return tuple(m for m in BASELINES if m != "sasrec" or self.sasrec is not None)

    def ranked(self, method: str, examples: Sequence[Any], k: int) -> np.ndarray:
        """(users, k) recommended item ids of `method`."""
        if method == "popularity":
            return rank_popular(examples, self.counts, self.groups, k)
        if method == "markov":
            return rank_markov(examples, self.transitions, self.pop_order, self.groups, k)
        if method == "sasrec":
            if self.sasrec is None:
                raise ValueError("sasrec needs a trained model: fit with FittedBaselines.fit_prepared(data, "
                                 "cfg.sasrec) (or pass a FittedSasrec from fellrec_flwr.eval.sasrec.load_or_train).")
            return self.sasrec.ranked(examples, k)
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}.")

    def ranks(self, method: str, examples: Sequence[Any], k: int = max(DEFAULT_KS)) -> np.ndarray:
        """Per-user 0-based rank of the target in the top-k (-1 = not there)."""
        return self.ranked_with_ranks(method, examples, k)[1]

    def ranked_with_ranks(self, method: str, examples: Sequence[Any],
                          k: int = max(DEFAULT_KS)) -> tuple[np.ndarray, np.ndarray]:
        """(users, k) recommended item ids of `method` and each user's target rank in them."""
        targets = np.array([int(ex.target) for ex in examples], dtype=np.int64)
        self.groups.group_index(targets)  # unknown targets: a clear error
        ranked = self.ranked(method, examples, k)
        return ranked, target_ranks(ranked, targets, canonical=self.groups.canonical)


def group_counts(train_sequences: Any, groups: TitleGroups) -> np.ndarray:
    """(G,) training interactions per title group (the popularity baseline's counts, summed over a group's ids)."""
    counts = popularity_scores(train_sequences)
    out = np.zeros(len(groups), dtype=np.int64)
    if counts:
        items = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        np.add.at(out, groups.group_index(items), np.fromiter(counts.values(), dtype=np.int64, count=len(counts)))
    return out


def baseline_ranks(method: str, examples: Sequence[Any], train_sequences: Any, titles: Mapping[int, str],
                   k: int = max(DEFAULT_KS)) -> np.ndarray:
    """Per-user 0-based rank of the target in the baseline's top-k (-1 = not there)."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}.")
    return FittedBaselines.fit(train_sequences, titles).ranks(method, examples, k)  # sasrec: a clear error


def evaluate_markov(examples: Sequence[Any], train_sequences: Any, titles: Mapping[int, str],
                    k_list: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """recall@K, ndcg@K (K in k_list) and num-users of the Markov ranking on `examples`."""
    return ranking_metrics(baseline_ranks("markov", examples, train_sequences, titles, max(k_list)), k_list)


def baseline_rows(data: Any, splits: Sequence[str], round_: int = 0, sasrec: "SasrecSettings | None" = None,
                  seed: int | None = None, fitted: FittedBaselines | None = None) -> list[dict[str, Any]]:
    """per_user.csv rows of every baseline for every client's users of `splits`, with each
    user's target and recommended items (the same columns for any baseline).

    data: a `PreparedData` (or anything with num_clients, split(name, client),
    train_sequences and titles; with `sasrec` also path and manifest). Counts come from all
    users' training sequences, the same interactions the federated clients train on; so
    does SASRec (settings `sasrec`, its seed `seed`, None = sasrec.seed; None or sasrec.enabled=false: no SASRec rows).
    `fitted`: baselines already fitted on `data` (then `sasrec` and `seed` are not used).
    """
    fitted = fitted or FittedBaselines.fit_prepared(data, sasrec, seed)
    rows: list[dict[str, Any]] = []
    for split in dict.fromkeys(splits):  # unique, in order
        for client in range(data.num_clients):
            examples = data.split(split, client=client)
            if not examples:
                continue
            for method in fitted.methods:
                ranked, ranks = fitted.ranked_with_ranks(method, examples)
                rows += per_user_rows(method, round_, split, client, [ex.user_id for ex in examples], ranks,
                                      targets=[ex.target for ex in examples], top_items=ranked.tolist())
    return rows
