"""DADAO: a float64 numpy replay of a fixed event sequence (written from the official code's update rules with
dense (e_i - e_j)(e_i - e_j)^T gossip matrices and scipy's expm) against the JAX scan; convergence on a strongly
convex distributed least squares; graph constants and events; bad arguments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxopt_lab.distributed.dadao import dadao_constants, dadao_events, graph_constants, graph_edges, run_dadao


def problem(n=6, d=3, m=8, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(n, m, d))
    b = rng.normal(size=(n, m))
    H = sum(2 / m * D[i].T @ D[i] for i in range(n))
    x_star = np.linalg.solve(H, sum(2 / m * D[i].T @ b[i] for i in range(n)))
    eigs = [np.linalg.eigvalsh(2 / m * D[i].T @ D[i]) for i in range(n)]
    mu, L = min(e[0] for e in eigs), max(e[-1] for e in eigs)
    return D, b, x_star, mu, L


def reference(D, b, x0, events, mu, L, chi_1_star):
    n, m, _ = D.shape
    c = dadao_constants(mu, L, chi_1_star)
    X = [x0.astype(np.float64).copy()] + [np.zeros_like(x0, dtype=np.float64) for _ in range(5)]
    t_last = np.zeros(n)

    def ode(k, t):
        P = np.stack([v[k] for v in X])
        P = scipy.linalg.expm(c["ode_matrix"] * (t - t_last[k])) @ P
        for v, row in zip(X, P):
            v[k] = row

    errs = []
    for t, g, i, j in zip(*events):
        if g:
            ode(i, t)
            grad = 2 / m * D[i].T @ (D[i] @ X[0][i] - b[i])
            r = grad - c["nu"] * X[0][i] - X[3][i]
            X[0][i] -= c["gamma"] * r
            X[1][i] -= c["gamma_tilde"] * r
            X[3][i] += (c["delta"] + c["delta_tilde"]) * r
            t_last[i] = t
        else:
            ode(i, t)
            ode(j, t)
            pi = np.zeros((n, n))
            pi[i, i] = pi[j, j] = 1
            pi[i, j] = pi[j, i] = -1
            proj = pi @ (X[2] + X[4])
            for k in (i, j):
                X[4][k] -= c["beta"] * proj[k]
                X[5][k] -= c["beta_tilde"] * proj[k]
            t_last[i] = t_last[j] = t
        errs.append(np.mean(np.sum((X[0] - XSTAR) ** 2, axis=1)))
    return X, np.array(errs)


XSTAR = None


def jax_grad_fn(D, b):
    Dj, bj = jnp.asarray(D, jnp.float32), jnp.asarray(b, jnp.float32)
    m = D.shape[1]
    return lambda i, x: 2 / m * Dj[i].T @ (Dj[i] @ x - bj[i])


def test_replay_matches_float64_reference():
    global XSTAR
    n = 6
    D, b, XSTAR, mu, L = problem(n)
    edges = graph_edges("ring", n)
    chi_1, chi_2, lamb_mix = graph_constants(n, edges)
    events = dadao_events(n, edges, t_max=12.0, seed=3)
    assert events.is_grad.any() and (~events.is_grad).any()
    x0 = np.random.default_rng(1).normal(size=(n, 3))
    ref, ref_err = reference(D, b, x0, events, mu, L, chi_1 / lamb_mix)
    state, err = jax.jit(lambda x: run_dadao(jax_grad_fn(D, b), x, events, mu, L, chi_1 / lamb_mix, XSTAR))(
        jnp.asarray(x0, jnp.float32))
    for got, want in zip(state[:6], ref):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(err), ref_err, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.t_last).max(), events.times.max(), rtol=1e-6)


def test_converges_on_least_squares_and_graph_constants():
    n = 8
    D, b, x_star, mu, L = problem(n, d=3, m=10, seed=2)
    edges = graph_edges("ring", n)
    assert set(edges) == {(i, i + 1) for i in range(n - 1)} | {(0, n - 1)}
    chi_1, chi_2, lamb_mix = graph_constants(n, edges)
    # ring of n nodes: lambda_2 of the Laplacian is 2 - 2 cos(2 pi / n), scaled by 1/|E| = 1/n
    assert chi_1 == pytest.approx(n / (2 - 2 * math.cos(2 * math.pi / n)), rel=1e-9)
    assert lamb_mix == pytest.approx(math.sqrt(2 * chi_1 * chi_2), rel=1e-12)
    events = dadao_events(n, edges, t_max=400.0, seed=0)
    x0 = np.zeros((n, 3), np.float32)
    _, err = jax.jit(lambda x: run_dadao(jax_grad_fn(D, b), x, events, mu, L, chi_1 / lamb_mix, x_star))(x0)
    err = np.asarray(err)
    e0 = float(np.sum(x_star**2))
    assert err[-1] < 1e-3 * e0, (err[-1], e0)


def test_events_and_bad_arguments():
    edges = graph_edges("torus2d", 9)
    ev = dadao_events(9, edges, t_max=50.0, lamb_grad=9.0, lamb_mix=3.0, seed=1)
    assert np.all(np.diff(ev.times) > 0) and ev.times[-1] < 50
    frac = ev.is_grad.mean()
    assert abs(frac - 0.75) < 0.05
    assert np.all(ev.j[ev.is_grad] == -1)
    assert all((a, b) in set(edges) for a, b in zip(ev.i[~ev.is_grad], ev.j[~ev.is_grad]))
    with pytest.raises(ValueError, match="mu"):
        dadao_constants(2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="t_max"):
        dadao_events(4, [(0, 1)], t_max=0.0)
    with pytest.raises(ValueError, match="not connected"):
        graph_constants(4, [(0, 1), (2, 3)])
