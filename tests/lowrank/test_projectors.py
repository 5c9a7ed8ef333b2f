"""Projectors: each against its definition in float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.lowrank.projectors import (
    dct_matrix,
    dct_projector,
    dequantize_int4,
    get_projector,
    int4_projector,
    quantize_int4,
    random_projector,
    randomized_svd_projector,
    svd_projector,
)

RNG = np.random.default_rng(0)
G = RNG.standard_normal((24, 40)).astype(np.float32)


def test_dct_matrix_is_orthonormal_dct_ii():
    d = 12
    D = np.asarray(dct_matrix(d), np.float64)
    np.testing.assert_allclose(D.T @ D, np.eye(d), atol=1e-5)
    i, j = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    ref = np.sqrt(2 / d) * np.where(j == 0, np.sqrt(0.5), 1.0) * np.cos(np.pi * (2 * i + 1) * j / (2 * d))
    np.testing.assert_allclose(D, ref, atol=1e-6)


def _official_dct3(n):
    """The official ``dct3_matrix(n)`` (ista_daslab_optimizers/utils/dct.py), in float64: Q[a, b] =
    sqrt(2/n) cos(π a (2b + 1) / (2n)), row 0 times sqrt(1/2)."""
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    q = np.sqrt(2 / n) * np.cos(np.pi * a * (2 * b + 1) / (2 * n))
    q[0, :] *= np.sqrt(0.5)
    return q


@pytest.mark.parametrize("basis", ["dct3", "dct2", None], ids=["dct3", "dct2", "default"])
@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
def test_dct_projector_keeps_the_official_top_l1_columns(basis, tall):
    # the official FFTLowRankProjector.change_subspace: S = QᵀA (wide, rows ranked) or A Q (tall, columns ranked),
    # top r by the ℓ1 norm (ell_norm=1); Q = dct3_matrix (sim_type="matmul", the default) or its transpose
    # (sim_type="makhoul"). Our oriented G is A (wide) or Aᵀ (tall): d = 24 either way.
    p = dct_projector() if basis is None else dct_projector(basis)
    Q = _official_dct3(24) if basis in ("dct3", None) else _official_dct3(24).T
    A = G.astype(np.float64).T if tall else G.astype(np.float64)  # (40, 24) or (24, 40)
    S = A @ Q if tall else Q.T @ A
    scores = np.abs(S).sum(axis=0 if tall else 1)
    g = jnp.asarray(A.T if tall else A, jnp.float32)
    state = p.init(g, 5, None)
    want = np.argsort(-scores)[:5]
    assert np.asarray(state.indices).tolist() == want.tolist()  # sorted by decreasing score
    assert set(want.tolist()) != set(np.argsort(-np.linalg.norm(S, axis=0 if tall else 1))[:5].tolist())  # not ℓ2
    assert state.indices.dtype == jnp.int32  # only indices are stored
    P = Q[:, want]
    np.testing.assert_allclose(P.T @ P, np.eye(5), atol=1e-6)
    # low = Q[:, i]ᵀ A (wide) or (A Q[:, i])ᵀ (tall), back = P low
    np.testing.assert_allclose(np.asarray(p.project(state, g, 5)), P.T @ np.asarray(g, np.float64), rtol=1e-4, atol=1e-4)
    low = RNG.standard_normal((5, 40)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(p.project_back(state, jnp.asarray(low), 24)), P @ low, rtol=1e-4, atol=1e-4)


def test_dct_projector_names_a_bad_basis():
    with pytest.raises(ValueError, match="basis must be one of \\('dct3', 'dct2'\\), got 'dct4'"):
        dct_projector("dct4")


@pytest.mark.parametrize("make", [svd_projector, lambda: randomized_svd_projector(oversample=8, power_iterations=3)],
                         ids=["svd", "randomized_svd"])
def test_svd_projectors_span_the_top_singular_subspace(make):
    # a gradient with a clear spectral gap after rank 4
    u, _ = np.linalg.qr(RNG.standard_normal((24, 24)))
    v, _ = np.linalg.qr(RNG.standard_normal((40, 24)))
    s = np.array([10, 8, 6, 5] + [0.1] * 20)
    g = (u * s) @ v.T
    state = make().init(jnp.asarray(g, jnp.float32), 4, jax.random.PRNGKey(1))
    P = np.asarray(state.basis, np.float64)
    np.testing.assert_allclose(P.T @ P, np.eye(4), atol=1e-4)
    # the projector onto span(P) equals the projector onto the top-4 left singular vectors
    np.testing.assert_allclose(P @ P.T, u[:, :4] @ u[:, :4].T, atol=1e-3)


def test_svd_projector_fixes_singular_vector_signs():
    P = np.asarray(svd_projector().init(jnp.asarray(G), 6, None).basis)
    rows = np.abs(P).argmax(axis=0)
    assert (P[rows, np.arange(6)] > 0).all()


def test_random_projector_is_regenerated_from_its_key_and_unbiased():
    p = random_projector()
    state = p.init(jnp.asarray(G), 8, jax.random.PRNGKey(3))
    assert state.key.shape == (2,)  # the state is the key, not the matrix
    a = np.asarray(p.project(state, jnp.asarray(G), 8))
    b = np.asarray(p.project(state, jnp.asarray(G), 8))
    np.testing.assert_array_equal(a, b)
    # E[P Pᵀ] = I: average P Pᵀ over many keys
    d, r, n = 6, 4, 3000
    eye = jnp.eye(d)
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    mean = jax.vmap(lambda k: p.project_back(p.init(None, r, k), p.project(p.init(None, r, k), eye, r), d))(keys).mean(0)
    np.testing.assert_allclose(np.asarray(mean), np.eye(d), atol=0.08)


def _official_int4(x, group_size):
    """float64 replay of Q-GaLore's ``GaLoreProjector._quantize`` (n_bit = 4) and its dequantization
    ``scales * (q - zeros)``; a last group shorter than ``group_size`` keeps its own range."""
    flat, out = np.asarray(x, np.float64).reshape(-1), []
    for i in range(0, flat.size, group_size):
        w = flat[i:i + group_size]
        scale = max(w.max() - w.min(), 1e-5) / 15
        zero = np.clip(-np.round(w.min() / scale), 0, 15)
        q = np.clip(np.round(w / scale) + zero, 0, 15)
        out.append(scale * (q - zero))
    return np.concatenate(out).reshape(np.shape(x))


@pytest.mark.parametrize("shape", [(24, 5), (7, 3), (512, 2)])
def test_int4_matches_the_official_asymmetric_quantizer(shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    q = quantize_int4(jnp.asarray(x), 256)
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (-(-x.size // 2),) and q.zeros.dtype == jnp.uint8
    back = np.asarray(dequantize_int4(q, shape, 256))
    np.testing.assert_allclose(back, _official_int4(x, 256), rtol=1e-6, atol=1e-7)
    assert np.abs(back - x).max() > 0  # it is quantized
    np.testing.assert_array_equal(np.asarray(q.leading), x[:, 0])  # the first column, unquantized


def test_int4_official_quantizer_clips_a_group_that_does_not_straddle_zero():
    # all positive: the zero point clips to 0 and every value lands on the top code, min + 15 s = 1.0
    x = np.linspace(1.0, 2.0, 8, dtype=np.float32).reshape(4, 2)
    back = np.asarray(dequantize_int4(quantize_int4(jnp.asarray(x), 8), (4, 2), 8))
    np.testing.assert_allclose(back, _official_int4(x, 8), rtol=1e-6)
    np.testing.assert_allclose(back, 1.0, rtol=1e-6)


def test_int4_vector_major_groups_run_along_each_basis_vector():
    # the official Q-GaLore stores a tall matrix's basis as Vh[:r] (r × d) and quantizes that row by row
    p = int4_projector(svd_projector(), 8, vector_major=True)
    state = p.init(jnp.asarray(G), 4, None)
    exact = np.asarray(svd_projector().init(jnp.asarray(G), 4, None).basis)  # (24, 4)
    deq = np.asarray(p.project_back(state, jnp.eye(4), 24))
    np.testing.assert_allclose(deq, _official_int4(exact.T, 8).T, rtol=1e-5, atol=1e-6)
    assert not np.allclose(deq, _official_int4(exact, 8), atol=1e-4)  # not the row-major grid
    np.testing.assert_allclose(np.asarray(p.leading_vector(state, 24, 4)), exact[:, 0], rtol=1e-6)


@pytest.mark.parametrize("shape", [(24, 5), (7, 3), (512, 2)])
def test_int4_symmetric_round_trip_error_within_half_a_step(shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    q = quantize_int4(jnp.asarray(x), 256, symmetric=True)
    back = np.asarray(dequantize_int4(q, shape, 256))
    flat = np.pad(x.reshape(-1), (0, -x.size % 256)).reshape(-1, 256)
    step = np.abs(flat).max(axis=1) / 7
    bound = np.repeat(step / 2, 256)[: x.size].reshape(shape)
    assert (np.abs(back - x) <= bound + 1e-7).all()
    assert np.abs(back - x).max() > 0
    assert not np.allclose(back, _official_int4(x, 256))  # a different grid from the official one


def test_int4_projector_wraps_basis_projectors_only():
    p = int4_projector(svd_projector())
    state = p.init(jnp.asarray(G), 4, None)
    exact = np.asarray(svd_projector().init(jnp.asarray(G), 4, None).basis)
    deq = np.asarray(dequantize_int4(state, (24, 4)))
    np.testing.assert_allclose(np.asarray(p.project(state, jnp.asarray(G), 4)), deq.T @ G, rtol=1e-5, atol=1e-5)
    assert np.abs(deq - exact).max() <= np.abs(exact).max() / 14 + 1e-7
    with pytest.raises(ValueError, match="'dct' projector stores no basis"):
        int4_projector(dct_projector())
    assert get_projector("int4_svd").name == "int4_svd"
    assert get_projector("int4_sym_svd").name == "int4_sym_svd"
    with pytest.raises(ValueError, match="'qr'"):
        get_projector("qr")
