"""z-loss against numpy."""

import inspect

import jax
import numpy as np
import pytest

from jaxopt_lab.losses import z_loss


def np_logsumexp(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


value_and_grad = jax.jit(jax.value_and_grad(z_loss))


def test_matches_numpy_and_gradient():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 3, 7)) * 4 + 2).astype(np.float32)
    log_z = np_logsumexp(logits)
    value, grad = value_and_grad(logits, 0.3)
    np.testing.assert_allclose(value, 0.3 * np.mean(log_z**2), rtol=1e-5)
    # d/dz_ij w mean(logZ^2) = 2 w logZ_i softmax(z_i)_j / N
    p = np.exp(logits - log_z[..., None])
    np.testing.assert_allclose(grad, 2 * 0.3 * log_z[..., None] * p / log_z.size, rtol=1e-4, atol=1e-7)
    assert float(value_and_grad(logits, 0.0)[0]) == 0.0
    assert inspect.signature(z_loss).parameters["weight"].default == 1e-4  # PaLM's weight


def test_bad_weight():
    with pytest.raises(ValueError, match=r"-0\.5"):
        z_loss(np.zeros((2, 3)), weight=-0.5)
