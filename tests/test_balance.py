"""Balance statistics against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest

from fellrec_flwr.eval.balance import BalanceInputError, balance_stats


def test_matches_numpy():
    values = {0: 0.10, 1: 0.30, 2: 0.05, 3: 0.20}
    sizes = {0: 10, 1: 30, 2: 50, 3: 10}
    out = balance_stats(values, sizes)
    v = np.array([0.10, 0.30, 0.05, 0.20])
    w = np.array([10, 30, 50, 10])
    assert out["mean"] == pytest.approx(v.mean())
    assert out["weighted_mean"] == pytest.approx((v * w).sum() / w.sum())
    assert out["std"] == pytest.approx(np.sqrt(((v - v.mean()) ** 2).mean()))
    assert out["cv"] == pytest.approx(v.std() / v.mean())
    assert (out["worst_client"], out["worst_value"]) == (2, 0.05)
    assert (out["best_client"], out["best_value"]) == (1, 0.30)
    assert out["gap"] == pytest.approx(0.25)
    assert out["num_clients"] == 4


def test_without_sizes_weighted_mean_is_mean_and_ties_go_to_smaller_id():
    out = balance_stats({3: 0.2, 1: 0.2, 2: 0.4})
    assert out["weighted_mean"] == pytest.approx(out["mean"])
    assert out["worst_client"] == 1


def test_lower_is_better_swaps_worst_and_best():
    out = balance_stats({0: 1.5, 1: 0.7}, higher_is_better=False)
    assert (out["worst_client"], out["best_client"]) == (0, 1)
    assert out["gap"] == pytest.approx(0.8)


def test_all_zero_is_perfectly_balanced():
    out = balance_stats({0: 0.0, 1: 0.0})
    assert out["cv"] == 0.0 and out["std"] == 0.0 and out["gap"] == 0.0


@pytest.mark.parametrize("values, sizes", [({}, None), ({0: float("nan")}, None), ({0: 0.1, 1: 0.2}, {0: 5}),
                                           ({0: 0.1}, {0: 0})])
def test_bad_input(values, sizes):
    with pytest.raises(BalanceInputError):
        balance_stats(values, sizes)
