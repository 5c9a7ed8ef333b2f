"""diffGrad against a float64 numpy version of its update rule (and torch_optimizer's, if installed)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from tests.transforms.trajectory import trajectory
import pytest

from jaxopt_lab.transforms.diffgrad import diffgrad, scale_by_diffgrad

SHAPES = {"bias": (5,), "dense": (3, 4), "conv": (2, 2, 3, 4)}
STEPS = 6
# eps is large on purpose: with eps = 1e-8 its placement (before or after the
# bias correction of v) would not show in float32.
HPARAMS = dict(learning_rate=0.05, b1=0.8, b2=0.99, eps=0.05, weight_decay=0.1)


def numpy_diffgrad(params, grads, learning_rate, b1, b2, eps, weight_decay, eps_after_correction=False):
    """Parameters after each step, float64, following torch_optimizer.DiffGrad / diffGrad_v2.py."""
    p = params.astype(np.float64)
    m, v, prev = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64) + weight_decay * p  # coupled L2
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        friction = 1.0 / (1.0 + np.exp(-np.abs(prev - g)))
        prev = g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if eps_after_correction:  # optax's placement, to show the test tells them apart
            step = friction * (m / bc1) / (np.sqrt(v / bc2) + eps)
        else:
            step = np.sqrt(bc2) / bc1 * friction * m / (np.sqrt(v) + eps)
        p = p - learning_rate * step
        out.append(p)
    return np.stack(out)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    # gradients of several scales, so that the friction sigmoid(|Δg|) spans (1/2, 1)
    scales = {k: rng.choice([0.05, 0.5, 3.0], size=s) for k, s in SHAPES.items()}
    grads = {k: (rng.normal(size=(STEPS, *s)) * scales[k]).astype(np.float32) for k, s in SHAPES.items()}
    return params, grads


@pytest.fixture(scope="module")
def jax_trajectory(problem):
    params, grads = problem
    tx = diffgrad(**HPARAMS)

    @jax.jit
    def run(params, grads):
        return trajectory(tx, params, grads)

    return jax.tree.map(np.asarray, run(params, grads))


def test_matches_numpy_reference_over_several_steps(problem, jax_trajectory):
    params, grads = problem
    for k in SHAPES:
        expected = numpy_diffgrad(params[k], grads[k], **HPARAMS)
        np.testing.assert_allclose(jax_trajectory[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)
        other = numpy_diffgrad(params[k], grads[k], **HPARAMS, eps_after_correction=True)
        assert np.abs(jax_trajectory[k] - other).max() > 1e-3  # the eps placement is tested


def test_friction_of_the_first_step_uses_a_zero_previous_gradient():
    g = jnp.array([0.5, 1.0, -4.0])
    tx = scale_by_diffgrad(eps=0.0)
    u, state = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
    # step 1: m/(1-b1) = g, sqrt(v/(1-b2)) = |g|, so u = sigmoid(|g|) sign(g)
    np.testing.assert_allclose(u["w"], 1 / (1 + np.exp(-np.abs(g))) * np.sign(g), rtol=1e-6)
    np.testing.assert_array_equal(state.prev_grad["w"], g)


def test_defaults_are_the_reference_defaults():
    sig = inspect.signature(diffgrad).parameters
    assert [sig[k].default for k in ("b1", "b2", "eps", "weight_decay")] == [0.9, 0.999, 1e-8, 0.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(b1=1.0), "b1 must be in [0, 1), got 1.0"),
        (dict(b2=-0.1), "b2 must be in [0, 1), got -0.1"),
        (dict(eps=-1e-8), "eps must be >= 0, got -1e-08"),
        (dict(weight_decay=-0.5), "weight_decay must be >= 0, got -0.5"),
        (dict(learning_rate=-1.0), "learning_rate must be >= 0, got -1.0"),
        (dict(b1=float("nan")), "b1 must be in [0, 1), got nan"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        diffgrad(**{"learning_rate": 1e-3, **kwargs})


def test_matches_torch_optimizer(problem, jax_trajectory):
    torch = pytest.importorskip("torch")
    torch_optimizer = pytest.importorskip("torch_optimizer")
    params, grads = problem
    for k in SHAPES:
        p = torch.nn.Parameter(torch.tensor(params[k], dtype=torch.float64))
        opt = torch_optimizer.DiffGrad(
            [p], lr=HPARAMS["learning_rate"], betas=(HPARAMS["b1"], HPARAMS["b2"]), eps=HPARAMS["eps"],
            weight_decay=HPARAMS["weight_decay"],
        )
        for t in range(STEPS):
            # a fresh gradient tensor per step: torch_optimizer keeps a reference
            # to it as the previous gradient (see scale_by_diffgrad)
            p.grad = torch.tensor(grads[k][t], dtype=torch.float64)
            opt.step()
            np.testing.assert_allclose(jax_trajectory[k][t], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
