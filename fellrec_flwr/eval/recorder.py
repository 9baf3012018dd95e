"""A run's per-client rows as the server sees them, kept in memory until `results.py` writes them.

- ``records``: one row per measurement, the columns of
  :data:`fellrec_flwr.eval.results.METRIC_COLUMNS` (round, client, split, metric, value);
  client -1 is the server itself (e.g. a round's wall time). They become metrics.csv.
- ``user_ranks``: each evaluated user's target rank, per client and round (per_user.csv).
- ``failures``: which client failed in which round and stage, and why (summary.json).

Flower's FedAvg keeps only the means of a round; a strategy here hands every reply's numbers
to a :class:`RunRecorder`. Plain Python (no Flower, no pandas), so that it is checkpointed as
it is: ``records`` and ``failures`` are restored on resume; ``user_ranks`` are rewritten to
per_user.csv after every round instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SERVER = -1  # the "client" of rows measured on the server


@dataclass
class RunRecorder:
    records: list[dict[str, Any]] = field(default_factory=list)
    user_ranks: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, server_round: int, client: int, split: str, metric: str, value: float) -> None:
        self.records.append({"round": server_round, "client": client, "split": split, "metric": metric,
                             "value": float(value)})

    def add_metrics(self, server_round: int, client: int, split: str, metrics: Mapping[str, Any],
                    skip: Iterable[str] = ()) -> None:
        """Every number in `metrics` (names in `skip`, and non-numbers, left out)."""
        left_out = set(skip)
        for metric, value in metrics.items():
            if metric not in left_out and isinstance(value, (int, float)):
                self.add(server_round, client, split, metric, value)

    def add_user_ranks(self, server_round: int, client: int, split: str, user_ids: Iterable[int],
                       target_ranks: Iterable[int], targets: Iterable[int] | None = None,
                       top10: Iterable[int] | None = None) -> None:
        """One evaluation's per-user ranks; with `targets` and `top10` (flat, 10 per user) also
        per_user.csv's item columns."""
        ranks = {"round": server_round, "client": client, "split": split, "user_ids": list(user_ids),
                 "target_ranks": list(target_ranks)}
        if targets is not None and top10 is not None:
            ranks.update(targets=list(targets), top10=list(top10))
        self.user_ranks.append(ranks)

    def add_failure(self, server_round: int, stage: str, node_id: int, client: int | None, reason: str) -> None:
        self.failures.append({"round": server_round, "stage": stage, "node_id": node_id, "client": client,
                              "reason": reason})

    def failed_clients(self, server_round: int | None = None, stage: str = "train") -> Any:
        """Client keys (None when never identified) that failed in a round; all rounds as {round: keys}."""
        if server_round is not None:
            return [f["client"] for f in self.failures if f["round"] == server_round and f["stage"] == stage]
        by_round: dict[int, list[int | None]] = {}
        for f in self.failures:
            if f["stage"] == stage:
                by_round.setdefault(f["round"], []).append(f["client"])
        return by_round

    def metric_rows(self) -> list[dict[str, Any]]:
        """All rows so far, as copies."""
        return [dict(r) for r in self.records]

    def clients(self) -> set[int]:
        """Every client that has a row (the server's own rows left out)."""
        return {int(r["client"]) for r in self.records if int(r["client"]) != SERVER}

    def state(self) -> dict[str, Any]:
        return {"records": self.metric_rows(), "failures": [dict(f) for f in self.failures]}

    def load(self, state: Mapping[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.failures = [dict(f) for f in state["failures"]]
