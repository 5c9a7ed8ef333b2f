r"""Δ-SGD: SGD whose step size adapts to the local smoothness the client sees.

Kim, Toghani, Uribe & Kyrillidis, "Adaptive Federated Learning with Auto-Tuned
Clients", ICLR 2024, https://openreview.net/forum?id=g0mlwqs8pi
(https://arxiv.org/abs/2306.11201), Algorithm 1. The rule is Malitsky &
Mishchenko's adaptive gradient descent ("Adaptive Gradient Descent without
Descent", ICML 2020, https://arxiv.org/abs/1910.09529) with an amplifier
:math:`\delta` on the growth term and a factor :math:`\gamma` on the locality
term. Defaults follow the paper and the authors' code
(github.com/jlylekim/auto-tuned-FL, ``src/adsgd.py``). See
:func:`scale_by_delta_sgd`.

In federated learning Δ-SGD is the *client* optimizer: Algorithm 1 restarts
:math:`\eta` and :math:`\theta` at every round (``init`` again per round).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms._numerics import abs_sq, compute_dtype


class DeltaSGDState(NamedTuple):
    """State of :func:`scale_by_delta_sgd`."""

    count: jax.Array  # steps taken, int32 scalar
    step_size: jax.Array  # η_{t-1}: the step size of the previous step (η_0 before the first), float32 scalar
    theta: jax.Array  # θ_{t-1} = η_{t-1} / η_{t-2} (θ_0 before the second step), float32 scalar
    prev_params: optax.Params  # x_{t-1} (the initial parameters before the first step)
    prev_grad: optax.Updates  # ∇f(x_{t-1}) (zeros before the first step)


def _sq_norm(a_leaves, b_leaves) -> jax.Array:
    """:math:`\\|a - b\\|^2` over all leaves, in float32 (or wider)."""
    total = jnp.zeros([], jnp.float32)
    for a, b in zip(a_leaves, b_leaves):
        c = compute_dtype(jnp.promote_types(a.dtype, b.dtype))
        d = a.astype(c) - b.astype(c)
        total = total + jnp.sum(abs_sq(d)).astype(jnp.float32)
    return total


def scale_by_delta_sgd(
    initial_step_size: float = 0.2,
    delta: float = 0.1,
    gamma: float = 2.0,
    initial_theta: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale the gradient by Δ-SGD's locality-adaptive step size (Algorithm 1 of Kim et al.).

    At step :math:`t = 0, 1, \dots` with parameters :math:`x_t` and gradient
    :math:`g_t = \nabla f(x_t)`, the step size is :math:`\eta_0` at
    :math:`t = 0` and, for :math:`t \ge 1`,

    .. math::
        \eta_t &= \min\Bigl\{ \sqrt{1 + \delta\,\theta_{t-1}}\;\eta_{t-1},\;
                  \frac{\gamma\,\|x_t - x_{t-1}\|}{2\,\|g_t - g_{t-1}\|} \Bigr\},
        \qquad \theta_t = \frac{\eta_t}{\eta_{t-1}}, \\
        u_t &= \eta_t\, g_t \qquad (x_{t+1} = x_t - \eta_t g_t \text{ in } :func:`delta_sgd`),

    with :math:`\theta_0` = ``initial_theta``. The norms are global: over all
    leaves of the parameter tree at once, as in the authors' code. The first
    term lets the step grow at most geometrically; the second is
    :math:`\gamma / (2 L_t)` for the local smoothness estimate
    :math:`L_t = \|g_t - g_{t-1}\| / \|x_t - x_{t-1}\|`.

    Where the quotient is undefined:

    * :math:`\|g_t - g_{t-1}\| = 0 < \|x_t - x_{t-1}\|` (no curvature seen): the
      locality bound is :math:`+\infty`, so :math:`\eta_t` takes the growth term
      (Malitsky & Mishchenko's convention; the authors' code does the same).
    * :math:`\|x_t - x_{t-1}\| = 0` (the parameters did not move: a zero
      gradient, a learning rate of 0, a step rounded away in low precision): no
      smoothness information, so :math:`\eta` and :math:`\theta` are *held*.
      The authors' code takes the growth term here instead, which lets
      :math:`\eta` grow without bound (to ``inf``, then NaN parameters) while the
      parameters stand still; the literal rule would give :math:`\eta = 0`
      forever.

    :math:`g_{t-1}` is the gradient this transformation saw at the previous
    step (a different minibatch than :math:`g_t` under SGD). The authors' code
    instead evaluates :math:`\nabla f(x_{t-1})` again *on the current
    minibatch* (a second backward pass): pass it as the extra argument
    ``prev_grads`` to use that; the stored one is then ignored. The authors'
    code also takes the growth term at :math:`t = 0` (:math:`\eta =
    \eta_0\sqrt{1 + \delta\theta_0}`) and adds ``1e-8`` to a step set by the
    locality term; this follows Algorithm 1 (:math:`\eta_0` first, no epsilon).

    The step size and the norms are float32 (also for float64 parameters); the
    result has the gradients' dtypes. The state keeps one copy of the
    parameters and of the gradient.

    Args:
      initial_step_size: :math:`\eta_0 > 0` (paper and code: 0.2).
      delta: :math:`\delta > 0`, the amplifier of the growth term (paper: 0.1;
        the code's command-line default is 0.02, its CIFAR-100 runs use 0.1).
      gamma: :math:`\gamma > 0`, the factor of the locality term (paper: 2,
        i.e. step :math:`1/L_t`; the code's ``damping = 2/\gamma = 1``).
        Malitsky & Mishchenko's analysis needs :math:`\gamma \le 1`.
      initial_theta: :math:`\theta_0 > 0` (paper and code: 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
      params, prev_grads=None)`` needs ``params`` (:math:`x_t`).
    """
    check.positive("initial_step_size", initial_step_size)
    check.positive("delta", delta)
    check.positive("gamma", gamma)
    check.positive("initial_theta", initial_theta)

    def init_fn(params):
        return DeltaSGDState(
            count=jnp.zeros([], jnp.int32),
            step_size=jnp.asarray(initial_step_size, jnp.float32),
            theta=jnp.asarray(initial_theta, jnp.float32),
            prev_params=jax.tree.map(jnp.copy, params),  # own buffers: a donated state must not alias the params
            prev_grad=optax.tree.zeros_like(params),
        )

    def update_fn(grads, state, params=None, *, prev_grads=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("delta_sgd needs params: call update(grads, state, params)")
        treedef = jax.tree.structure(grads)
        if jax.tree.structure(params) != treedef:
            raise ValueError(
                f"delta_sgd: params and grads must have the same tree structure, got {jax.tree.structure(params)} "
                f"and {treedef}"
            )
        g = treedef.flatten_up_to(grads)
        x = treedef.flatten_up_to(params)
        if prev_grads is None:
            g_prev = treedef.flatten_up_to(state.prev_grad)
        else:
            if jax.tree.structure(prev_grads) != treedef:
                raise ValueError(
                    f"delta_sgd: prev_grads must have the structure of grads {treedef}, got "
                    f"{jax.tree.structure(prev_grads)}"
                )
            g_prev = treedef.flatten_up_to(prev_grads)
        x_prev = treedef.flatten_up_to(state.prev_params)

        dx = jnp.sqrt(_sq_norm(x, x_prev))
        dg = jnp.sqrt(_sq_norm(g, g_prev))
        eta_prev, theta_prev = state.step_size, state.theta
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        growth = jnp.sqrt(1 + f32(delta) * theta_prev) * eta_prev
        locality = f32(gamma) * dx / (2 * jnp.where(dg > 0, dg, 1))
        adapted = jnp.where(dg > 0, jnp.minimum(growth, locality), growth)
        # t = 0: η_0 as it is; parameters that did not move: hold η and θ.
        hold = (state.count == 0) | (dx == 0)
        eta = jnp.where(hold, eta_prev, adapted)
        theta = jnp.where(hold, theta_prev, adapted / eta_prev)

        out = []
        for gi in g:
            c = compute_dtype(gi.dtype)
            out.append((eta.astype(c) * gi.astype(c)).astype(gi.dtype))
        new_state = DeltaSGDState(
            count=optax.safe_increment(state.count),
            step_size=eta,
            theta=theta,
            # in the state's dtypes (those of the parameters at init), so the state keeps its types
            prev_params=jax.tree.map(lambda v, s: v.astype(s.dtype), params, state.prev_params),
            prev_grad=jax.tree.map(lambda v, s: v.astype(s.dtype), grads, state.prev_grad),
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def delta_sgd(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    initial_step_size: float = 0.2,
    delta: float = 0.1,
    gamma: float = 2.0,
    initial_theta: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Δ-SGD (Kim et al., ICLR 2024): :math:`x_{t+1} = x_t - \lambda_t\, \eta_t\, \nabla f(x_t)`.

    The chain of :func:`scale_by_delta_sgd` (the adaptive step size
    :math:`\eta_t`) and ``optax.scale_by_learning_rate(learning_rate)``.
    Δ-SGD has no learning rate to tune: :math:`\lambda` = ``learning_rate``
    is a multiplier (a float or an optax schedule), 1 by default, which gives
    the paper's method (as optax's ``contrib.dog`` does for DoG).

    Args:
      learning_rate: :math:`\lambda \ge 0`, a multiplier of the adaptive step (1: the paper).
      initial_step_size, delta, gamma, initial_theta: as in
        :func:`scale_by_delta_sgd` (defaults: the paper's 0.2, 0.1, 2, 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      and accepts the extra argument ``prev_grads``.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_delta_sgd(initial_step_size=initial_step_size, delta=delta, gamma=gamma, initial_theta=initial_theta),
        optax.scale_by_learning_rate(learning_rate),
    )
