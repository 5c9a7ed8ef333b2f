"""Δ-SGD (Kim et al., ICLR 2024) against a float64 numpy version of the authors' step-size rule.

The reference follows ``Adsgd.step`` of github.com/jlylekim/auto-tuned-FL (``src/adsgd.py``): the
growth term wherever ``||x_t - x_{t-1}||`` or ``||g_t - g_{t-1}||`` is zero (so at the first step,
whose previous model is a copy of the current one), else the min of both terms plus ``eps``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.transforms.delta_sgd import DeltaSGDState, delta_sgd, scale_by_delta_sgd

# Tiny programs run a few times: LLVM's optimizations cost more than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# A separable quadratic whose minibatch t has its own target: f_t(x) = 1/2 sum_i a_i (x_i - c_{t,i})^2,
# on a two-leaf tree (the norms of the rule are global: over both leaves at once).
_RNG = np.random.default_rng(0)
SHAPES = {"b": (3,), "w": (2, 3)}  # sorted keys: the order jax flattens a dict in
SIZE = 9
CURV = np.linspace(0.5, 3.0, SIZE)
STEPS = 8
TARGETS = _RNG.normal(size=(STEPS, SIZE))
X0 = _RNG.normal(size=SIZE)
HP = dict(initial_step_size=0.05, delta=0.1, gamma=2.0, initial_theta=1.0, eps=1e-3)


def to_tree(v, dtype=jnp.float32):
    v = jnp.asarray(v, dtype)
    return {"b": v[:3], "w": v[3:].reshape(2, 3)}


def to_vec(tree):
    return np.concatenate([np.asarray(tree["b"], np.float64).ravel(), np.asarray(tree["w"], np.float64).ravel()])


def np_grad(x, t):
    return CURV * (x - TARGETS[t])


def jax_grad(p, t):
    curv, target = to_tree(CURV), to_tree(jnp.asarray(TARGETS, jnp.float32)[t])
    return jax.tree.map(lambda x, a, c: a * (x - c), p, curv, target)


def numpy_delta_sgd(steps, learning_rate, initial_step_size, delta, gamma, initial_theta, eps, same_batch=False):
    """The rule in float64 on the flat vector; parameters and step sizes after each step, and the branches taken."""
    x, eta, theta = X0.astype(np.float64), initial_step_size, initial_theta
    x_prev, g_prev = x.copy(), np.zeros_like(x)  # the code's prev_net: a copy of the model
    xs, etas, branches = [], [], []
    for t in range(steps):
        g = np_grad(x, t)
        g_old = np_grad(x_prev, t) if same_batch else g_prev
        dx, dg = np.linalg.norm(x - x_prev), np.linalg.norm(g - g_old)
        growth = math.sqrt(1 + delta * theta) * eta
        if dx > 0 and dg > 0:
            locality = gamma * dx / (2 * dg)
            new = min(growth, locality) + eps
            branches.append("growth" if growth <= locality else "locality")
        else:
            new = growth
            branches.append("undefined")
        theta, eta = new / eta, new
        x_prev, g_prev = x, g
        x = x - learning_rate * eta * g
        xs.append(x)
        etas.append(eta)
    return np.stack(xs), np.array(etas), branches


def run_jax(tx, steps, same_batch=False):
    """Python loop over one jitted step (so the test also counts its traces)."""
    traces = [0]

    @jit
    def step(p, s, t):
        traces[0] += 1
        extra = {"prev_grads": jax_grad(s[0].prev_params, t)} if same_batch else {}
        u, s = tx.update(jax_grad(p, t), s, p, **extra)
        return optax.apply_updates(p, u), s

    p = to_tree(X0)
    s = tx.init(p)
    xs, etas = [], []
    for t in range(steps):
        p, s = step(p, s, jnp.asarray(t, jnp.int32))
        xs.append(to_vec(p))
        etas.append(float(s[0].step_size))
    return np.stack(xs), np.array(etas), traces[0], step._cache_size()


# (learning rate multiplier, eta_0, prev_grads on the current batch): each run takes both terms of the min
CONFIGS = [(1.0, 0.05, False), (0.5, 0.5, True), (1.0, 0.5, True)]


@pytest.mark.parametrize("learning_rate, eta0, same_batch", CONFIGS)
def test_matches_numpy_rule_and_jits_once(learning_rate, eta0, same_batch):
    hp = {**HP, "initial_step_size": eta0}
    want_x, want_eta, branches = numpy_delta_sgd(STEPS, learning_rate, same_batch=same_batch, **hp)
    # the run exercises both terms of the min (else a wrong term could go unnoticed)
    assert "growth" in branches and "locality" in branches and branches[0] == "undefined", branches
    if same_batch:  # the extra argument prev_grads changes the result: it must be the one used
        assert not np.allclose(numpy_delta_sgd(STEPS, learning_rate, **hp)[0], want_x, rtol=1e-3)
    got_x, got_eta, traces, cache = run_jax(delta_sgd(learning_rate, **hp), STEPS, same_batch=same_batch)
    np.testing.assert_allclose(got_eta, want_eta, rtol=2e-5)
    np.testing.assert_allclose(got_x, want_x, rtol=2e-5, atol=2e-6)
    assert traces == 1 and cache == 1


def test_official_defaults_and_first_step():
    # src/options.py of the authors' code: lr 0.2, amplifier 0.02, damping 1 (gamma 2), theta 1, lr_eps 1e-8
    tx = scale_by_delta_sgd()
    p = to_tree(X0)
    s = tx.init(p)
    assert isinstance(s, DeltaSGDState)
    assert float(s.step_size) == pytest.approx(0.2) and float(s.theta) == 1.0
    g = jax_grad(p, 0)
    u, s = tx.update(g, s, p)
    # the code's first step: its previous model is a copy, so the growth term sqrt(1 + delta theta) eta_0
    eta1 = 0.2 * math.sqrt(1.02)
    np.testing.assert_allclose(to_vec(u), eta1 * np_grad(X0, 0), rtol=1e-6)
    assert int(s.count) == 1 and float(s.step_size) == pytest.approx(eta1, rel=1e-6)
    # a second step from the defaults against the reference with delta 0.02 and eps 1e-8
    want_x, want_eta, _ = numpy_delta_sgd(3, 1.0, 0.2, 0.02, 2.0, 1.0, 1e-8)
    got_x, got_eta, _, _ = run_jax(delta_sgd(), 3)
    np.testing.assert_allclose(got_eta, want_eta, rtol=2e-5)
    np.testing.assert_allclose(got_x, want_x, rtol=2e-5, atol=2e-6)


def test_undefined_quotients():
    tx = scale_by_delta_sgd(initial_step_size=0.1, delta=0.5, initial_theta=2.0, eps=0.0)
    p0, p1 = to_tree(X0), to_tree(X0 + 0.1)
    g0, g1 = jax_grad(p0, 0), jax_grad(p0, 1)
    _, s = tx.update(g0, tx.init(p0), p0)
    eta1, theta1 = 0.1 * math.sqrt(1 + 0.5 * 2.0), math.sqrt(2.0)
    assert float(s.step_size) == pytest.approx(eta1, rel=1e-6) and float(s.theta) == pytest.approx(theta1, rel=1e-6)
    growth = eta1 * math.sqrt(1 + 0.5 * theta1)
    # parameters that did not move after the first step: eta and theta held (the code's growth would reach inf)
    u, still = tx.update(g1, s, p0)
    assert float(still.step_size) == pytest.approx(eta1, rel=1e-6) and float(still.theta) == pytest.approx(theta1)
    np.testing.assert_allclose(to_vec(u), eta1 * to_vec(g1), rtol=1e-6)
    # moved, but the same gradient (no curvature seen): the growth term too
    _, grown = tx.update(g0, s, p1)
    assert float(grown.step_size) == pytest.approx(growth, rel=1e-6)
    assert float(grown.theta) == pytest.approx(growth / eta1, rel=1e-6)


def test_bfloat16_params_keep_dtypes():
    tx = delta_sgd()
    p = to_tree(X0, jnp.bfloat16)
    s = tx.init(p)
    for t in range(2):
        u, s = tx.update(jax.tree.map(lambda v: v.astype(jnp.bfloat16), jax_grad(p, t)), s, p)
        p = optax.apply_updates(p, u)
    assert {v.dtype for v in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in jax.tree.leaves(s[0].prev_params)} == {jnp.dtype(jnp.bfloat16)}
    assert s[0].step_size.dtype == jnp.float32 and np.isfinite(float(s[0].step_size))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(initial_step_size=0.0), "initial_step_size must be > 0, got 0.0"),
        (dict(delta=-0.1), "delta must be > 0, got -0.1"),
        (dict(gamma=float("nan")), "gamma must be > 0, got nan"),
        (dict(initial_theta=0), "initial_theta must be > 0, got 0"),
        (dict(eps=-1e-8), "eps must be >= 0, got -1e-08"),
        (dict(learning_rate=-1.0), "learning_rate must be >= 0, got -1.0"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        delta_sgd(**kwargs)


def test_needs_params_and_matching_prev_grads():
    tx = delta_sgd()
    p = to_tree(X0)
    s = tx.init(p)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, s)
    with pytest.raises(ValueError, match="prev_grads must have the structure"):
        tx.update(p, s, p, prev_grads={"b": p["b"]})
