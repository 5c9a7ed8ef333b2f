"""Hessian diagnostics against the dense Hessian of a ~50-parameter flax nnx MLP.

The dense reference is ``jax.hessian`` of the loss on the flattened parameters
(``ravel_pytree``), in float32, symmetrized and analysed in float64 numpy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxopt_lab.diagnostics import (
    directional_sharpness,
    edge_of_stability,
    hutchinson_trace,
    hvp,
    top_eigenvalue,
)

NUM_PROBES = 2000
LEARNING_RATE = 0.05


class TinyMLP(nnx.Module):
    """4 -> 6 (tanh) -> 3: 24 + 6 + 18 + 3 = 51 parameters."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


@pytest.fixture(scope="module")
def mlp():
    """The dense reference and every diagnostic, computed in one compiled program."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=16))
    graphdef, params = nnx.split(TinyMLP(nnx.Rngs(0)), nnx.Param)
    # bigger weights than the default init give a clearly indefinite Hessian
    params = jax.tree.map(lambda p: 2.0 * p + 0.1, params)
    flat, unravel = ravel_pytree(params)
    assert flat.size == 51
    v = unravel(jnp.asarray(rng.normal(size=flat.size), jnp.float32))

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def run(params, v, key):
        keys = jax.random.split(key, 3)
        grads = jax.grad(loss_fn)(params)
        out = {
            "hessian": jax.hessian(lambda f: loss_fn(unravel(f)))(ravel_pytree(params)[0]),
            "grads": grads,
            "hvp": hvp(loss_fn, params, v),
            "trace": hutchinson_trace(loss_fn, params, keys[0], NUM_PROBES),
            "sharpness": directional_sharpness(loss_fn, params, grads),
        }
        for method, num_iters, k in (("power", 300, keys[1]), ("lanczos", 20, keys[2])):
            out[method] = top_eigenvalue(loss_fn, params, k, num_iters, method, return_eigenvector=True)
        return out

    out = jax.device_get(run(params, v, jax.random.key(0)))
    hess = np.asarray(out["hessian"], np.float64)
    hess = (hess + hess.T) / 2
    return {
        "out": out,
        "params": params,
        "v": v,
        "H": hess,
        "eigvals": np.linalg.eigvalsh(hess),
        "g": flat64(out["grads"]),
    }


def flat64(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def test_reference_hessian_is_indefinite(mlp):
    ev = mlp["eigvals"]
    assert ev[0] < -0.05 and ev[-1] > 0.1  # so "largest algebraic" is a real question


def test_hvp_matches_dense_hessian(mlp):
    hv = mlp["out"]["hvp"]
    assert jax.tree.structure(hv) == jax.tree.structure(mlp["params"])
    expected = mlp["H"] @ flat64(mlp["v"])
    np.testing.assert_allclose(flat64(hv), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_hutchinson_trace_within_statistical_tolerance(mlp):
    H = mlp["H"]
    # Var of one Rademacher probe: 2 (||H||_F^2 - sum H_ii^2)
    std_err = math.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / NUM_PROBES)
    assert abs(float(mlp["out"]["trace"]) - np.trace(H)) < 5 * std_err
    assert std_err < 0.2 * abs(np.trace(H))  # the tolerance is informative


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_top_eigenvalue_matches_eigvalsh(mlp, method):
    lam, vec = mlp["out"][method]
    np.testing.assert_allclose(float(lam), mlp["eigvals"][-1], rtol=1e-3)
    v = flat64(vec)
    assert abs(np.linalg.norm(v) - 1) < 1e-4
    u = np.linalg.eigh(mlp["H"])[1][:, -1]
    assert abs(v @ u) > 0.99


def test_directional_sharpness(mlp):
    g, H = mlp["g"], mlp["H"]
    np.testing.assert_allclose(float(mlp["out"]["sharpness"]), g @ H @ g / (g @ g), rtol=1e-4)


@pytest.fixture(scope="module")
def quadratic():
    """L = 1/2 t'At + c't on a pytree of 8 numbers; A has repeated eigenvalues and
    its largest-magnitude eigenvalue (-5) is not its largest (3)."""
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    A = jnp.asarray(q @ np.diag([-5.0, -5, -5, 3, 3, 3, 1, 0.5]) @ q.T, jnp.float32)
    D = jnp.asarray(np.diag([1.0, -2, 3, 0.5, 4, -1, 2, 7]), jnp.float32)
    c = jnp.asarray(rng.normal(size=8), jnp.float32)
    params = {"a": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
    _, unravel = ravel_pytree(params)

    def flat(p):
        return ravel_pytree(p)[0]

    def loss_a(p):
        t = flat(p)
        return 0.5 * t @ A @ t + c @ t

    def loss_d(p):
        t = flat(p)
        return 0.5 * t @ D @ t

    @jax.jit
    def run(p, key):
        zeros = jax.tree.map(jnp.zeros_like, p)
        return {
            "power": top_eigenvalue(loss_a, p, key, num_iters=100, method="power"),
            # Lanczos (the default method) through the edge-of-stability wrapper; 12 > 8 is capped
            "eos": edge_of_stability(loss_a, p, LEARNING_RATE, key, num_iters=12),
            "trace_one_probe": hutchinson_trace(loss_d, p, key, 1),
            "sharpness_zero_grad": directional_sharpness(loss_a, p, zeros),
        }

    return jax.device_get(run(params, jax.random.key(5))), params, loss_a


def test_largest_algebraic_not_largest_magnitude(quadratic):
    out, _, _ = quadratic
    np.testing.assert_allclose(out["power"], 3.0, rtol=1e-4)  # plain power iteration gives -5
    # Lanczos: the Krylov space is invariant after 4 steps (4 distinct eigenvalues) and restarts
    np.testing.assert_allclose(out["eos"]["sharpness"], 3.0, rtol=1e-4)


def test_edge_of_stability_threshold_and_ratio(quadratic):
    eos = quadratic[0]["eos"]
    np.testing.assert_allclose(eos["threshold"], 2 / LEARNING_RATE, rtol=1e-6)
    np.testing.assert_allclose(eos["ratio"], 3.0 * LEARNING_RATE / 2, rtol=1e-4)


def test_rademacher_probes_are_exact_on_diagonal_hessians(quadratic):
    out, _, _ = quadratic
    np.testing.assert_allclose(out["trace_one_probe"], 1 - 2 + 3 + 0.5 + 4 - 1 + 2 + 7, rtol=1e-6)
    assert out["sharpness_zero_grad"] == 0.0


def test_bad_arguments(quadratic):
    _, params, loss = quadratic
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_samples.*0"):
        hutchinson_trace(loss, params, key, 0)
    with pytest.raises(ValueError, match="num_samples.*2.5"):
        hutchinson_trace(loss, params, key, 2.5)
    with pytest.raises(ValueError, match="'newton'"):
        top_eigenvalue(loss, params, key, method="newton")
    with pytest.raises(ValueError, match="num_iters.*0"):
        top_eigenvalue(loss, params, key, num_iters=0)
    with pytest.raises(ValueError, match="learning_rate.*-0.1"):
        edge_of_stability(loss, params, -0.1, key)
    with pytest.raises(ValueError, match="structure"):
        hvp(loss, params, {"a": params["a"]})
    with pytest.raises(ValueError, match=r"\(3,\)"):
        directional_sharpness(loss, params, {"a": params["a"], "b": jnp.zeros(3)})
