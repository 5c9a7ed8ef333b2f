"""Opposing-signals diagnostic (Rosenfeld & Risteski 2024) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.diagnostics import (
    group_losses,
    largest_loss_changes,
    opposing_signals,
    opposing_signals_from_gradients,
    per_example_gradients,
)


def _softmax_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return jax.nn.logsumexp(logits) - logits[y]


def test_per_example_gradients_softmax_regression():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.integers(0, 3, size=6)
    w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    got = per_example_gradients(_softmax_loss, {"b": jnp.asarray(b, jnp.float32), "w": jnp.asarray(w, jnp.float32)},
                                jnp.asarray(x, jnp.float32), jnp.asarray(y))
    z = x @ w + b
    delta = np.exp(z - z.max(1, keepdims=True))
    delta = delta / delta.sum(1, keepdims=True) - np.eye(3)[y]  # softmax - onehot, float64
    want = np.concatenate([delta, np.einsum("ni,nj->nij", x, delta).reshape(6, -1)], axis=1)  # ravel order: b, w
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_planted_groups_and_reference_direction():
    rng = np.random.default_rng(1)
    n, d, k = 40, 12, 5
    u = rng.normal(size=d)
    grads = rng.normal(size=(n, d)) * 0.1 + 0.3 * rng.normal(size=d)  # shared direction + noise
    plus, minus = np.arange(3, 3 + k), np.arange(20, 20 + k)
    grads[plus] += 3 * u
    grads[minus] -= 2.5 * u
    out = opposing_signals_from_gradients(jnp.asarray(grads, jnp.float32), k)
    centred = grads - grads.mean(0)
    v = np.linalg.svd(centred)[2][0]
    c = centred @ v
    sign = np.sign(c[np.argmax(np.abs(c))])
    np.testing.assert_allclose(out.projections, sign * c, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.abs(out.direction @ v), 1.0, rtol=1e-5)
    assert set(np.asarray(out.positive).tolist()) == set(plus.tolist())
    assert set(np.asarray(out.negative).tolist()) == set(minus.tolist())
    mp, mn = grads[plus].mean(0), grads[minus].mean(0)
    np.testing.assert_allclose(out.cosine, mp @ mn / np.linalg.norm(mp) / np.linalg.norm(mn), rtol=1e-4)
    assert float(out.cosine) < 0


def test_from_loss_function_and_errors():
    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), jnp.asarray(rng.integers(0, 2, size=8))
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
    out = opposing_signals(_softmax_loss, params, x, y, k=2)
    ref = opposing_signals_from_gradients(per_example_gradients(_softmax_loss, params, x, y), 2)
    np.testing.assert_array_equal(out.positive, ref.positive)
    with pytest.raises(ValueError, match=r"k must be in \[1, N/2\]"):
        opposing_signals(_softmax_loss, params, x, y, k=5)
    with pytest.raises(ValueError, match="different numbers of examples"):
        opposing_signals(_softmax_loss, params, x, y[:3], k=1)


def test_loss_changes_and_group_losses():
    before = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0])
    after = jnp.asarray([1.5, 0.5, 3.0, 6.0, 4.9])
    rose, fell = largest_loss_changes(before, after, 2)
    assert rose.tolist() == [3, 0] and fell.tolist() == [1, 4]
    hist = jnp.stack([before, after])
    np.testing.assert_allclose(group_losses(hist, [rose, fell]), [[2.5, 3.5], [3.75, 2.7]], rtol=1e-6)
