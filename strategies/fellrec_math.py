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

Options beyond the paper (defaults keep the paper's method):
- similarity basis "delta-w": the cosine of the LoRA products dW_i = B_i A_i instead of the
  raw (A, B) parameters. <dW_i, dW_j> summed over all LoRA modules is computed with the Gram
  trick <B_i A_i, B_j A_j>_F = sum_ab (B_i^T B_j)_ab (A_i A_j^T)_ab, never forming dW
  (:func:`delta_w_gram`). Unlike the raw parameters it is invariant to the factorisation
  (A, B) -> (cA, B/c), and B = 0 at initialisation means it sees only what was learned.
- heating loss "normalised": l_i / l_i^first, each client's loss divided by its own loss in
  the first round it trained (:func:`normalised_losses`), so a client whose data is
  intrinsically harder is judged by its progress, not damped forever for its level.

Edge cases, decided here once:
- A zero vector (e.g. a client whose update was zero) has no direction: its cosine with
  every other client is taken as 0 ("orthogonal", neither similar nor opposite), so the
  linear kernel gives it s = 0.5. Its own s_ii stays 1.
- N = 1: S = [[1]], W = [[1]], the client keeps its own upload.
- p_i can underflow to 0 for a client far below the others' losses; then alpha / p**e is
  infinite and w_i = tanh(inf) = 1, which is the limit of the formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

# The allowed values and the paper's defaults are the config's (fellrec.* keys), nowhere else.
from fellrec_flwr.config import HEATING_EXPONENTS, SIMILARITY_KERNELS, FellRecSettings

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
    d = vectors.shape[1]

    def blocks() -> Iterable[np.ndarray]:
        for start in range(0, d, block_columns):
            block = vectors[:, start : start + block_columns]
            if reference is not None:
                block = block - reference[:, start : start + block_columns]
            yield block

    return gram_of_blocks(blocks(), vectors.shape[0], blas_threads)


def gram_of_blocks(blocks: Iterable[np.ndarray], n: int, blas_threads: int | None = GRAM_BLAS_THREADS) -> np.ndarray:
    """G = V V^T (N, N) in float64 from the column blocks of V, each (N, cols), seen once.

    The streamed form of :func:`gram_matrix`: V = [B_1 | B_2 | ...] gives V V^T = sum_k B_k B_k^T,
    so the uploads never need to be one (N, D) matrix. Each block is multiplied in its own dtype
    (float32 BLAS for LoRA weights) and added into a float64 accumulator, which keeps the long
    dot products accurate.
    """
    gram = np.zeros((n, n), dtype=np.float64)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for block in blocks:
            if block.ndim != 2 or block.shape[0] != n:
                raise FellRecMathError(f"a column block has shape {block.shape}; expected ({n}, columns).")
            gram += block @ block.T  # numpy uses a symmetric rank-k update for A @ A.T
    return gram


def cosine_matrix(vectors: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Pairwise cosines (N, N) of the rows of vectors - reference; zero rows give 0 (see module doc)."""
    return cosine_from_gram(gram_matrix(vectors, reference))


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosines (N, N) from inner products G_ij; a zero row gives 0 (see module doc), cos_ii = 1."""
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise FellRecMathError(f"gram must be square (N, N), got shape {gram.shape}.")
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


LoraPair = tuple[np.ndarray, np.ndarray]  # (A (N, r, k), B (N, d, r)) of one LoRA module, all clients


def _check_pair(a: np.ndarray, b: np.ndarray, index: int) -> None:
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise FellRecMathError(
            f"LoRA module {index}: A has shape {a.shape} and B {b.shape}; expected A (N, r, k) and B (N, d, r) "
            "with the same clients N and rank r."
        )


def delta_w_gram(
    pairs: Iterable[LoraPair],
    extra: Iterable[np.ndarray] = (),
    blas_threads: int | None = GRAM_BLAS_THREADS,
) -> np.ndarray:
    """G_ij = sum over modules of <B_i A_i, B_j A_j>_F (+ <x_i, x_j> of `extra` tensors), float64 (N, N).

    Per module, with the rank-r factors of all N clients stacked as (N r, k) and (N r, d):
    AA = A A^T and BB = B^T B (two symmetric rank-k updates, (N r)^2 entries each), then
    G_ij += sum_ab AA[(i,a),(j,b)] * BB[(i,a),(j,b)]. Cost N^2 r^2 (k + d) per module
    instead of N^2 k d for the formed products. `pairs` may be strided views of the stacked
    uploads; each factor is copied once into a contiguous (N r, .) block. `extra` are
    (N, m) tensors outside any A/B pair (e.g. biases), added as plain inner products.
    """
    gram: np.ndarray | None = None
    n = 0
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for index, (a, b) in enumerate(pairs):  # may be a generator: one module in memory at a time
            _check_pair(a, b, index)
            if gram is None:
                n = a.shape[0]
                gram = np.zeros((n, n), dtype=np.float64)
            if a.shape[0] != n:
                raise FellRecMathError(f"LoRA module {index} has {a.shape[0]} clients, module 0 has {n}.")
            r = a.shape[1]
            a2 = np.ascontiguousarray(a).reshape(n * r, -1)
            bt = np.ascontiguousarray(b.transpose(0, 2, 1)).reshape(n * r, -1)
            aa = a2 @ a2.T  # numpy uses a symmetric rank-k update for X @ X.T
            bb = bt @ bt.T
            # sum over the r x r block of each client pair (einsum: ~7x faster than multiply + sum here)
            gram += np.einsum("iajb,iajb->ij", aa.reshape(n, r, n, r), bb.reshape(n, r, n, r))
        for x in extra:
            if gram is None:
                n = x.shape[0]
                gram = np.zeros((n, n), dtype=np.float64)
            x = np.ascontiguousarray(x).reshape(n, -1)
            gram += (x @ x.T).astype(np.float64)
    if gram is None:
        raise FellRecMathError("delta_w_gram needs at least one LoRA (A, B) pair.")
    return gram


def delta_w_cosine(pairs: Iterable[LoraPair], extra: Iterable[np.ndarray] = ()) -> np.ndarray:
    """Cosines (N, N) of the clients' LoRA products dW = B A (all modules together), see :func:`delta_w_gram`."""
    return cosine_from_gram(delta_w_gram(pairs, extra))


def normalised_losses(losses: np.ndarray, first_losses: np.ndarray) -> np.ndarray:
    """l_i / l_i^first: each client's loss relative to its own loss in its first training round.

    1.0 in a client's first round; < 1 once it improves. Used instead of the raw loss in the
    loss softmax so that the heating compares progress, not the intrinsic difficulty of data.
    """
    losses = np.asarray(losses, dtype=np.float64)
    first = np.asarray(first_losses, dtype=np.float64)
    if losses.shape != first.shape:
        raise FellRecMathError(f"{first.shape} first-round losses for {losses.shape} losses: one per client.")
    if not (np.all(np.isfinite(first)) and np.all(first > 0)):
        raise FellRecMathError(
            f"first-round losses must be finite and > 0 to normalise by them, got {first.tolist()}; "
            "use fellrec.heating-loss='raw' for a loss that can be 0."
        )
    return losses / first


def similarity_matrix(
    vectors: np.ndarray,
    kernel: str,
    temperature: float,
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
    return kernel_similarity(cosine_matrix(vectors, reference), kernel, temperature)


def kernel_similarity(cos: np.ndarray, kernel: str, temperature: float) -> np.ndarray:
    """S from a cosine matrix with the kernel of :func:`similarity_matrix`."""
    if kernel == "linear":
        return (cos + 1.0) / 2.0
    if kernel == "softmax":
        if temperature <= 0:
            raise FellRecMathError(f"temperature={temperature} must be > 0 for the softmax kernel.")
        # cos - 1 <= 0, so exp never overflows: this is the stable form of the softmax.
        return np.exp((cos - 1.0) / temperature)
    raise FellRecMathError(f"kernel={kernel!r} is not one of {', '.join(SIMILARITY_KERNELS)}.")


def loss_softmax(losses: np.ndarray, temperature: float) -> np.ndarray:
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


def heating_exponent(t: int, beta: float, exponent: str) -> float:
    """e = t + 1/beta (the authors' code) or (t + 1)/beta; t counts rounds from 0."""
    if t < 0:
        raise FellRecMathError(f"round t={t} must be >= 0 (rounds are counted from 0).")
    if beta <= 0:
        raise FellRecMathError(f"beta={beta} must be > 0 (the exponent uses 1/beta).")
    if exponent == "t+1/beta":
        return t + 1.0 / beta
    if exponent == "(t+1)/beta":
        return (t + 1.0) / beta
    raise FellRecMathError(f"exponent={exponent!r} is not one of {', '.join(HEATING_EXPONENTS)}.")


def warm_weights(p: np.ndarray, t: int, alpha: float, beta: float, exponent: str) -> np.ndarray:
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


def personalised_weights(similarity: np.ndarray, warm: np.ndarray | None, heating: bool) -> np.ndarray:
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
    vectors: np.ndarray | None,
    losses: np.ndarray,
    t: int,
    settings: FellRecSettings,
    *,
    reference: np.ndarray | None = None,
    cosine: np.ndarray | None = None,
) -> Balance:
    """Steps 1-4 of the module docstring with the ``fellrec.*`` settings (alpha, beta, T,
    heating and its exponent, kernel and its temperature); apply the result with :func:`aggregate`.

    reference: for the "updates" basis, what each client received (the similarity is then of
    vectors - reference). cosine: precomputed client cosines (e.g. :func:`delta_w_cosine`);
    then `vectors` and `reference` are not used and `vectors` may be None. Which of the two
    a basis needs is decided by the strategy (:func:`strategies.fellrec.round_balance`).
    """
    losses = np.asarray(losses, dtype=np.float64)
    n = cosine.shape[0] if cosine is not None else vectors.shape[0]
    if losses.shape != (n,):
        raise FellRecMathError(f"{losses.shape[0] if losses.ndim else 0} losses for {n} clients.")
    kernel, tau = settings.similarity_kernel, settings.similarity_temperature
    if cosine is None:
        s = similarity_matrix(vectors, kernel, tau, reference)
    else:
        s = kernel_similarity(np.asarray(cosine, dtype=np.float64), kernel, tau)
    p = loss_softmax(losses, settings.temperature)
    w = warm_weights(p, t, settings.alpha, settings.beta, settings.heating_exponent)
    return Balance(similarity=s, loss_probs=p, warm=w, weights=personalised_weights(s, w, settings.heating))
