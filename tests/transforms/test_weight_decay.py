"""Independent weight decay and coordinate-wise clipping against float64 numpy versions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.transforms.trajectory import trajectory
import pytest

from jaxopt_lab.transforms.weight_decay import clip_by_coordinate, independent_weight_decay

SHAPES = {"w": (3, 4), "b": (4,)}
MASK = {"w": True, "b": False}  # the usual: decay the kernel, not the bias
STEPS = 5


def numpy_adam_independent_decay(params, grads, lr, decay, mask, b1=0.9, b2=0.999, eps=1e-8):
    """θ ← θ − lr·adam(g) − λ_t·θ (decay only where ``mask``), float64; ``decay(t)`` with t = 0, 1, ..."""
    out = {}
    for k, p in params.items():
        p = p.astype(np.float64)
        m, v, traj = np.zeros_like(p), np.zeros_like(p), []
        for t, g in enumerate(grads[k]):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            adam = (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
            p = p - lr * adam - (decay(t) * p if mask[k] else 0.0)
            traj.append(p)
        out[k] = np.stack(traj)
    return out


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = {k: rng.normal(size=(STEPS, *s)).astype(np.float32) for k, s in SHAPES.items()}
    return params, grads


def _trajectory(make_decay):
    """A compiled run of chain(adam(lr), make_decay(wd)) with lr and wd traced: one program for all values."""

    @jax.jit
    def run(params, grads, lr, wd):
        tx = optax.chain(optax.adam(lr), make_decay(wd))

        return trajectory(tx, params, grads)

    return run


@pytest.fixture(scope="module")
def constant_run():
    return _trajectory(lambda wd: independent_weight_decay(wd, mask=MASK))


@pytest.mark.parametrize("lr", [0.1, 0.0])
def test_constant_decay_matches_numpy_and_ignores_the_learning_rate(problem, constant_run, lr):
    params, grads = problem
    wd = 0.05
    out = constant_run(params, grads, lr, wd)
    expected = numpy_adam_independent_decay(params, grads, lr, lambda t: wd, MASK)
    for k in SHAPES:  # atol: optax.adam's float32 1 - 0.999**t is off by ~1e-5 relative
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)
    if lr == 0.0:  # the kernel shrinks by exactly (1 - λ) per step, whatever the learning rate
        np.testing.assert_allclose(out["w"][-1], params["w"] * (1 - wd) ** STEPS, rtol=1e-6)
        np.testing.assert_array_equal(out["b"][-1], params["b"])


def test_scheduled_decay_matches_numpy(problem):
    params, grads = problem
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=STEPS)  # λ_t = 0.1 (1 - t/5)
    run = _trajectory(lambda scale: independent_weight_decay(lambda t: scale * schedule(t)))
    out = run(params, grads, 0.1, 1.0)
    expected = numpy_adam_independent_decay(params, grads, 0.1, lambda t: 0.1 * (1 - t / STEPS), {"w": True, "b": True})
    for k in SHAPES:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_clip_by_coordinate_is_optax_clip():
    g = {"w": jnp.array([[-3.0, -0.5], [0.2, 7.0]]), "b": jnp.array([1.5, -1.0], jnp.bfloat16)}
    tx = clip_by_coordinate(1.0)
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(out["w"], np.float32([[-1.0, -0.5], [0.2, 1.0]]))
    np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [1.0, -1.0])
    assert out["b"].dtype == jnp.bfloat16
    ref, _ = optax.clip(1.0).update(g, optax.clip(1.0).init(g))
    jax.tree.map(np.testing.assert_array_equal, out, ref)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.0001"):
        independent_weight_decay(-1e-4)
    with pytest.raises(ValueError, match="max_abs must be > 0, got 0"):
        clip_by_coordinate(0)
    with pytest.raises(ValueError, match="max_abs must be > 0, got -1.0"):
        clip_by_coordinate(-1.0)
    tx = independent_weight_decay(1e-4)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="independent_weight_decay needs params"):
        tx.update(params, tx.init(params))
