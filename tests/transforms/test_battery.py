"""One battery for every single-worker transformation of jaxopt_lab.

Each entry of ``TRANSFORMS`` must (a) jit without retracing over several
steps, (b) keep the parameters' dtypes, bfloat16 included, (c) work under
``optax.inject_hyperparams`` (the injected learning rate drives the step),
(d) work under ``optax.MultiSteps(every_k=2)`` and (e) converge on a quadratic
and on the Rosenbrock function. Modelled on optax's ``contrib/_common_test.py``.

To add a method: append a ``Case`` to ``TRANSFORMS`` (and list its public
functions in ``covers``; ``test_every_public_transform_is_in_the_battery``
fails for a transforms module that is left out).

Compiled functions are built once per case and shared through module-scoped
fixtures: the battery compiles four small programs per case (a training step,
its inject_hyperparams and MultiSteps versions, and the convergence runs).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_lab.transforms
from jaxopt_lab.transforms.adamp import adamp, scale_by_adamp, scale_by_sgdp, sgdp
from jaxopt_lab.transforms.delta_sgd import delta_sgd, scale_by_delta_sgd
from jaxopt_lab.transforms.diffgrad import diffgrad, scale_by_diffgrad
from jaxopt_lab.transforms.entropy_sgd import entropy_sgd, scale_by_entropy_sgd
from jaxopt_lab.transforms.orthogonal_grad import orthogonal_grad
from jaxopt_lab.transforms.perp_adamw import perp_adamw
from jaxopt_lab.transforms.weight_decay import clip_by_coordinate, independent_weight_decay
from jaxopt_lab.lowrank import fira, galore, scale_by_fira, scale_by_galore, scale_by_stable_spam, stable_spam

# These programs run a handful of times on tiny arrays: LLVM's optimizations
# cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --- transformations that are not an optimizer on their own, in a typical chain


def orthogonal_grad_sgd(learning_rate):
    return optax.chain(orthogonal_grad(), optax.sgd(learning_rate))


def adam_independent_weight_decay(learning_rate, weight_decay):
    return optax.chain(optax.adam(learning_rate), independent_weight_decay(weight_decay))


def clip_by_coordinate_sgd(learning_rate, max_abs):
    return optax.chain(clip_by_coordinate(max_abs), optax.sgd(learning_rate))


def entropy_sgd_linearized(learning_rate, inner_steps, inner_lr, gamma, gamma_growth, noise, seed):
    """entropy_sgd fed the battery's gradient at every inner step.

    Entropy-SGD needs ``grad_fn`` (gradients at the Langevin iterates), which
    the battery's ``update(grads, state, params)`` cannot give: this wrapper
    passes ``grad_fn = lambda x, k: grads``, the loss's first-order model
    around the parameters (exact for a linear loss). The inner loop, the noise,
    the scoping of gamma and the outer momentum all still run; the step is
    then a positive multiple of ``grads`` plus the small Langevin noise.
    """
    tx = entropy_sgd(
        learning_rate,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        gamma=gamma,
        gamma_growth=gamma_growth,
        noise=noise,
        seed=seed,
    )

    def update_fn(grads, state, params=None):
        return tx.update(grads, state, params, grad_fn=lambda x, k: grads)

    return optax.GradientTransformation(tx.init, update_fn)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    hparams: dict[str, Any]  # keyword arguments of ``factory``, "learning_rate" among them
    solve: dict[str, dict[str, Any]]  # problem name -> overrides of ``hparams`` for the convergence run
    covers: tuple[Callable, ...] = ()  # public jaxopt_lab functions this case exercises
    static_args: tuple[str, ...] = ()  # for optax.inject_hyperparams

    def make(self, **overrides) -> optax.GradientTransformation:
        return self.factory(**{**self.hparams, **overrides})


# Non-zero decays and the non-default branches (nesterov) are switched on where
# they exist, so that their arguments go through inject_hyperparams too. The
# convergence runs switch a weight decay off (a regularizer moves the minimizer
# away from the loss's), except where the decay is the transform under test:
# independent decay 1e-4 moves it by far less than the threshold allows.
NO_DECAY = dict(weight_decay=0.0)
TRANSFORMS = [
    Case(
        "orthogonal_grad+sgd",
        orthogonal_grad_sgd,
        dict(learning_rate=0.1),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=1e-3)),
        covers=(orthogonal_grad,),
    ),
    Case(
        "diffgrad",
        diffgrad,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=1e-2, **NO_DECAY)),
        covers=(diffgrad, scale_by_diffgrad),
    ),
    Case(
        "adamp",
        adamp,
        dict(learning_rate=0.1, weight_decay=1e-4, nesterov=True),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY)),
        covers=(adamp, scale_by_adamp),
        static_args=("channel_axis",),
    ),
    Case(
        "sgdp",
        sgdp,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=1e-3, **NO_DECAY)),
        covers=(sgdp, scale_by_sgdp),
        static_args=("channel_axis",),
    ),
    Case(
        "perp_adamw",
        perp_adamw,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY)),
        covers=(perp_adamw,),
    ),
    Case(
        "adam+independent_weight_decay",
        adam_independent_weight_decay,
        dict(learning_rate=0.1, weight_decay=1e-4),
        solve=dict(quadratic=dict(learning_rate=1e-2), rosenbrock=dict(learning_rate=1e-2)),
        covers=(independent_weight_decay,),
    ),
    Case(
        "clip_by_coordinate+sgd",
        clip_by_coordinate_sgd,
        dict(learning_rate=0.1, max_abs=1.0),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=1e-3)),
        covers=(clip_by_coordinate,),
    ),
    Case(
        "entropy_sgd (linearized grad_fn)",
        entropy_sgd_linearized,
        dict(learning_rate=0.1, inner_steps=3, inner_lr=0.5, gamma=1.0, gamma_growth=1e-3, noise=1e-4, seed=0),
        # No scoping in the 20k-step runs: gamma (1 + 1e-3)^20000 would make the inner loop unstable.
        solve=dict(
            quadratic=dict(learning_rate=0.1, gamma_growth=0.0),
            rosenbrock=dict(learning_rate=2e-4, gamma_growth=0.0),
        ),
        covers=(entropy_sgd, scale_by_entropy_sgd),
        static_args=("inner_steps", "seed"),
    ),
    Case(
        # Needs params (the battery passes them); learning_rate is a multiplier of the adaptive step.
        "delta_sgd",
        delta_sgd,
        dict(learning_rate=1.0, initial_step_size=0.2, delta=0.1, gamma=2.0, initial_theta=1.0),
        # The paper's eta_0 = 0.2 is sized for networks: from Rosenbrock's classic start (gradient
        # norm 232) the first step throws the iterate to x ~ -4, where it crawls along the valley at
        # eta ~ 1/L ~ 2e-4 for the rest of the run. The adaptive rule itself is left as it is.
        solve=dict(quadratic=dict(), rosenbrock=dict(initial_step_size=1e-3)),
        covers=(delta_sgd, scale_by_delta_sgd),
    ),
    # Low-rank methods: the battery's 2-D kernels (3 × 4, 4 × 3) are projected at rank 2 and
    # refreshed every 2 steps; the convergence problems' vectors go to the inner Adam.
    Case(
        "galore",
        galore,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, scale=0.25, label_fn=None),
        solve=dict(quadratic=dict(learning_rate=0.1), rosenbrock=dict(learning_rate=3e-3)),
        covers=(galore, scale_by_galore),
        static_args=("rank", "update_proj_gap", "seed"),
    ),
    Case(
        "fira",
        fira,
        dict(learning_rate=0.1, rank=2, update_proj_gap=2, weight_decay=1e-4, label_fn=None),
        solve=dict(quadratic=dict(learning_rate=0.1, **NO_DECAY), rosenbrock=dict(learning_rate=3e-3, **NO_DECAY)),
        covers=(fira, scale_by_fira),
        static_args=("rank", "update_proj_gap", "seed"),
    ),
    Case(
        "stable_spam",
        stable_spam,
        dict(learning_rate=0.1, weight_decay=1e-4),
        # Every moment reset (1000 steps) restarts Adam's step sizes (the paper follows each reset
        # with a warm-up, which a constant rate lacks): Rosenbrock's valley is then crossed too slowly
        # (loss 6e-3 at lr 3e-3), so its run leaves the resets out; the quadratic keeps them.
        solve=dict(quadratic=dict(learning_rate=1e-2, **NO_DECAY),
                   rosenbrock=dict(learning_rate=3e-3, reset_interval=None, **NO_DECAY)),
        covers=(stable_spam, scale_by_stable_spam),
        static_args=("reset_interval",),
    ),
]
IDS = [c.name for c in TRANSFORMS]


def _params():
    """Dense-like kernels in float32 and bfloat16 and a bfloat16 bias, non-zero and fixed.

    Conv kernels are tested in test_adamp.py; one tree with both dtypes lets
    every check below share a single compiled step per case.
    """
    rng = np.random.default_rng(0)
    return {
        "dense": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "dense_bf16": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16),
        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
    }


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _assert_trees_close(actual, expected, like):
    """Close to float32 precision on float32 leaves of ``like``, to bfloat16 precision on bfloat16 ones."""

    def close(a, e, p):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if p.dtype == jnp.bfloat16:  # 8-bit mantissa: a few roundings of 2**-8
            np.testing.assert_allclose(a, e, rtol=2e-2, atol=2e-2 * np.abs(e).max())
        else:
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6 * max(np.abs(e).max(), 1.0))

    jax.tree.map(close, actual, expected, like)


@pytest.fixture(scope="module", params=TRANSFORMS, ids=IDS)
def case(request) -> Case:
    return request.param


@pytest.fixture(scope="module")
def stepper(case):
    """The case's transformation and one jitted training step, which counts its traces."""
    tx = case.make()
    traces = [0]

    @jit
    def step(params, state, grads):
        traces[0] += 1  # Python side effect: runs only while tracing
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return tx, step, traces


# --- (a) and (b): three steps of the compiled step


@pytest.fixture(scope="module")
def three_steps(stepper):
    tx, step, traces = stepper
    params = _params()
    state = tx.init(params)
    history = [(params, state, None)]
    for seed in range(3):
        params, state, updates = step(params, state, _grads(params, seed))
        history.append((params, state, updates))
    return dict(traces=traces[0], cache_size=step._cache_size(), history=history)


def test_jits_once_across_steps(three_steps):
    assert three_steps["traces"] == 1
    assert three_steps["cache_size"] == 1


def test_keeps_param_dtypes_bfloat16_included(three_steps):
    params0, state0, _ = three_steps["history"][0]
    dtypes = jax.tree.map(lambda p: p.dtype, params0)
    assert set(jax.tree.leaves(dtypes)) == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
    state_dtypes = jax.tree.map(lambda s: s.dtype, state0)
    for params, state, updates in three_steps["history"][1:]:
        assert jax.tree.map(lambda p: p.dtype, params) == dtypes
        assert jax.tree.map(lambda u: u.dtype, updates) == dtypes
        assert jax.tree.map(lambda s: s.dtype, state) == state_dtypes
        assert all(np.isfinite(np.asarray(p, np.float32)).all() for p in jax.tree.leaves(params))
    first, last = three_steps["history"][0][0], three_steps["history"][-1][0]
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last)):
        assert not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), "a parameter did not move"


# --- (c) inject_hyperparams


def test_inject_hyperparams_learning_rate_drives_the_step(case, stepper):
    tx, step, _ = stepper
    params = _params()
    grads = _grads(params, 1)
    injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.hparams)
    update = jit(injected.update)
    state = injected.init(params)
    lr = float(state.hyperparams["learning_rate"])

    def with_lr(value):
        s = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(value, jnp.float32)})
        return update(grads, s, params)[0]

    u1, u2, u0 = with_lr(lr), with_lr(2 * lr), with_lr(0.0)
    _assert_trees_close(u1, step(params, tx.init(params), grads)[2], like=params)
    assert update._cache_size() == 1  # new hyperparameter values, same program
    # The first step is affine in the learning rate, u(lr) = -lr d + c (c is the
    # learning-rate-free part, e.g. independent weight decay): doubling it moves
    # the step by exactly u(lr) - u(0).
    _assert_trees_close(jax.tree.map(lambda b, c: 2 * b - c, u1, u0), u2, like=params)
    assert not np.allclose(np.asarray(u2["dense"]), np.asarray(u1["dense"]))


# --- (d) MultiSteps


def test_multisteps_updates_every_other_step(case, stepper):
    tx, step, _ = stepper
    params = _params()
    g1, g2, g3 = _grads(params, 1), _grads(params, 2), _grads(params, 3)
    ms = optax.MultiSteps(tx, every_k_schedule=2)
    update = jit(ms.update)
    state = ms.init(params)
    u1, state = update(g1, state, params)
    u2, state = update(g2, state, params)
    u3, state = update(g3, state, params)
    for u in (u1, u3):  # odd steps: accumulate only
        assert all(not np.any(np.asarray(leaf, np.float32)) for leaf in jax.tree.leaves(u))
    mean = jax.tree.map(lambda a, b: ((a.astype(jnp.float32) + b) / 2).astype(a.dtype), g1, g2)
    expected = step(params, tx.init(params), mean)[2]  # one inner step on the mean gradient
    _assert_trees_close(u2, expected, like=params)
    assert update._cache_size() == 1


# --- (e) convergence
#
# Both problems keep one coordinate per parameter tensor out of the loss, so
# their minimizers form a line (a PSD quadratic and Rosenbrock padded with a free
# coordinate), the minimum value being 0. The ⊥ methods (⊥Grad, ⊥AdamW) never
# step along the weights by design: on a problem with a single minimizer they
# stop wherever the gradient becomes parallel to w, at a wrong norm, so they
# could not be tested on it. The free coordinate lets them fix the norm; the
# other methods are unaffected (its gradient is 0).
#
# Threshold: a final loss below 1e-3 puts every coordinate of the quadratic
# (unit curvature) within sqrt(1e-3) ~ 0.03 of its target, the 3e-2 tolerance
# of optax's contrib convergence test; on Rosenbrock it gives |x - 1| < 0.032
# and |y - x^2| < 0.0032. Both start far above it (losses 41.5 and 24.2).

_f32 = np.float32
_Q_TARGET = {"w": _f32([[1.0, -2.0, 3.0], [-1.0, 0.5, 0.0]]), "b": _f32([1.0, -1.0, 0.0])}
_Q_WEIGHT = {"w": _f32([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), "b": _f32([1.0, 1.0, 0.0])}  # 0: not in the loss
_Q_START = {"w": _f32([[-1.0, 1.0, 0.5], [2.0, 1.0, 1.0]]), "b": _f32([-1.0, 2.0, 1.0])}


def quadratic(p):
    return sum(jnp.sum(_Q_WEIGHT[k] * jnp.square(p[k] - _Q_TARGET[k])) for k in p)


def rosenbrock(p):  # p[2] does not enter the loss
    return jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - jnp.square(p[0]))


PROBLEMS = {
    "quadratic": (quadratic, _Q_START),
    "rosenbrock": (rosenbrock, _f32([-1.2, 1.0, 1.0])),  # the classic start, plus the free coordinate
}
STEPS = 20_000
THRESHOLD = 1e-3


def test_problems_start_far_from_the_threshold():
    assert float(jax.jit(quadratic)(_Q_START)) == pytest.approx(41.5)
    assert float(jax.jit(rosenbrock)(PROBLEMS["rosenbrock"][1])) == pytest.approx(24.2)


@pytest.fixture(scope="module")
def final_losses(case):
    """Loss after STEPS steps on every problem, in one compiled program."""

    def solve(loss, start, tx):
        def step(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (start, tx.init(start)), length=STEPS)
        return loss(params)

    @jit
    def run():
        return {
            name: solve(loss, start, case.make(**case.solve[name]))
            for name, (loss, start) in PROBLEMS.items()
        }

    return {name: float(v) for name, v in run().items()}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_converges(case, problem, final_losses):
    final = final_losses[problem]
    assert final < THRESHOLD, f"{case.name} on {problem}: loss {final:.3g} after {STEPS} steps"


# --- the battery covers every public transformation


def test_every_public_transform_is_in_the_battery():
    covered = {f for c in TRANSFORMS for f in c.covers}
    missing = []
    for info in pkgutil.iter_modules(jaxopt_lab.transforms.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"jaxopt_lab.transforms.{info.name}")
        for name, obj in inspect.getmembers(module, inspect.isfunction):
            if obj.__module__ == module.__name__ and not name.startswith("_") and obj not in covered:
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"add a Case to TRANSFORMS (or to its covers) for: {missing}"
