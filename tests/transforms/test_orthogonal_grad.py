"""⊥Grad against a float64 numpy version of the paper's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_lab


def numpy_orthogonal_grad(g, w, eps=1e-30):
    g, w = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
    g_perp = g - (w @ g) / (w @ w + eps) * w
    return g_perp * np.linalg.norm(g) / (np.linalg.norm(g_perp) + eps)


def test_matches_numpy_reference_and_is_orthogonal():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    tx = jaxopt_lab.orthogonal_grad()
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for k in params:
        expected = numpy_orthogonal_grad(grads[k], params[k]).reshape(params[k].shape)
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)
        assert abs(float(jnp.vdot(out[k], params[k]))) < 1e-4  # no radial component left
        assert float(jnp.linalg.norm(out[k])) == pytest.approx(float(np.linalg.norm(grads[k])), rel=1e-5)


def test_keeps_dtype_and_handles_zero_weights():
    params = {"w": jnp.zeros((4,), jnp.bfloat16)}
    grads = {"w": jnp.ones((4,), jnp.bfloat16)}
    tx = jaxopt_lab.orthogonal_grad()
    out, _ = tx.update(grads, tx.init(params), params)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), np.ones(4))  # nothing to remove


def test_chains_before_an_optimizer_and_needs_params():
    tx = optax.chain(jaxopt_lab.orthogonal_grad(), optax.sgd(0.1))
    params = {"w": jnp.array([1.0, 0.0])}
    updates, _ = tx.update({"w": jnp.array([2.0, 1.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [0.0, -0.1 * np.sqrt(5.0)], atol=1e-7)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.array([2.0, 1.0])}, tx.init(params))
    for bad in (-1, 0, True, None):  # 0 would divide by zero at a zero-initialised bias
        with pytest.raises(ValueError, match=f"eps must be a number > 0 .*got {bad!r}"):
            jaxopt_lab.orthogonal_grad(eps=bad)
