r"""Δ-SGD: SGD whose step size adapts to the local smoothness the client sees.

Kim, Toghani, Uribe & Kyrillidis, "Adaptive Federated Learning with Auto-Tuned
Clients", ICLR 2024, https://openreview.net/forum?id=g0mlwqs8pi
(https://arxiv.org/abs/2306.11201), Algorithm 1. The rule is Malitsky &
Mishchenko's adaptive gradient descent ("Adaptive Gradient Descent without
Descent", ICML 2020, https://arxiv.org/abs/1910.09529) with an amplifier
:math:`\delta` on the growth term and a factor :math:`\gamma` on the locality
term. Defaults follow the authors' code
(github.com/jlylekim/auto-tuned-FL, ``src/adsgd.py``, with the values its
``src/options.py`` passes). See :func:`scale_by_delta_sgd`.

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
    delta: float = 0.02,
    gamma: float = 2.0,
    initial_theta: float = 1.0,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale the gradient by Δ-SGD's locality-adaptive step size (Kim et al., as the authors' code runs it).

    At step :math:`t = 0, 1, \dots` with parameters :math:`x_t`, gradient
    :math:`g_t = \nabla f(x_t)` and :math:`\eta_{-1} = \eta_0` (``initial_step_size``),
    :math:`\theta_{-1} = \theta_0` (``initial_theta``), :math:`x_{-1} = x_0`:

    .. math::
        \eta_t &= \begin{cases}
            \min\Bigl\{ \sqrt{1 + \delta\,\theta_{t-1}}\;\eta_{t-1},\;
                  \dfrac{\gamma\,\|x_t - x_{t-1}\|}{2\,\|g_t - g_{t-1}\|} \Bigr\} + \epsilon
              & \text{if } \|x_t - x_{t-1}\| > 0 \text{ and } \|g_t - g_{t-1}\| > 0, \\
            \sqrt{1 + \delta\,\theta_{t-1}}\;\eta_{t-1} & \text{otherwise,}
          \end{cases} \\
        \theta_t &= \frac{\eta_t}{\eta_{t-1}}, \qquad
        u_t = \eta_t\, g_t \qquad (x_{t+1} = x_t - \eta_t g_t \text{ in } :func:`delta_sgd`).

    This is the authors' code (github.com/jlylekim/auto-tuned-FL, ``src/adsgd.py``
    ``Adsgd.step`` with ``compute_dif_norms``; its ``damping`` is :math:`2/\gamma`,
    its ``amplifier`` :math:`\delta`, its ``eps`` :math:`\epsilon`), defaults
    included: those its ``src/options.py`` and ``run.sh`` run with (``lr=0.2``,
    ``amplifier=0.02``, ``damping=1``, ``lr_eps=1e-8``). The norms are global:
    over all leaves of the parameter tree at once, as in that code. The first
    term lets the step grow at most geometrically; the second is
    :math:`\gamma / (2 L_t)` for the local smoothness estimate
    :math:`L_t = \|g_t - g_{t-1}\| / \|x_t - x_{t-1}\|`. Where that quotient is
    undefined the growth term is taken, as in the code: at :math:`t = 0`
    (:math:`x_{-1} = x_0`, the code's copy of the model made before the first
    step), so the first step is :math:`\eta_0\sqrt{1 + \delta\theta_0}`, not
    Algorithm 1's :math:`\eta_0`; and where :math:`\|g_t - g_{t-1}\| = 0 <
    \|x_t - x_{t-1}\|` (no curvature seen). One deliberate difference: when the
    parameters did not move at a later step (:math:`x_t = x_{t-1}`, :math:`t
    \ge 1`: a zero gradient, an exactly converged iterate, a step rounded away),
    :math:`\eta` and :math:`\theta` are *held*; the code takes the growth term
    there, which grows :math:`\eta` geometrically while the parameters stand
    still, to ``inf`` and then NaN parameters (``inf * 0``). Whenever the
    parameters move, the step is the code's.

    :math:`g_{t-1}` is by default the gradient this transformation saw at the
    previous step (a different minibatch than :math:`g_t` under SGD). The
    authors' code evaluates :math:`\nabla f(x_{t-1})` again *on the current
    minibatch* (a second backward pass through its ``prev_net``); a gradient
    transformation cannot evaluate gradients itself, so pass that gradient as
    the extra argument ``prev_grads`` to get the code's step exactly (the
    stored one is then ignored).

    The step size and the norms are float32 (also for float64 parameters); the
    result has the gradients' dtypes. The state keeps one copy of the
    parameters and of the gradient.

    Args:
      initial_step_size: :math:`\eta_0 > 0` (paper and code: 0.2).
      delta: :math:`\delta > 0`, the amplifier of the growth term (default
        0.02, the code's ``amplifier`` default, with which its ``run.sh`` runs;
        the paper states 0.1).
      gamma: :math:`\gamma > 0`, the factor of the locality term (paper: 2,
        i.e. step :math:`1/L_t`; the code's ``damping = 2/\gamma = 1``).
        Malitsky & Mishchenko's analysis needs :math:`\gamma \le 1`.
      initial_theta: :math:`\theta_0 > 0` (paper and code: 1).
      eps: :math:`\epsilon \ge 0`, added to the step size when the locality
        term is defined (the code's ``lr_eps``, 1e-8; 0 gives Algorithm 1's min).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
      params, prev_grads=None)`` needs ``params`` (:math:`x_t`).
    """
    check.positive("initial_step_size", initial_step_size)
    check.positive("delta", delta)
    check.positive("gamma", gamma)
    check.positive("initial_theta", initial_theta)
    check.non_negative("eps", eps)

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
        defined = (dx > 0) & (dg > 0)
        locality = f32(gamma) * dx / (2 * jnp.where(defined, dg, 1))
        adapted = jnp.where(defined, jnp.minimum(growth, locality) + f32(eps), growth)
        # parameters that stood still after the first step: hold eta and theta (the code would grow eta to inf)
        hold = (state.count > 0) & (dx == 0)
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
    delta: float = 0.02,
    gamma: float = 2.0,
    initial_theta: float = 1.0,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Δ-SGD (Kim et al., ICLR 2024): :math:`x_{t+1} = x_t - \lambda_t\, \eta_t\, \nabla f(x_t)`.

    The chain of :func:`scale_by_delta_sgd` (the adaptive step size
    :math:`\eta_t`) and ``optax.scale_by_learning_rate(learning_rate)``.
    Δ-SGD has no learning rate to tune: :math:`\lambda` = ``learning_rate``
    is a multiplier (a float or an optax schedule), 1 by default, which gives
    the method itself (as optax's ``contrib.dog`` does for DoG).

    Args:
      learning_rate: :math:`\lambda \ge 0`, a multiplier of the adaptive step (1: the paper).
      initial_step_size, delta, gamma, initial_theta, eps: as in
        :func:`scale_by_delta_sgd` (defaults: the authors' code's 0.2, 0.02, 2 (``damping=1``), 1, 1e-8).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      and accepts the extra argument ``prev_grads``.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_delta_sgd(
            initial_step_size=initial_step_size, delta=delta, gamma=gamma, initial_theta=initial_theta, eps=eps
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
