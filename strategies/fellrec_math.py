"""FELLRec's dynamic balance as plain numpy (no Flower, no I/O).

The formulas follow ../shared/notes/fellrec-method.md section 3. With N clients, their
flattened LoRA vectors X (N, D), their mean training losses l (N,) and round t = 0, 1, ...:

1. similarity   s_ij = (cos(x_i, x_j) + 1) / 2            (linear kernel, s_ii = 1)
2. loss softmax p = softmax(l / T)
3. warm weight  w_i = tanh(alpha / p_i ** e),  e = t + 1/beta   or   e = (t + 1) / beta
4. weights      W_ii = 1, W_ij = w_i * s_ij (j != i), each row divided by its sum
5. aggregate    theta_i = sum_j W_ij x_j, i.e. W @ X

Everything is a matrix product: the cosines come from one Gram matrix X X^T, accumulated
over column blocks so that a basis of *updates* (X - reference) never needs an (N, D) copy.

Edge cases, decided here once:
- A zero vector (e.g. a client whose update was zero) has no direction: its cosine with
  every other client is taken as 0 ("orthogonal", neither similar nor opposite), so the
  linear kernel gives it s = 0.5. Its own s_ii stays 1.
- N = 1: S = [[1]], W = [[1]], the client keeps its own upload.
- p_i can underflow to 0 for a client far below the others' losses; then alpha / p**e is
  infinite and w_i = tanh(inf) = 1, which is the limit of the formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

KERNELS = ("linear", "softmax")
EXPONENTS = ("t+1/beta", "(t+1)/beta")

# Columns per Gram block: 2**16 float32 columns x 200 clients = 50 MB per temporary
# (only materialised for the "updates" basis); large enough for BLAS to run at full speed.
GRAM_BLOCK_COLUMNS = 1 << 16

# BLAS threads for the Gram matrix. Measured on the 2-core dev machine while other jobs ran
# (load ~7): multi-threaded OpenBLAS took 12-20 s for the Gram of 50 x 4.2M float32, one
# thread 0.27 s (its threads spin-wait for each other when the cores are busy). The server
# shares its machine with ClientApps in simulation, so one thread is the safe default.
GRAM_BLAS_THREADS = 1


class FellRecMathError(ValueError):
    """Input to the FELLRec formulas has the wrong shape or non-finite values."""


def _check_matrix(vectors: np.ndarray, name: str = "vectors") -> None:
    if vectors.ndim != 2:
        raise FellRecMathError(f"{name} must be a 2-D array (clients x parameters), got shape {vectors.shape}.")
    if vectors.shape[0] < 1:
        raise FellRecMathError(f"{name} has no rows: at least one client is needed.")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise FellRecMathError(f"{name} must be a floating-point array, got {vectors.dtype}.")


def gram_matrix(
    vectors: np.ndarray,
    reference: np.ndarray | None = None,
    block_columns: int = GRAM_BLOCK_COLUMNS,
    blas_threads: int | None = GRAM_BLAS_THREADS,
) -> np.ndarray:
    """G = V V^T in float64, with V = vectors - reference (or vectors).

    Each column block is multiplied in the input dtype (float32 BLAS for LoRA weights) and
    added into a float64 accumulator, which keeps the long dot products accurate without
    a float64 copy of the whole matrix. blas_threads=None leaves BLAS at its default.
    """
    _check_matrix(vectors)
    if reference is not None and reference.shape != vectors.shape:
        raise FellRecMathError(
            f"reference shape {reference.shape} differs from vectors shape {vectors.shape}; "
            "pass the arrays each client received, flattened in the same layout."
        )
    n, d = vectors.shape
    gram = np.zeros((n, n), dtype=np.float64)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for start in range(0, d, block_columns):
            block = vectors[:, start : start + block_columns]
            if reference is not None:
                block = block - reference[:, start : start + block_columns]
            gram += block @ block.T  # numpy uses a symmetric rank-k update for A @ A.T
    return gram


def cosine_matrix(vectors: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Pairwise cosines (N, N) of the rows of vectors - reference; zero rows give 0 (see module doc)."""
    gram = gram_matrix(vectors, reference)
    sq_norms = np.diag(gram).copy()
    if not np.all(np.isfinite(sq_norms)):
        bad = np.flatnonzero(~np.isfinite(sq_norms)).tolist()
        raise FellRecMathError(f"client rows {bad} contain NaN or infinite values; check those clients' training.")
    norms = np.sqrt(sq_norms)
    nonzero = norms > 0
    inv = np.zeros_like(norms)
    inv[nonzero] = 1.0 / norms[nonzero]
    cos = gram * inv[:, None] * inv[None, :]
    np.clip(cos, -1.0, 1.0, out=cos)
    np.fill_diagonal(cos, 1.0)
    return cos


def similarity_matrix(
    vectors: np.ndarray,
    kernel: str = "linear",
    temperature: float = 0.1,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """Client-to-client similarity S (N, N) with S_ii = 1.

    kernel="linear": s_ij = (cos_ij + 1) / 2 (the paper's "attention" is this linear map).
    kernel="softmax": the row-softmax of cos / temperature, rescaled so that the diagonal
    is 1: s_ij = exp((cos_ij - 1) / temperature). The rescaling keeps both kernels on the
    same footing in :func:`personalised_weights` (W_ii = 1); with heating off the final
    weights are then exactly the row-softmax of cos / temperature.
    reference: if given, the similarity of the updates (vectors - reference).
    """
    cos = cosine_matrix(vectors, reference)
    if kernel == "linear":
        return (cos + 1.0) / 2.0
    if kernel == "softmax":
        if temperature <= 0:
            raise FellRecMathError(f"temperature={temperature} must be > 0 for the softmax kernel.")
        # cos - 1 <= 0, so exp never overflows: this is the stable form of the softmax.
        return np.exp((cos - 1.0) / temperature)
    raise FellRecMathError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}.")


def loss_softmax(losses: np.ndarray, temperature: float = 0.05) -> np.ndarray:
    """p = softmax(losses / temperature), computed stably (shifted by the maximum)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size == 0:
        raise FellRecMathError(f"losses must be a non-empty 1-D array, got shape {losses.shape}.")
    if not np.all(np.isfinite(losses)):
        raise FellRecMathError(f"losses contain NaN or infinite values: {losses.tolist()}.")
    if temperature <= 0:
        raise FellRecMathError(f"loss temperature T={temperature} must be > 0.")
    z = losses / temperature
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


def heating_exponent(t: int, beta: float, exponent: str = "t+1/beta") -> float:
    """e = t + 1/beta (the authors' code) or (t + 1)/beta; t counts rounds from 0."""
    if t < 0:
        raise FellRecMathError(f"round t={t} must be >= 0 (rounds are counted from 0).")
    if beta <= 0:
        raise FellRecMathError(f"beta={beta} must be > 0 (the exponent uses 1/beta).")
    if exponent == "t+1/beta":
        return t + 1.0 / beta
    if exponent == "(t+1)/beta":
        return (t + 1.0) / beta
    raise FellRecMathError(f"exponent={exponent!r} is not one of {', '.join(EXPONENTS)}.")


def warm_weights(
    p: np.ndarray,
    t: int,
    alpha: float = 0.7,
    beta: float = 1.0,
    exponent: str = "t+1/beta",
) -> np.ndarray:
    """Curriculum-heating weights w_i = tanh(alpha / p_i ** e), in (0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    if np.any(p < 0) or np.any(p > 1) or not np.all(np.isfinite(p)):
        raise FellRecMathError(f"p must be probabilities in [0, 1], got {p.tolist()}.")
    if alpha <= 0:
        raise FellRecMathError(f"alpha={alpha} must be > 0.")
    e = heating_exponent(t, beta, exponent)
    # In log space: alpha / p**e = exp(log(alpha) - e log p); p = 0 gives inf and w = 1.
    with np.errstate(divide="ignore", over="ignore"):
        ratio = np.exp(np.log(alpha) - e * np.log(p))
    return np.tanh(ratio)


def personalised_weights(similarity: np.ndarray, warm: np.ndarray | None = None, heating: bool = True) -> np.ndarray:
    """Row-normalised aggregation weights W (N, N): W_ii = 1, W_ij = w_i * s_ij for j != i.

    With heating off (or warm=None) w_i = 1, i.e. W is the row-normalised similarity.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise FellRecMathError(f"similarity must be square (N, N), got shape {s.shape}.")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise FellRecMathError("similarity must be finite and non-negative.")
    n = s.shape[0]
    if heating and warm is not None:
        w = np.asarray(warm, dtype=np.float64)
        if w.shape != (n,):
            raise FellRecMathError(f"warm weights have shape {w.shape}; expected ({n},), one per client.")
        weights = s * w[:, None]
    else:
        weights = s.copy()
    np.fill_diagonal(weights, 1.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights


def aggregate(weights: np.ndarray, stacked: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Personalised aggregates W @ X (N, D), in the dtype of X (float32 stays float32)."""
    _check_matrix(stacked, "stacked")
    n = stacked.shape[0]
    if weights.shape != (n, n):
        raise FellRecMathError(f"weights shape {weights.shape} does not match {n} stacked clients.")
    return np.matmul(weights.astype(stacked.dtype, copy=False), stacked, out=out)


@dataclass(frozen=True)
class Balance:
    """Everything one FELLRec round computes, for logging and tests."""

    similarity: np.ndarray  # S (N, N)
    loss_probs: np.ndarray  # p (N,)
    warm: np.ndarray  # w (N,); computed even when heating is off (for logging / lr-scale)
    weights: np.ndarray  # W (N, N), rows sum to 1


def dynamic_balance(
    vectors: np.ndarray,
    losses: np.ndarray,
    t: int,
    *,
    alpha: float = 0.7,
    beta: float = 1.0,
    temperature: float = 0.05,
    heating: bool = True,
    exponent: str = "t+1/beta",
    kernel: str = "linear",
    similarity_temperature: float = 0.1,
    reference: np.ndarray | None = None,
) -> Balance:
    """Steps 1-4 of the module docstring; apply the result with :func:`aggregate`."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != (vectors.shape[0],):
        raise FellRecMathError(f"{losses.shape[0] if losses.ndim else 0} losses for {vectors.shape[0]} clients.")
    s = similarity_matrix(vectors, kernel, similarity_temperature, reference)
    p = loss_softmax(losses, temperature)
    w = warm_weights(p, t, alpha, beta, exponent)
    return Balance(similarity=s, loss_probs=p, warm=w, weights=personalised_weights(s, w, heating))
