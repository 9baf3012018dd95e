"""The learned inverter: observed vectors -> tokens (pure numpy, no model, no I/O).

The attacker maps the vectors around a position (a window of ``2*width+1`` neighbours, each
L2-normalised) linearly onto the token's row of the public input-embedding matrix (ridge
regression, closed form), then reads the token as the nearest catalogue token by cosine.
Regressing onto embedding rows rather than classifying over the vocabulary keeps the
probe small (features x hidden instead of features x vocabulary, 49k for SmolLM2) and lets
it name tokens it never saw in training. The ridge strength is picked on held-out
attacker prompts from a small grid.

The window matters: deep in the network (and in gradients) position t mostly carries the
*next* token, so the token at t is best read from position t-1 as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1)  # ridge strength relative to the mean feature variance


def window_features(vectors: np.ndarray, positions: np.ndarray, width: int = 1) -> np.ndarray:
    """(n, (2*width+1)*d): the unit vectors at positions p-width..p+width, zeros outside the sequence."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float32), where=norms > 0)
    total, dim = unit.shape
    out = np.zeros((len(positions), (2 * width + 1) * dim), dtype=np.float32)
    for slot, shift in enumerate(range(-width, width + 1)):
        src = positions + shift
        ok = (src >= 0) & (src < total)
        out[ok, slot * dim:(slot + 1) * dim] = unit[src[ok]]
    return out


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix, dtype=np.float32), where=norms > 0)


def nearest_rows(queries: np.ndarray, table: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Index of the row of ``table`` with the highest cosine similarity to each query."""
    table_unit = unit_rows(table.astype(np.float32))
    out = np.empty(len(queries), dtype=np.int64)
    for i in range(0, len(queries), chunk):
        out[i:i + chunk] = np.argmax(queries[i:i + chunk] @ table_unit.T, axis=1)
    return out


@dataclass(frozen=True)
class LinearInverter:
    """``predict(X) = (X - mean) @ weights + bias``; tokens by nearest candidate embedding."""

    mean: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    alpha: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) @ self.weights + self.bias

    def tokens(self, features: np.ndarray, candidate_ids: np.ndarray, candidate_emb: np.ndarray) -> np.ndarray:
        return candidate_ids[nearest_rows(self.predict(features), candidate_emb)]


class _RidgePath:
    """Ridge solutions for several strengths from one eigendecomposition of X'X."""

    def __init__(self, features: np.ndarray, targets: np.ndarray):
        self.mean = features.mean(0)
        self.bias = targets.mean(0)
        centred = features - self.mean
        gram = (centred.T @ centred).astype(np.float64)
        self.scale = float(np.trace(gram)) / max(gram.shape[0], 1)
        self.eigval, self.eigvec = np.linalg.eigh(gram)
        self.projected = self.eigvec.T @ (centred.T @ (targets - self.bias)).astype(np.float64)

    def solve(self, alpha: float) -> LinearInverter:
        lam = alpha * self.scale
        weights = self.eigvec @ (self.projected / (np.maximum(self.eigval, 0.0) + lam)[:, None])
        return LinearInverter(self.mean.astype(np.float32), weights.astype(np.float32),
                              self.bias.astype(np.float32), alpha)


def fit_inverter(features: np.ndarray, token_ids: np.ndarray, embeddings: np.ndarray,
                 candidate_ids: np.ndarray, groups: np.ndarray, alphas: Sequence[float] = ALPHAS,
                 holdout: float = 0.2, seed: int = 0) -> LinearInverter:
    """Fit on the attacker's data, choosing the ridge strength on a held-out share of its prompts.

    ``token_ids``: the true token at each feature row; ``embeddings``: the model's (public)
    input-embedding matrix; ``groups``: the prompt each row comes from (the hold-out split
    is by prompt, so neighbouring positions never sit on both sides).
    """
    targets = unit_rows(embeddings[token_ids].astype(np.float32))
    candidate_emb = embeddings[candidate_ids]
    prompts = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = rng.choice(prompts, size=max(1, int(len(prompts) * holdout)), replace=False)
    is_held = np.isin(groups, held)
    if len(alphas) > 1 and is_held.any() and (~is_held).any():
        path = _RidgePath(features[~is_held], targets[~is_held])
        scores = [np.mean(path.solve(a).tokens(features[is_held], candidate_ids, candidate_emb) == token_ids[is_held])
                  for a in alphas]
        best = float(alphas[int(np.argmax(scores))])  # first best: ties go to the weaker ridge
    else:
        best = float(alphas[0])
    return ridge(features, targets, best)


def ridge(features: np.ndarray, targets: np.ndarray, alpha: float) -> LinearInverter:
    """One ridge solution (a linear solve: cheaper than the eigendecomposition of the path)."""
    mean, bias = features.mean(0), targets.mean(0)
    centred = features - mean
    gram = (centred.T @ centred).astype(np.float64)
    lam = alpha * float(np.trace(gram)) / max(gram.shape[0], 1)
    weights = np.linalg.solve(gram + lam * np.eye(len(gram)), (centred.T @ (targets - bias)).astype(np.float64))
    return LinearInverter(mean.astype(np.float32), weights.astype(np.float32), bias.astype(np.float32), alpha)
