"""StableMax against a float64 numpy version of the paper's definition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.losses import log_stable_max, stable_max, stable_max_cross_entropy


def np_s(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, x + 1, 1 / (1 - np.minimum(x, 0)))


def np_stable_max(x, axis=-1):
    s = np_s(x)
    return s / s.sum(axis=axis, keepdims=True)


def np_stable_max_ce(x, y):
    p = np_stable_max(x)
    return -np.log(np.take_along_axis(p, np.asarray(y)[..., None], axis=-1)[..., 0])


def np_stable_max_ce_grad(x, y):
    """d/dx_k [log sum_j s(x_j) - log s(x_y)] = s'(x_k)/sum s - [k=y] s'(x_y)/s(x_y)."""
    x = np.asarray(x, np.float64)
    ds = np.where(x >= 0, 1.0, 1 / (1 - np.minimum(x, 0)) ** 2)
    g = ds / np_s(x).sum(-1, keepdims=True)
    onehot = np.eye(x.shape[-1])[y]
    return g - onehot * ds / np_s(x)


def naive_ce(z, y):
    """The numpy-style formula written directly in jnp: -log(s(x_y) / sum s)."""
    s = jnp.where(z >= 0, z + 1, 1 / (1 - z))
    return -jnp.log(jnp.take_along_axis(s, y[:, None], axis=-1)[:, 0] / s.sum(-1))


@jax.jit
def everything(z, y):
    """All quantities under test in one compiled program (compiles dominate test time)."""

    def total(fn):
        return lambda z: fn(z, y).sum()

    return {
        "p": stable_max(z),
        "p_axis0": stable_max(z.T, axis=0),
        "log_p": log_stable_max(z),
        "ce": stable_max_cross_entropy(z, y),
        "grad": jax.grad(total(stable_max_cross_entropy))(z),
        "naive_grad": jax.grad(total(naive_ce))(z),
        "softmax_ce": optax.softmax_cross_entropy_with_integer_labels(z, y),
        "softmax_grad": jax.grad(total(optax.softmax_cross_entropy_with_integer_labels))(z),
    }


@pytest.fixture(scope="module")
def moderate():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 5)) * 3).astype(np.float32)
    logits[0, 0] = 0.0  # the kink of s
    logits[1, 2] = 0.0
    labels = rng.integers(0, 5, size=6)
    labels[1] = 2
    return logits, labels, jax.device_get(everything(logits, labels))


@pytest.fixture(scope="module")
def huge():
    logits = np.zeros((6, 5), np.float32)
    logits[:3, :3] = [[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [1e4, 0.0, -5e3]]
    logits[3:] = [[1e4, -3.0, 2.0, 0.0, -1e4]] * 3
    labels = np.array([0, 1, 2, 0, 4, 1])
    return logits, labels, jax.device_get(everything(logits, labels))


def test_probabilities_match_numpy_and_sum_to_one(moderate):
    logits, _, out = moderate
    np.testing.assert_allclose(out["p"], np_stable_max(logits), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(out["p"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["p_axis0"], np_stable_max(logits.T, axis=0), rtol=2e-6)
    np.testing.assert_allclose(np.exp(out["log_p"]), np_stable_max(logits), rtol=1e-5)
    assert not np.allclose(out["p"], jax.nn.softmax(logits), atol=1e-2)  # s is not exp


def test_cross_entropy_value_and_gradient(moderate):
    logits, labels, out = moderate
    np.testing.assert_allclose(out["ce"], np_stable_max_ce(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(out["grad"], out["naive_grad"], rtol=1e-4, atol=1e-6)
    # float64 analytic gradient, including at the kink x = 0 (s' = 1 from both sides)
    np.testing.assert_allclose(out["grad"], np_stable_max_ce_grad(logits, labels), rtol=1e-4, atol=1e-6)


def test_finite_and_accurate_where_softmax_collapses(huge):
    logits, labels, out = huge
    # softmax CE has collapsed: rows whose label is the 1e4 logit give loss and gradient exactly 0
    assert np.all(out["softmax_ce"][[0, 1, 3]] == 0) and not np.any(out["softmax_grad"][[0, 1, 3]])
    for name in ("p", "log_p", "ce", "grad"):
        assert np.all(np.isfinite(out[name])), name
    np.testing.assert_allclose(out["ce"], np_stable_max_ce(logits, labels), rtol=1e-5)
    assert np.all(out["ce"] > 0) and np.all(np.any(out["grad"] != 0, axis=-1))  # still learns
    np.testing.assert_allclose(out["grad"], np_stable_max_ce_grad(logits, labels), rtol=1e-3, atol=1e-12)


def test_bad_labels():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        stable_max_cross_entropy(np.zeros((2, 4)), np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="float32"):
        stable_max_cross_entropy(np.zeros((2, 4)), np.zeros((2,), np.float32))
