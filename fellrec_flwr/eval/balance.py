"""How evenly a method serves its clients: spread statistics of one metric over clients (pure).

Used for summary.json: a method that is better on average but leaves one client far
behind is less balanced, which is what FELLRec's dynamic balance targets.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class BalanceInputError(ValueError):
    """No clients, non-finite values, or sizes that do not match the clients."""


def balance_stats(values: Mapping[Any, float], sizes: Mapping[Any, float] | None = None,
                  higher_is_better: bool = True) -> dict[str, Any]:
    """Spread of a per-client metric.

    Returns num_clients, mean (unweighted), weighted_mean (by `sizes`, e.g. test users;
    equals mean without sizes), std (population, ddof=0: the clients are the whole
    population, not a sample), cv (std / |mean|; 0.0 when every value is 0), worst_client /
    worst_value, best_client / best_value (lowest / highest value when higher is better;
    ties go to the smaller client id), and gap = |best_value - worst_value|.
    """
    if not values:
        raise BalanceInputError("balance_stats needs at least one client value.")
    clients = sorted(values, key=lambda c: (str(type(c)), c))
    vals = np.array([float(values[c]) for c in clients], dtype=np.float64)
    if not np.isfinite(vals).all():
        raise BalanceInputError(f"client values must be finite; got {dict(zip(clients, vals.tolist()))}.")
    if sizes is None:
        weights = np.ones_like(vals)
    else:
        missing = [c for c in clients if c not in sizes]
        if missing:
            raise BalanceInputError(f"sizes are missing clients {missing}; pass one size per client.")
        weights = np.array([float(sizes[c]) for c in clients], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise BalanceInputError("client sizes must be >= 0 with a positive total.")
    mean = float(vals.mean())
    std = float(vals.std())
    if mean != 0.0:
        cv = std / abs(mean)
    else:
        cv = 0.0 if std == 0.0 else float("inf")
    # argmin/argmax return the first extreme, i.e. the smallest client id on ties.
    worst = int(np.argmin(vals) if higher_is_better else np.argmax(vals))
    best = int(np.argmax(vals) if higher_is_better else np.argmin(vals))
    return {
        "num_clients": len(clients),
        "mean": mean,
        "weighted_mean": float(np.average(vals, weights=weights)),
        "std": std,
        "cv": float(cv),
        "worst_client": clients[worst],
        "worst_value": float(vals[worst]),
        "best_client": clients[best],
        "best_value": float(vals[best]),
        "gap": float(abs(vals[best] - vals[worst])),
    }
