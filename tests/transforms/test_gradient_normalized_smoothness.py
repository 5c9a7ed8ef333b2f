"""Gradient-normalized smoothness (Algorithm 1) against a float64 numpy re-implementation of the official loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.transforms.gradient_normalized_smoothness import (
    gradient_normalized_smoothness,
    scale_by_gradient_normalized_smoothness,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(30, 4))
Y = (RNG.random(30) < 0.5).astype(np.float64)


def f64(w):
    z = X @ w
    return np.mean(np.logaddexp(0, z) - Y * z) + 0.05 * w @ w


def g64(w):
    return X.T @ (1 / (1 + np.exp(-X @ w)) - Y) / len(Y) + 0.1 * w


def h64(w):
    p = 1 / (1 + np.exp(-X @ w))
    return X.T @ (X * (p * (1 - p))[:, None]) / len(Y) + 0.1 * np.eye(len(w))


def reference(w, steps, gamma=1.0, gamma_min=1e-9, max_iter=40, eps=1e-8):
    """The official grad_norm_smooth loop (epfml/grad-norm-smooth src/methods.py; exact Hessian, Euclidean
    norm, warnings=False), float64: range(max_iter + 1) trials, the last one taken even if it fails."""
    ws, gammas = [], []
    for _ in range(steps):
        g = g64(w)
        gn = np.linalg.norm(g)
        for _ in range(max_iter + 1):
            lam = gn / (gamma + eps)
            delta = np.linalg.solve(h64(w) + lam * np.eye(len(w)), -g)
            if f64(w) - f64(w + delta) >= g64(w + delta) @ g64(w + delta) / (8 * lam):
                gamma = max(gamma * 2, gamma_min)
                break
            gamma *= 0.5
        w = w + delta
        ws.append(w.copy())
        gammas.append(gamma)
    return ws, gammas


def loss32(p):
    x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)
    z = x @ p["w"]
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.05 * p["w"] @ p["w"]


def _run(tx, steps, w0):
    params = {"w": jnp.asarray(w0, jnp.float32)}
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss32)(p), s, p, loss_fn=loss32))
    out = []
    for _ in range(steps):
        u, state = step(params, state)
        params = {"w": params["w"] + u["w"]}
        out.append(np.asarray(params["w"], np.float64))
    return out, state


@functools.lru_cache(maxsize=None)
def _dense(gamma_0):  # shared by the tests below (one compile per gamma_0)
    return _run(gradient_normalized_smoothness(1.0, gamma_0=gamma_0), 4, np.full(4, 2.0))


@pytest.mark.parametrize("gamma_0", [1.0, 1e-3, 50.0])  # accepted at once; grows; rejected first (backtracks)
def test_dense_matches_the_official_loop(gamma_0):
    w0 = np.full(4, 2.0)
    expected, gammas = reference(w0, 4, gamma=gamma_0)
    got, state = _dense(gamma_0)
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-5)
    assert float(state[0].gamma) == pytest.approx(gammas[-1], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, ref",
    [
        (dict(gamma_0=1e6, max_search=2), dict(gamma=1e6, max_iter=1)),  # exhausted: the last trial is taken
        (dict(gamma_0=1.0, gamma_min=10.0), dict(gamma=1.0, gamma_min=10.0)),  # the floor applies on acceptance
    ],
    ids=["exhausted", "gamma_min"],
)
def test_search_rules_of_the_official_loop(kwargs, ref):
    w0 = np.full(4, 2.0)
    expected, gammas = reference(w0, 2, **ref)
    got, state = _run(optax.chain(scale_by_gradient_normalized_smoothness(**kwargs), optax.scale_by_learning_rate(1.0)), 2, w0)
    assert np.abs(expected[0] - w0).max() > 1e-2  # a real step in both cases
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-5)
    assert float(state[0].gamma) == pytest.approx(gammas[-1], rel=1e-6)


@pytest.mark.parametrize("hessian,kwargs", [("lowrank", dict(rank=4)), ("hvp", dict(cg_iters=20))])
def test_exact_approximations_reduce_to_dense(hessian, kwargs):
    # full rank / CG to convergence represent the exact Hessian: the same iterates as "dense"
    w0 = np.full(4, 2.0)
    dense = _dense(1.0)[0][:3]
    approx, _ = _run(gradient_normalized_smoothness(1.0, hessian=hessian, **kwargs), 3, w0)
    for a, e in zip(approx, dense):
        np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-4)


def test_diagonal_is_exact_on_a_diagonal_hessian():
    # Hutchinson's z * Hz with Rademacher z is exactly diag(H) when H is diagonal
    d = jnp.asarray([1.0, 4.0, 0.5])

    def loss(p):
        return 0.5 * jnp.sum(d * p["w"] ** 2) + 0.25 * jnp.sum(p["w"] ** 4)

    params = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    outs = []
    for hessian in ("dense", "diagonal"):
        tx = scale_by_gradient_normalized_smoothness(hessian=hessian, num_samples=1)
        u, _ = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, loss_fn=loss))(params, tx.init(params))
        outs.append(np.asarray(u["w"]))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5)


def test_nonconvex_indefinite_hessian_is_regularized_not_nan():
    # f = x^4/4 - x^2/2 + y^2 at (0.1, 1): H has a negative eigenvalue; the search raises lambda
    def loss(p):
        x, y = p["w"][0], p["w"][1]
        return x**4 / 4 - x**2 / 2 + y**2

    params = {"w": jnp.asarray([0.1, 1.0])}
    tx = gradient_normalized_smoothness(1.0, gamma_0=100.0)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, loss_fn=loss))
    state = tx.init(params)
    for _ in range(30):
        u, state = step(params, state)
        params = {"w": params["w"] + u["w"]}
    np.testing.assert_allclose(np.abs(np.asarray(params["w"])), [1.0, 0.0], atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="hessian must be one of"):
        scale_by_gradient_normalized_smoothness(hessian="fisher")
    with pytest.raises(ValueError, match="gamma_0 must be > 0"):
        scale_by_gradient_normalized_smoothness(gamma_0=0.0)
    tx = scale_by_gradient_normalized_smoothness()
    p = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(p, tx.init(p), p)
