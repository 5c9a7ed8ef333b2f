"""⊥AdamW against a float64 numpy version: ⊥Grad projection, then optax's AdamW."""

import jax
import numpy as np

from tests.transforms.trajectory import trajectory
import pytest

from jaxopt_lab.transforms.perp_adamw import perp_adamw

SHAPES = {"bias": (5,), "dense": (3, 4), "conv": (2, 2, 3, 4)}
STEPS = 5
HPARAMS = dict(learning_rate=0.05, b1=0.8, b2=0.99, eps=1e-3, weight_decay=0.1)


def numpy_perp_adamw(p, grads, learning_rate, b1, b2, eps, weight_decay, ortho_eps=1e-30):
    p = p.astype(np.float64)
    m, v, traj = np.zeros_like(p), np.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        g, w = g.astype(np.float64).ravel(), p.ravel()
        g_perp = g - (w @ g) / (w @ w + ortho_eps) * w
        g = (g_perp * np.linalg.norm(g) / (np.linalg.norm(g_perp) + ortho_eps)).reshape(p.shape)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + weight_decay * p
        p = p - learning_rate * step
        traj.append(p)
    return np.stack(traj)


def test_matches_numpy_reference_over_several_steps():
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *s)).astype(np.float32) for k, s in SHAPES.items()}
    tx = perp_adamw(**HPARAMS)

    @jax.jit
    def run(params, grads):
        return trajectory(tx, params, grads)

    out = run(params, grads)
    for k in SHAPES:
        expected = numpy_perp_adamw(params[k], grads[k], **HPARAMS)
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=-0.1), "learning_rate must be >= 0, got -0.1"),
        (dict(b1=1.0), r"b1 must be in \[0, 1\), got 1.0"),
        (dict(b2=2.0), r"b2 must be in \[0, 1\), got 2.0"),
        (dict(eps=-1.0), "eps must be >= 0, got -1.0"),
        (dict(weight_decay=-0.01), "weight_decay must be >= 0, got -0.01"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        perp_adamw(**{"learning_rate": 1e-3, **kwargs})
