"""Stable-SPAM against a float64 numpy reference of the paper's equations, plus errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import stable_spam

RNG = np.random.default_rng(7)
PARAMS = {"w": jnp.asarray(RNG.standard_normal((4, 5)), jnp.float32), "b": jnp.asarray(RNG.standard_normal(5), jnp.float32)}
GRADS = [jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), PARAMS) for _ in range(8)]
GRADS[4] = jax.tree.map(lambda g: g.at[0].multiply(50.0), GRADS[4])  # a spike at step 5
LR, WD, B1, B2, EPS, G1, G2, THETA, DT = 0.05, 0.1, 0.9, 0.999, 1e-8, 0.7, 0.9, 0.999, 3


def _reference():
    p = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    st = {k: dict(mmax=0.0, mn=0.0, vn=0.0, m=0.0, v=0.0) for k in p}
    tau, clipped = 0, []
    for t, g in enumerate(GRADS, start=1):
        tau = 1 if t % DT == 0 else tau + 1
        for k in p:
            s, x = st[k], np.asarray(g[k], np.float64)
            gmax = np.abs(x).max()
            s["mmax"] = THETA * s["mmax"] + (1 - THETA) * gmax
            thr = s["mmax"] / (1 - THETA**t)
            mask = np.abs(x) > thr
            clipped.append(int(mask.sum()))
            x = np.where(mask, x / gmax * thr, x)
            n = np.linalg.norm(x)
            s["mn"] = G1 * s["mn"] + (1 - G1) * n
            s["vn"] = G2 * s["vn"] + (1 - G2) * n**2
            x = x / n * (s["mn"] / (1 - G1**t)) / (np.sqrt(s["vn"] / (1 - G2**t)) + EPS)
            if t % DT == 0:
                s["m"], s["v"] = 0.0, 0.0
            s["m"] = B1 * s["m"] + (1 - B1) * x
            s["v"] = B2 * s["v"] + (1 - B2) * x**2
            u = (s["m"] / (1 - B1**tau)) / (np.sqrt(s["v"] / (1 - B2**tau)) + EPS)
            p[k] = p[k] - LR * (u + WD * p[k])
    return p, tau, clipped


def test_matches_float64_reference():
    tx = stable_spam(LR, b1=B1, b2=B2, eps=EPS, gamma1=G1, gamma2=G2, theta=THETA, reset_interval=DT, weight_decay=WD)
    state, params = tx.init(PARAMS), PARAMS
    step = jax.jit(tx.update)
    for g in GRADS:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    expected, tau, clipped = _reference()
    assert sum(clipped) > 0  # the spike (and the first steps) were clipped
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-5, atol=1e-5)
    spam = state[0]
    assert int(spam.count) == 8 and int(spam.adam_count) == tau == 3  # reset at t = 6, then 7, 8


@pytest.mark.parametrize("kwargs, message", [
    ({"reset_interval": 0}, r"reset_interval \(the momentum-reset period ΔT\) must be an int > 0 or None, got 0"),
    ({"reset_interval": -10}, r"reset_interval \(the momentum-reset period ΔT\) must be an int > 0 or None, got -10"),
    ({"gamma1": 1.0}, r"gamma1 must be in \[0, 1\), got 1.0"),
    ({"gamma2": -0.1}, r"gamma2 must be in \[0, 1\), got -0.1"),
    ({"theta": 1.5}, r"theta must be in \[0, 1\), got 1.5"),
    ({"eps": -1.0}, "eps must be >= 0, got -1.0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stable_spam(1e-3, **kwargs)
