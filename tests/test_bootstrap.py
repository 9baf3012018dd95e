"""Paired bootstrap intervals against direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from fellrec_flwr.eval.bootstrap import interval, mean_ci, paired_bootstrap, paired_difference_ci, resample_indices


def test_interval_is_the_percentile_of_replicate_means_computed_by_hand():
    values = np.array([0.0, 1.0, 1.0, 0.0])
    indices = np.array([[0, 0, 0, 0], [1, 2, 1, 2], [0, 1, 2, 3], [0, 1, 0, 1], [3, 3, 1, 0]])
    # replicate means: 0, 1, 0.5, 0.5, 0.25
    out = interval(values, indices, level=0.5)
    assert out.value == pytest.approx(0.5)
    assert out.n_users == 4
    assert out.low == pytest.approx(np.quantile([0, 1, 0.5, 0.5, 0.25], 0.25))
    assert out.high == pytest.approx(np.quantile([0, 1, 0.5, 0.5, 0.25], 0.75))


def test_constant_values_give_a_zero_width_interval():
    out = mean_ci(np.full(50, 0.3))
    assert (out.value, out.low, out.high) == pytest.approx((0.3, 0.3, 0.3))


def test_width_matches_the_normal_approximation_for_hits():
    rng = np.random.default_rng(1)
    hits = (rng.random(2000) < 0.3).astype(float)
    out = mean_ci(hits, replicates=4000, seed=3)
    p = hits.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / len(hits))
    assert out.low < p < out.high
    assert (out.high - out.low) == pytest.approx(2 * half, rel=0.1)


def test_paired_difference_of_identical_methods_is_exactly_zero():
    hits = (np.random.default_rng(0).random(100) < 0.4).astype(float)
    out = paired_difference_ci(hits, hits.copy())
    assert (out.value, out.low, out.high) == (0.0, 0.0, 0.0)


def test_pairing_makes_a_consistent_small_gain_significant():
    # B hits exactly where A hits, plus 10 more users: unpaired intervals overlap, the paired one excludes 0.
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.3).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:10]] = 1.0
    out = paired_difference_ci(b, a, seed=1)
    assert out.value == pytest.approx(10 / 400)
    assert out.low > 0
    ci_a, ci_b = mean_ci(a, seed=1), mean_ci(b, seed=2)
    assert ci_b.low < ci_a.high  # the separate intervals cannot tell them apart


def test_paired_bootstrap_uses_the_same_draws_for_every_method():
    rng = np.random.default_rng(5)
    per_method = {"fellrec": rng.random(30), "fedavg": rng.random(30), "popularity": rng.random(30)}
    out = paired_bootstrap(per_method, references=("fedavg", "popularity", "markov"), replicates=300, seed=9)
    indices = resample_indices(30, 300, 9)
    direct = per_method["fellrec"][indices].mean(axis=1) - per_method["fedavg"][indices].mean(axis=1)
    assert out[("fellrec", "fedavg")].low == pytest.approx(np.quantile(direct, 0.025))
    assert out[("fellrec", "fedavg")].high == pytest.approx(np.quantile(direct, 0.975))
    assert ("fellrec", "markov") not in out and ("fedavg", "fedavg") not in out
    assert out[("popularity", None)].value == pytest.approx(per_method["popularity"].mean())


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same users"):
        paired_difference_ci(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="different numbers of users"):
        paired_bootstrap({"a": np.ones(3), "b": np.ones(4)})
    with pytest.raises(ValueError, match="NaN"):
        mean_ci(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci(np.array([]))
