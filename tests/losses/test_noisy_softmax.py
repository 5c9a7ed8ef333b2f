"""Noisy Softmax: plain CE at alpha=0; sample means match the noise's expectation."""

import math

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.losses import noisy_softmax_cross_entropy, noisy_softmax_logits

NUM_KEYS = 20000
ALPHA = 0.3


@pytest.fixture(scope="module")
def batch():
    logits = np.array([[2.0, -1.0, 0.5], [-1.5, 0.3, 1.0], [0.2, 4.0, -3.0]], np.float32)
    labels = np.array([0, 0, 1])
    return logits, labels


@pytest.fixture(scope="module")
def many(batch):
    """Noisy logits and losses for NUM_KEYS keys (one compiled vmap)."""
    logits, labels = batch
    keys = jax.random.split(jax.random.key(0), NUM_KEYS)

    @jax.jit
    def run(keys):
        def one(k):
            return noisy_softmax_logits(logits, labels, k, ALPHA), noisy_softmax_cross_entropy(logits, labels, k, ALPHA)

        return jax.vmap(one)(keys)

    noisy, losses = run(keys)
    return np.asarray(noisy, np.float64), np.asarray(losses, np.float64)


@jax.jit
def noisy_and_plain(logits, labels, key, alpha):
    return (
        noisy_softmax_cross_entropy(logits, labels, key, alpha),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
    )


def test_alpha_zero_is_plain_cross_entropy(batch):
    logits, labels = batch
    out, plain = jax.device_get(noisy_and_plain(logits, labels, jax.random.key(3), 0.0))
    np.testing.assert_array_equal(out, plain)
    noisy, _ = jax.device_get(noisy_and_plain(logits, labels, jax.random.key(3), ALPHA))
    assert np.all(noisy >= plain) and np.any(noisy > plain)  # noise only lowers the target logit


def test_noisy_logit_mean_matches_expectation(batch, many):
    logits, labels = (np.asarray(a) for a in batch)
    noisy, _ = many
    idx = np.arange(len(labels))
    others = np.ones(logits.shape, bool)
    others[idx, labels] = False
    np.testing.assert_array_equal(noisy[:, others], np.broadcast_to(logits[others], (NUM_KEYS, others.sum())))
    f_y = logits[idx, labels].astype(np.float64)
    # E|xi| = sqrt(2/pi), Var|xi| = 1 - 2/pi
    expected = f_y - ALPHA * np.abs(f_y) * math.sqrt(2 / math.pi)
    std_err = ALPHA * np.abs(f_y) * math.sqrt(1 - 2 / math.pi) / math.sqrt(NUM_KEYS)
    np.testing.assert_array_less(np.abs(noisy[:, idx, labels].mean(0) - expected), 5 * std_err)


def test_mean_loss_matches_half_normal_expectation(batch, many):
    logits, labels = (np.asarray(a, np.float64) for a in batch)
    labels = labels.astype(int)
    _, losses = many
    # E over |xi| ~ half-normal of CE with f_y - alpha |f_y| t, by quadrature (float64)
    t = np.linspace(0, 10, 20001)
    density = 2 * np.exp(-(t**2) / 2) / math.sqrt(2 * math.pi)
    for i, y in enumerate(labels):
        f = logits[i]
        f_y = f[y] - ALPHA * abs(f[y]) * t
        rest = np.log(np.exp(np.delete(f, y)).sum())
        ce = np.logaddexp(f_y, rest) - f_y
        expected = np.trapezoid(ce * density, t)
        std_err = losses[:, i].std() / math.sqrt(NUM_KEYS)
        assert abs(losses[:, i].mean() - expected) < 5 * std_err + 1e-6


def test_paper_annealed_amplitude_with_target_norm():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 6)).astype(np.float32)  # class weights, bias-free last layer
    x = rng.normal(size=(3, 6)).astype(np.float32)
    x[2] = 2 * w[3]  # aligned: cos = 1, no noise
    labels = np.array([0, 1, 3])
    logits = x @ w.T
    norms = np.linalg.norm(w[labels], axis=1) * np.linalg.norm(x, axis=1)
    keys = jax.random.split(jax.random.key(5), 8000)
    fn = jax.jit(jax.vmap(lambda k: noisy_softmax_logits(logits, labels, k, ALPHA, target_norm=norms)))
    noisy = np.asarray(fn(keys), np.float64)
    f_y = logits[np.arange(3), labels].astype(np.float64)
    cos = f_y / norms
    expected = f_y - ALPHA * norms * (1 - cos) * math.sqrt(2 / math.pi)
    std_err = ALPHA * norms * (1 - cos) * math.sqrt(1 - 2 / math.pi) / math.sqrt(len(keys))
    got = noisy[:, np.arange(3), labels].mean(0)
    np.testing.assert_array_less(np.abs(got[:2] - expected[:2]), 5 * std_err[:2])
    np.testing.assert_allclose(got[2], f_y[2], rtol=1e-4)  # annealed away at cos = 1
    # ... and it is not the logit-only amplitude |f_y|
    logit_only = f_y[0] - ALPHA * abs(f_y[0]) * math.sqrt(2 / math.pi)
    assert abs(got[0] - logit_only) > 10 * std_err[0]


def test_bad_alpha(batch):
    logits, labels = batch
    with pytest.raises(ValueError, match=r"-0\.1"):
        noisy_softmax_cross_entropy(logits, labels, jax.random.key(0), -0.1)
    with pytest.raises(ValueError, match="target_norm"):
        noisy_softmax_logits(logits, labels, jax.random.key(0), 0.1, target_norm=np.ones(2))
