"""GradNormLoRP against a float64 numpy reference of weight-normalized GaLore-Adam, plus errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import WeightNormParts, gradnorm_lorp, weight_normalized

RNG = np.random.default_rng(11)
PARAMS = {"w": jnp.asarray(RNG.standard_normal((8, 12)), jnp.float32),
          "t": jnp.asarray(RNG.standard_normal((10, 6)), jnp.float32),
          "b": jnp.asarray(RNG.standard_normal((12,)), jnp.float32)}
GRADS = [jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), PARAMS) for _ in range(5)]
ALL = {"w": True, "t": True, "b": False}
LR, WD, B1, B2, EPS, RANK, GAP, ALPHA = 0.05, 0.1, 0.9, 0.999, 1e-6, 2, 2, 0.5


def _canonical(u):
    rows = np.abs(u).argmax(axis=0)
    signs = np.sign(u[rows, np.arange(u.shape[1])])
    return u * np.where(signs == 0, 1, signs)


def _reference():
    """float64: W = m ⊙ V/‖V‖_c, ∇ re-expressed, GaLore-Adam on ∇_V (P from ∇_V's SVD every GAP steps), Adam on m."""
    w = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    V = {k: w[k].copy() for k in ("w", "t")}
    m = {k: np.linalg.norm(w[k], axis=0) for k in V}
    P, mom = {}, {k: [0.0, 0.0] for k in ("w", "t", "b", "mw", "mt")}

    def adam(key, g):
        a, b = mom[key]
        a, b = B1 * a + (1 - B1) * g, B2 * b + (1 - B2) * g**2
        mom[key] = [a, b]
        return a / (np.sqrt(b) + EPS)

    for step, g in enumerate(GRADS, start=1):
        bc = np.sqrt(1 - B2**step) / (1 - B1**step)
        g = {k: np.asarray(v, np.float64) for k, v in g.items()}
        for k in V:
            nu = np.linalg.norm(V[k], axis=0)
            unit = V[k] / nu
            grad_m = (unit * g[k]).sum(axis=0)
            grad_v = (m[k] / nu) * (g[k] - unit * grad_m)
            x = grad_v if k == "w" else grad_v.T  # the smaller side: w's 8 rows, t's 6 columns
            if (step - 1) % GAP == 0:
                P[k] = _canonical(np.linalg.svd(x, full_matrices=False)[0][:, :RANK])
            dv = -LR * bc * ALPHA * (P[k] @ adam(k, P[k].T @ x))
            V[k] = V[k] + (dv if k == "w" else dv.T)
            m[k] = m[k] - LR * (bc * adam("m" + k, grad_m) + WD * m[k])
            w[k] = m[k] * V[k] / np.linalg.norm(V[k], axis=0)
        w["b"] = w["b"] - LR * (bc * adam("b", g["b"]) + WD * w["b"])
    return w, m, {k: np.linalg.norm(V[k], axis=0) for k in V}


def test_matches_float64_reference():
    tx = gradnorm_lorp(LR, rank=RANK, update_proj_gap=GAP, scale=ALPHA, eps=EPS, weight_decay=WD, label_fn=ALL)
    state, params = tx.init(PARAMS), PARAMS
    step = jax.jit(tx.update)
    for g in GRADS:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    expected, mags, norms = _reference()
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=2e-5, atol=2e-5)
    # state: magnitude m and ‖V‖_c per matrix, laid out like the params; the low-rank moments are r × k
    for k in ["t", "w"]:
        np.testing.assert_allclose(np.asarray(state.magnitude[k]), mags[k], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state.direction_norm[k]), norms[k], rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(params[k]), axis=0), np.abs(mags[k]), rtol=1e-5)
    assert isinstance(state.magnitude["b"], optax.MaskedNode)  # b is not weight-normalized
    low = state.inner[0]
    assert isinstance(low.inner.mu, WeightNormParts)
    assert low.inner.mu.direction["w"].shape == (RANK, 12) and low.inner.mu.direction["t"].shape == (RANK, 10)
    assert low.inner.mu.magnitude["w"].shape == (12,) and low.inner.mu.direction["b"].shape == (12,)


def test_weight_normalized_with_sgd_is_exact_reparameterized_sgd():
    # one step of plain SGD on (V, m) from V = W, m = ‖W‖_c, mapped back to W = m V/‖V‖
    params = {"w": PARAMS["w"]}
    tx = weight_normalized(optax.sgd(0.1), label_fn={"w": True})
    updates, _ = tx.update({"w": GRADS[0]["w"]}, tx.init(params), params)
    w, g = np.asarray(params["w"], np.float64), np.asarray(GRADS[0]["w"], np.float64)
    m = np.linalg.norm(w, axis=0)
    unit = w / m
    grad_m = (unit * g).sum(axis=0)
    v = w - 0.1 * (g - unit * grad_m)  # m/‖V‖ = 1 at the start
    expected = (m - 0.1 * grad_m) * v / np.linalg.norm(v, axis=0)
    np.testing.assert_allclose(np.asarray(params["w"] + updates["w"]), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": GRADS[0]["w"]}, tx.init(params))


@pytest.mark.parametrize("kwargs, message", [
    ({"label_fn": {"w": True, "t": 7, "b": False}},
     r"the label function gives \['t'\] \(10, 6\) rank 7, larger than its smaller dimension 6"),
    ({"rank": 0}, "rank must be > 0, got 0"),
    ({"rank": -2}, "rank must be > 0, got -2"),
    ({"update_proj_gap": 0}, r"update_proj_gap \(the refresh period T\) must be an int > 0, got 0"),
    ({"label_fn": {"w": True, "t": True, "b": True}}, r"selected \['b'\] of shape \(12,\): only 2-D"),
    ({"projector": "qr"}, "projector must be a Projector or one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradnorm_lorp(1e-2, **{"rank": 2, "label_fn": ALL, **kwargs}).init(PARAMS)
