"""Delayed Nesterov (Liu et al. 2024, asynchronous Local-SGD) against a float64 numpy version of the rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed.federated.delayed_nesterov import (
    DelayedNesterovState,
    delayed_nesterov,
    dynamic_local_steps,
    scale_by_delayed_nesterov,
)

# Tiny programs run a few times: LLVM's optimizations cost more than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

_RNG = np.random.default_rng(0)
ARRIVALS = _RNG.normal(size=(8, 5))  # hand-fed pseudo-gradients, one row per arrival, flat
THETA0 = _RNG.normal(size=5)


def to_tree(v, dtype=jnp.float32):
    v = jnp.asarray(v, dtype)
    return {"a": v[..., :2], "b": v[..., 2:]}  # two leaves; works for one arrival (5,) or a batch (K, 5)


def to_vec(tree):
    return np.concatenate([np.asarray(tree["a"], np.float64), np.asarray(tree["b"], np.float64)], axis=-1)


def numpy_delayed_nesterov(arrivals, lr, n, beta, c):
    """The paper's rule in float64: the server parameters after each arrival."""
    theta, m, delta = THETA0.astype(np.float64), np.zeros(5), np.zeros(5)
    out = []
    for t, g in enumerate(arrivals):
        delta = delta + g
        if (t + 1) % n == 0:
            m = beta * m + delta / n
            theta = theta - lr * ((1 - c * n + c) * beta * m + g / n)
            delta = np.zeros(5)
        else:
            theta = theta - lr * (c * beta * m + g / n)
        out.append(theta)
    return np.stack(out)


def feed_one_by_one(tx, arrivals, state=None, params=None):
    """A jitted update per arrival; returns the parameters after each, the final state and the trace count."""
    traces = [0]

    @jit
    def step(p, s, g):
        traces[0] += 1
        u, s = tx.update(g, s, p, staleness=jnp.asarray(3), num_examples=jnp.asarray(64))  # ignored extras
        return optax.apply_updates(p, u), s

    p = to_tree(THETA0) if params is None else params
    s = tx.init(p) if state is None else state
    out = []
    for g in arrivals:
        p, s = step(p, s, to_tree(g))
        out.append(to_vec(p))
    return np.stack(out), p, s, traces[0], step._cache_size()


@pytest.mark.parametrize("n, beta, c", [(3, 0.8, 0.0), (3, 0.8, 0.2), (1, 0.5, 0.0)])
def test_one_by_one_matches_numpy_and_jits_once(n, beta, c):
    want = numpy_delayed_nesterov(ARRIVALS, 0.7, n, beta, c)
    got, _, state, traces, cache = feed_one_by_one(delayed_nesterov(0.7, n, beta, c), ARRIVALS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert traces == 1 and cache == 1
    assert int(state[0].count) == len(ARRIVALS)


def test_buffer_of_one_is_optax_nesterov_sgd():
    """N = 1: m = beta m + g, step lr (beta m + g), optax's Nesterov SGD exactly."""
    got = feed_one_by_one(delayed_nesterov(0.3, 1, 0.9), ARRIVALS[:4])[0]
    sgd = optax.sgd(0.3, momentum=0.9, nesterov=True)
    p = to_tree(THETA0)
    s = sgd.init(p)
    want = []
    for g in ARRIVALS[:4]:
        u, s = sgd.update(to_tree(g), s, p)
        p = optax.apply_updates(p, u)
        want.append(to_vec(p))
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-6)


def test_masked_batch_equals_unmasked_arrivals_one_by_one():
    tx = delayed_nesterov(0.7, 3, beta=0.8, momentum_activation=0.1)
    # a non-trivial state first: two arrivals in (the buffer holds two, next arrival closes it)
    _, p, s, _, _ = feed_one_by_one(tx, ARRIVALS[:2])
    batch = ARRIVALS[2:8]
    mask = np.array([True, False, True, True, False, True])

    traces = [0]

    @jit
    def batch_step(p, s, gs, mask):
        traces[0] += 1
        u, s = tx.update(gs, s, p, mask=mask, staleness=jnp.zeros(6, jnp.int32))
        return optax.apply_updates(p, u), s

    got_p, got_s = batch_step(p, s, to_tree(batch), jnp.asarray(mask))
    _, want_p, want_s, _, _ = feed_one_by_one(tx, batch[mask], state=s, params=p)
    np.testing.assert_allclose(to_vec(got_p), to_vec(want_p), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_s), jax.tree.leaves(want_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(got_s[0].count) == 2 + mask.sum()
    # and both equal the numpy rule over the arrivals present
    want = numpy_delayed_nesterov(np.concatenate([ARRIVALS[:2], batch[mask]]), 0.7, 3, 0.8, 0.1)[-1]
    np.testing.assert_allclose(to_vec(got_p), want, rtol=1e-5, atol=1e-6)
    # the masked entries matter if unmasked: all six present gives another result
    all_p, _ = batch_step(p, s, to_tree(batch), jnp.ones(6, bool))
    assert not np.allclose(to_vec(all_p), to_vec(got_p))
    assert traces[0] == 1 and batch_step._cache_size() == 1  # new mask values, same program


def test_batch_without_mask_processes_all_in_order():
    tx = scale_by_delayed_nesterov(2, beta=0.5)
    s0 = tx.init(to_tree(THETA0))
    u, s = tx.update(to_tree(ARRIVALS[:5]), s0)
    # the direction sums u_t over the batch: -(theta_5 - theta_0) of the numpy rule at lr 1
    want = THETA0 - numpy_delayed_nesterov(ARRIVALS[:5], 1.0, 2, 0.5, 0.0)[-1]
    np.testing.assert_allclose(to_vec(u), want, rtol=1e-5, atol=1e-6)
    assert isinstance(s, DelayedNesterovState) and int(s.count) == 5
    # order matters: the reversed batch gives another step
    u_rev, _ = tx.update(to_tree(ARRIVALS[:5][::-1]), s0)
    assert not np.allclose(to_vec(u_rev), to_vec(u))


def test_single_arrival_masked_out_changes_nothing():
    tx = scale_by_delayed_nesterov(2)
    _, s = tx.update(to_tree(ARRIVALS[0]), tx.init(to_tree(THETA0)))
    u, s2 = tx.update(to_tree(ARRIVALS[1]), s, mask=jnp.asarray(False))
    assert not np.any(to_vec(u))
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inject_hyperparams_learning_rate():
    factory = optax.inject_hyperparams(delayed_nesterov, static_args=("buffer_size",))
    injected = factory(learning_rate=0.7, buffer_size=2)
    p = to_tree(THETA0)
    s = injected.init(p)
    s.hyperparams["learning_rate"] = jnp.asarray(0.35)
    u, _ = injected.update(to_tree(ARRIVALS[0]), s, p)
    np.testing.assert_allclose(to_vec(u), -0.35 * ARRIVALS[0] / 2, rtol=1e-6)


def test_bfloat16_pseudo_gradients_keep_their_dtype():
    tx = delayed_nesterov(0.5, 2)
    p = to_tree(THETA0, jnp.bfloat16)
    s = tx.init(p)
    u, s = tx.update(to_tree(ARRIVALS[:3], jnp.bfloat16), s, mask=jnp.ones(3, bool))
    assert {v.dtype for v in jax.tree.leaves(u)} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in jax.tree.leaves(s[0].momentum)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(buffer_size=0), "buffer_size must be an int >= 1, got 0"),
        (dict(buffer_size=2.5), "buffer_size must be an int >= 1, got 2.5"),
        (dict(buffer_size=True), "buffer_size must be an int >= 1, got True"),
        (dict(beta=1.0), r"beta must be in \[0, 1\), got 1.0"),
        (dict(momentum_activation=0.3), "momentum_activation must be <= 1/buffer_size = 1/4, got 0.3"),
        (dict(momentum_activation=-0.1), "momentum_activation must be >= 0, got -0.1"),
        (dict(learning_rate=-1.0), "learning_rate must be >= 0, got -1.0"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        delayed_nesterov(**{"learning_rate": 0.7, "buffer_size": 4, **kwargs})


def test_bad_arrivals():
    tx = delayed_nesterov(0.7, 2)
    s = tx.init(to_tree(THETA0))
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(3,\)"):
        tx.update(to_tree(ARRIVALS[:3]), s, mask=jnp.ones(4, bool))
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(3,\)"):
        tx.update(to_tree(ARRIVALS[:3]), s, mask=jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(\)"):
        tx.update(to_tree(ARRIVALS[0]), s, mask=jnp.ones(1, bool))
    with pytest.raises(ValueError, match="one arrival .* or a batch"):
        tx.update({"a": jnp.zeros((3, 2)), "b": jnp.zeros(3)}, s)  # one leaf batched, one not
    with pytest.raises(ValueError, match="does not match the parameter shape"):
        tx.update({"a": jnp.zeros(4), "b": jnp.zeros(3)}, s)
    with pytest.raises(ValueError, match="tree structure"):
        tx.update({"a": jnp.zeros(2)}, s)


def test_dynamic_local_steps():
    steps = dynamic_local_steps([2.0, 1.0, 0.58, 1.5], 100)
    np.testing.assert_array_equal(steps, [100, 50, 29, 75])  # 0.58 / 2 * 100 = 28.999999999999996 in floats
    assert steps.dtype == np.int64
    np.testing.assert_array_equal(dynamic_local_steps(jnp.asarray([3.0, 1.0]), 10), [10, 3])


def test_dynamic_local_steps_names_a_worker_left_without_steps():
    message = r"worker 2 .* 0 local steps with base_steps=10; raise base_steps to at least 20"
    with pytest.raises(ValueError, match=message):
        dynamic_local_steps([1.0, 0.5, 0.05], 10)


@pytest.mark.parametrize(
    "speeds, base_steps, message",
    [
        ([1.0, 0.0], 10, "speeds must be finite and > 0, got 0.0 for worker 1"),
        ([1.0, float("nan")], 10, "speeds must be finite and > 0, got nan for worker 1"),
        ([], 10, "speeds must be a non-empty 1-D array"),
        ([[1.0]], 10, "speeds must be a non-empty 1-D array"),
        ([1.0], 0, "base_steps must be an int >= 1, got 0"),
        ([1.0], 2.0, "base_steps must be an int >= 1, got 2.0"),
    ],
)
def test_dynamic_local_steps_bad_input(speeds, base_steps, message):
    with pytest.raises(ValueError, match=message):
        dynamic_local_steps(speeds, base_steps)
