"""FELLRec's formulas vs a direct element-by-element computation (loops as the reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fellrec_flwr.config import FellRecSettings
from strategies import fellrec_math as fm


def ref_cos(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = math.sqrt(float(np.dot(x, x))), math.sqrt(float(np.dot(y, y)))
    if nx == 0 or ny == 0:
        return 0.0
    return float(np.dot(x.astype(np.float64), y.astype(np.float64))) / (nx * ny)


def ref_weights(vectors, losses, t, alpha, beta, T, heating, exponent, kernel="linear", tau=0.1):
    n = len(vectors)
    cos = [[1.0 if i == j else ref_cos(vectors[i], vectors[j]) for j in range(n)] for i in range(n)]
    if kernel == "linear":
        s = [[(cos[i][j] + 1) / 2 for j in range(n)] for i in range(n)]
    else:  # row-softmax of cos/tau, divided by its diagonal entry
        s = []
        for i in range(n):
            z = sum(math.exp(cos[i][k] / tau) for k in range(n))
            soft = [math.exp(cos[i][j] / tau) / z for j in range(n)]
            s.append([soft[j] / soft[i] for j in range(n)])
    m = max(losses)
    z = sum(math.exp((l - m) / T) for l in losses)
    p = [math.exp((l - m) / T) / z for l in losses]
    e = t + 1 / beta if exponent == "t+1/beta" else (t + 1) / beta
    w = [math.tanh(alpha / p_i**e) for p_i in p]
    W = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            W[i, j] = 1.0 if i == j else (w[i] if heating else 1.0) * s[i][j]
        W[i] /= W[i].sum()
    return np.array(s), np.array(p), np.array(w), W


def ref_aggregate(W, vectors):
    n, d = vectors.shape
    out = np.zeros((n, d))
    for i in range(n):
        for j in range(n):
            out[i] += W[i, j] * vectors[j].astype(np.float64)
    return out


@pytest.fixture
def vectors() -> np.ndarray:
    rng = np.random.default_rng(3)
    base = rng.standard_normal(40)
    return np.stack([base + 0.3 * rng.standard_normal(40), -base + rng.standard_normal(40),
                     base + rng.standard_normal(40), rng.standard_normal(40)]).astype(np.float32)


LOSSES = np.array([0.9, 1.0, 0.95, 1.2])


@pytest.mark.parametrize("heating", [True, False])
@pytest.mark.parametrize("exponent", ["t+1/beta", "(t+1)/beta"])
@pytest.mark.parametrize("kernel", ["linear", "softmax"])
@pytest.mark.parametrize("t,beta", [(0, 1.0), (2, 2.0)])
def test_dynamic_balance_matches_reference(vectors, heating, exponent, kernel, t, beta):
    s, p, w, W = ref_weights(vectors, LOSSES.tolist(), t, 0.7, beta, 0.05, heating, exponent, kernel, 0.2)
    settings = FellRecSettings(alpha=0.7, beta=beta, temperature=0.05, heating=heating, heating_exponent=exponent,
                               similarity_kernel=kernel, similarity_temperature=0.2)
    got = fm.dynamic_balance(vectors, LOSSES, t, settings)
    np.testing.assert_allclose(got.similarity, s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.loss_probs, p, rtol=1e-10)
    np.testing.assert_allclose(got.warm, w, rtol=1e-10)
    np.testing.assert_allclose(got.weights, W, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got.weights.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(fm.aggregate(got.weights, vectors), ref_aggregate(W, vectors), rtol=1e-5, atol=1e-5)


def test_linear_similarity_range_and_diagonal(vectors):
    s = fm.similarity_matrix(vectors, "linear", 0.1)
    assert np.allclose(np.diag(s), 1.0) and np.allclose(s, s.T)
    assert s.min() >= 0 and s.max() <= 1
    assert s[0, 2] > 0.6 and s[0, 1] < 0.4  # same direction vs opposite direction


def test_softmax_kernel_without_heating_is_row_softmax(vectors):
    tau = 0.3
    cos = np.array([[1.0 if i == j else ref_cos(vectors[i], vectors[j]) for j in range(4)] for i in range(4)])
    soft = np.exp(cos / tau) / np.exp(cos / tau).sum(axis=1, keepdims=True)
    W = fm.personalised_weights(fm.similarity_matrix(vectors, "softmax", tau), None, heating=False)
    np.testing.assert_allclose(W, soft, rtol=1e-6)


def test_updates_basis_uses_difference(vectors):
    ref = np.ones_like(vectors)
    np.testing.assert_allclose(fm.similarity_matrix(vectors, "linear", 0.1, reference=ref),
                               fm.similarity_matrix(vectors - ref, "linear", 0.1), rtol=1e-6)


def test_gram_blocks_give_the_same_result(vectors):
    np.testing.assert_allclose(fm.gram_matrix(vectors, block_columns=7), fm.gram_matrix(vectors), rtol=1e-6)


def test_heating_off_ignores_warm_weights(vectors):
    s = fm.similarity_matrix(vectors, "linear", 0.1)
    w = np.array([0.1, 0.5, 0.9, 1.0])
    off = fm.personalised_weights(s, w, heating=False)
    on = fm.personalised_weights(s, w, heating=True)
    assert np.allclose(off, fm.personalised_weights(s, None, heating=True))
    assert np.all(np.diag(on)[:3] > np.diag(off)[:3])  # w < 1 puts more weight on the client itself
    assert np.diag(on)[3] == pytest.approx(np.diag(off)[3])  # w = 1 changes nothing


def test_warm_weight_behaviour():
    p = fm.loss_softmax(np.array([0.50, 0.52, 0.55]), 0.05)
    w0 = fm.warm_weights(p, 0, 0.7, 1.0, "t+1/beta")
    assert np.all(np.diff(w0) < 0)  # higher loss -> smaller warm weight
    w5 = fm.warm_weights(p, 5, 0.7, 1.0, "t+1/beta")
    assert np.all(w5 >= w0) and w5.max() == pytest.approx(1.0)  # heating: w -> 1 as t grows
    # A client far below the others underflows p to 0: limit w = 1, no warning or NaN.
    p = fm.loss_softmax(np.array([0.0, 100.0]), 0.05)
    assert p[0] == 0.0
    np.testing.assert_allclose(fm.warm_weights(p, 0, 0.7, 1.0, "t+1/beta"), [1.0, math.tanh(0.7)], rtol=1e-12)


def test_loss_softmax_is_stable():
    p = fm.loss_softmax(np.array([1000.0, 1000.05]), 0.05)
    np.testing.assert_allclose(p, [1 / (1 + math.e), math.e / (1 + math.e)])


def test_single_client_keeps_its_upload():
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    b = fm.dynamic_balance(x, np.array([1.3]), 0, FellRecSettings())
    assert b.weights.tolist() == [[1.0]]
    assert np.array_equal(fm.aggregate(b.weights, x), x)


def test_zero_vector_is_orthogonal():
    x = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    s = fm.similarity_matrix(x, "linear", 0.1)
    assert s[0, 1] == 0.5 and s[1, 2] == 0.5 and s[1, 1] == 1.0 and s[0, 2] == 1.0


def test_aggregate_keeps_float32():
    x = np.ones((3, 5), dtype=np.float32)
    assert fm.aggregate(np.full((3, 3), 1 / 3), x).dtype == np.float32


@pytest.mark.parametrize(
    "call",
    [
        lambda: fm.similarity_matrix(np.ones(3), "linear", 0.1),
        lambda: fm.similarity_matrix(np.array([[np.nan, 1.0], [1.0, 1.0]]), "linear", 0.1),
        lambda: fm.similarity_matrix(np.ones((2, 2)), "cubic", 0.1),
        lambda: fm.loss_softmax(np.array([1.0, np.inf]), 0.05),
        lambda: fm.warm_weights(np.array([0.5, 0.5]), -1, 0.7, 1.0, "t+1/beta"),
        lambda: fm.warm_weights(np.array([0.5, 0.5]), 0, 0.7, 1.0, "t"),
        lambda: fm.warm_weights(np.array([0.5, 0.5]), 0, 0.7, 0, "t+1/beta"),
        lambda: fm.personalised_weights(np.ones((2, 3)), None, True),
        lambda: fm.personalised_weights(np.ones((2, 2)), np.ones(3), True),
        lambda: fm.aggregate(np.ones((2, 2)), np.ones((3, 4), dtype=np.float32)),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- delta-w similarity, normalised heating loss


def lora_modules(n: int = 4, shapes=((2, 5, 3), (3, 4, 6), (2, 7, 7)), seed: int = 11):
    """Hand-made LoRA modules: per module (A (n, r, k), B (n, d, r)) with shape triples (r, k, d)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, r, k)).astype(np.float32), rng.standard_normal((n, d, r)).astype(np.float32))
            for r, k, d in shapes]


def explicit_delta_w_cosine(pairs, extra=()) -> np.ndarray:
    """Form every dW_i = B_i @ A_i, concatenate over modules (plus extra tensors), cosine by loops."""
    n = pairs[0][0].shape[0]
    flat = [np.concatenate([(b[i].astype(np.float64) @ a[i].astype(np.float64)).ravel() for a, b in pairs]
                           + [np.asarray(x[i], dtype=np.float64).ravel() for x in extra]) for i in range(n)]
    return np.array([[1.0 if i == j else ref_cos(flat[i], flat[j]) for j in range(n)] for i in range(n)])


def test_delta_w_gram_trick_equals_explicit_product():
    pairs = lora_modules()
    np.testing.assert_allclose(fm.delta_w_cosine(pairs), explicit_delta_w_cosine(pairs), rtol=1e-5, atol=1e-6)
    # the inner products themselves, not only their cosines
    n = pairs[0][0].shape[0]
    direct = np.array([[sum(float(np.sum((b[i] @ a[i]).astype(np.float64) * (b[j] @ a[j]))) for a, b in pairs)
                        for j in range(n)] for i in range(n)])
    np.testing.assert_allclose(fm.delta_w_gram(pairs), direct, rtol=1e-5)


def test_delta_w_cosine_is_invariant_to_the_factorisation():
    pairs = lora_modules()
    rng = np.random.default_rng(5)
    # a different c for every client and module: (A, B) -> (cA, B/c) gives the same dW = B A
    rescaled = []
    for a, b in pairs:
        c = rng.uniform(0.1, 10.0, size=(a.shape[0], 1, 1)).astype(np.float32)
        rescaled.append((a * c, b / c))
    np.testing.assert_allclose(fm.delta_w_cosine(rescaled), fm.delta_w_cosine(pairs), rtol=1e-5, atol=1e-6)
    # ... while the paper's cosine of the raw parameters changes
    def raw(modules):
        return np.stack([np.concatenate([np.concatenate([a[i].ravel(), b[i].ravel()]) for a, b in modules])
                         for i in range(4)])

    assert not np.allclose(fm.cosine_matrix(raw(pairs)), fm.cosine_matrix(raw(rescaled)), atol=1e-3)


def test_delta_w_accepts_strided_views_and_extra_tensors():
    pairs = lora_modules()
    n = 4
    # the layout of a stacked (clients x parameters) matrix: A then B of each module, then a bias
    bias = np.random.default_rng(9).standard_normal((n, 3)).astype(np.float32)
    stacked = np.concatenate([np.concatenate([a.reshape(n, -1), b.reshape(n, -1)], axis=1) for a, b in pairs]
                             + [bias], axis=1)
    views, offset = [], 0
    for a, b in pairs:
        size_a, size_b = a[0].size, b[0].size
        views.append((stacked[:, offset:offset + size_a].reshape(a.shape),
                      stacked[:, offset + size_a:offset + size_a + size_b].reshape(b.shape)))
        offset += size_a + size_b
    assert not views[1][0].flags.c_contiguous  # really a strided view
    np.testing.assert_allclose(fm.delta_w_cosine(views, [stacked[:, offset:]]),
                               explicit_delta_w_cosine(pairs, [bias]), rtol=1e-5, atol=1e-6)


def test_delta_w_zero_b_is_orthogonal_to_everyone():
    pairs = lora_modules()
    for _, b in pairs:
        b[2] = 0.0  # client 2 has learned nothing yet (B starts at zero)
    cos = fm.delta_w_cosine(pairs)
    assert cos[2, 2] == 1.0 and np.all(cos[2, [0, 1, 3]] == 0.0) and np.all(cos[[0, 1, 3], 2] == 0.0)


def test_dynamic_balance_with_precomputed_cosine_equals_vector_route(vectors):
    cos = fm.cosine_matrix(vectors)
    settings = FellRecSettings(similarity_kernel="softmax", similarity_temperature=0.2)
    a = fm.dynamic_balance(vectors, LOSSES, 1, settings)
    b = fm.dynamic_balance(None, LOSSES, 1, settings, cosine=cos)
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-12)


def test_normalised_losses_judge_progress_not_level():
    first = np.array([2.0, 1.0, 1.0])
    now = np.array([1.0, 0.5, 0.9])  # client 0 is intrinsically harder but improved as much as client 1
    rel = fm.normalised_losses(now, first)
    np.testing.assert_allclose(rel, [0.5, 0.5, 0.9])
    w_raw = fm.warm_weights(fm.loss_softmax(now, 0.05), 1, 0.3, 1.0, "t+1/beta")
    w_rel = fm.warm_weights(fm.loss_softmax(rel, 0.05), 1, 0.3, 1.0, "t+1/beta")
    assert w_raw[0] < w_raw[1]  # raw: the hard client is damped more than the equally improving one
    assert w_rel[0] == pytest.approx(w_rel[1])  # normalised: the same progress, the same warm weight
    assert w_rel[2] < w_rel[1]  # the client that did not improve is the one held back


@pytest.mark.parametrize(
    "call",
    [
        lambda: fm.delta_w_gram([]),
        lambda: fm.delta_w_gram([(np.ones((2, 3, 4), np.float32), np.ones((2, 5, 2), np.float32))]),  # rank 3 vs 2
        lambda: fm.delta_w_gram([(np.ones((2, 3, 4), np.float32), np.ones((3, 5, 3), np.float32))]),  # clients
        lambda: fm.normalised_losses(np.ones(2), np.ones(3)),
        lambda: fm.normalised_losses(np.ones(2), np.array([1.0, 0.0])),
        lambda: fm.cosine_from_gram(np.ones((2, 3))),
    ],
)
def test_delta_w_and_normalised_bad_input(call):
    with pytest.raises(fm.FellRecMathError):
        call()
