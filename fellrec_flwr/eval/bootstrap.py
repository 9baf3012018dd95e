"""Paired bootstrap over users: 95% confidence intervals of means and of differences.

Every method is evaluated on the same test users, so each has one value per user (a hit
0/1 for Recall@K, a gain for NDCG@K). One bootstrap replicate draws n users with
replacement and takes the mean of every method over THAT draw; the same draws serve all
methods ("paired"), so the interval of a difference A - B reflects only how A and B
disagree user by user, not how hard the users happened to be. Percentile intervals:
the (1-level)/2 and (1+level)/2 quantiles of the replicate means.

Pure numpy; deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

DEFAULT_REPLICATES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    value: float  # the mean over the original users
    low: float
    high: float
    n_users: int


def _check(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of per-user values; got shape {values.shape}.")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: per-user values must be finite (a NaN usually means a user had no result).")
    return values


def resample_indices(n_users: int, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> np.ndarray:
    """(replicates, n_users) user indices drawn with replacement; share them across methods."""
    if n_users < 1 or replicates < 1:
        raise ValueError(f"need n_users >= 1 and replicates >= 1; got {n_users} and {replicates}.")
    return np.random.default_rng(seed).integers(0, n_users, size=(replicates, n_users))


def interval(values: np.ndarray, indices: np.ndarray, level: float = DEFAULT_LEVEL) -> Interval:
    """Mean of `values` and its percentile interval over the replicate draws `indices`."""
    values = _check(values, "values")
    if indices.ndim != 2 or indices.shape[1] != len(values):
        raise ValueError(f"indices of shape {indices.shape} do not draw from {len(values)} users; "
                         "build them with resample_indices(len(values)).")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95.")
    means = values[indices].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(values.mean()), float(low), float(high), len(values))


def mean_ci(values: np.ndarray, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
            level: float = DEFAULT_LEVEL) -> Interval:
    """The mean over users with its bootstrap interval."""
    values = _check(values, "values")
    return interval(values, resample_indices(len(values), replicates, seed), level)


def paired_difference_ci(a: np.ndarray, b: np.ndarray, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                         level: float = DEFAULT_LEVEL) -> Interval:
    """mean(a - b) over the same users, with its paired bootstrap interval."""
    a, b = _check(a, "a"), _check(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs the same users: {len(a)} vs {len(b)} values.")
    return interval(a - b, resample_indices(len(a), replicates, seed), level)


def paired_bootstrap(per_method: Mapping[str, np.ndarray], references: tuple[str, ...] = (),
                     replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                     level: float = DEFAULT_LEVEL) -> dict[tuple[str, str | None], Interval]:
    """Intervals for every method's mean and every method's difference to each reference.

    per_method: {method: per-user values}, all aligned on the same users (same order).
    Returns {(method, None): mean interval, (method, ref): interval of method - ref} for
    refs in `references` that are present (a method is not compared with itself).
    """
    if not per_method:
        raise ValueError("per_method is empty: pass at least one method's per-user values.")
    arrays = {m: _check(v, m) for m, v in per_method.items()}
    sizes = {m: len(v) for m, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"methods have different numbers of users {sizes}: align them on the same users first.")
    indices = resample_indices(next(iter(sizes.values())), replicates, seed)
    out: dict[tuple[str, str | None], Interval] = {}
    for method, values in arrays.items():
        out[(method, None)] = interval(values, indices, level)
        for ref in references:
            if ref in arrays and ref != method:
                out[(method, ref)] = interval(values - arrays[ref], indices, level)
    return out
