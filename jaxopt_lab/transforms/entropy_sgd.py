r"""Entropy-SGD: gradient descent on the local entropy, estimated by Langevin dynamics.

Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun &
Zecchina, "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys", ICLR 2017,
https://arxiv.org/abs/1611.01838 (Algorithm 1, with the "scoping" of
:math:`\gamma` of its Section 4.3).

Each outer step runs ``inner_steps`` stochastic gradient Langevin (SGLD) steps
from the current parameters and returns :math:`x - \mu`, as the authors'
code does (Algorithm 1's local-entropy gradient :math:`\gamma(x - \mu)` is
opt-in); any outer optimizer can follow. :func:`entropy_sgd` is the authors'
optimizer (``ucla-vision/entropy-sgd``, ``python/optim.py``): its momentum
and weight decay act inside the Langevin loop and on the outer step, whose
momentum buffer starts at the first minibatch gradient. See
:func:`scale_by_entropy_sgd`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms._numerics import compute_dtype


class EntropySGDState(NamedTuple):
    """State of :func:`scale_by_entropy_sgd`."""

    count: jax.Array  # outer steps taken, int32 scalar (drives the scoping of gamma)
    key: jax.Array  # raw uint32 PRNG key of the Langevin noise, advanced every outer step


class EntropySGDMomentumState(NamedTuple):
    """State of :func:`entropy_sgd`: the Langevin transform's and the authors' outer momentum buffer."""

    inner: EntropySGDState
    momentum: optax.Updates  # the outer buffer; the first outer step starts it at the minibatch gradient


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, jax.Array):  # e.g. injected by optax.inject_hyperparams without static_args
        raise check.not_static(name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _bool_arg(name: str, value) -> None:
    if isinstance(value, jax.Array):
        raise check.not_static(name)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def scale_by_entropy_sgd(
    inner_steps: int = 20,
    inner_lr: float = 0.1,
    gamma: float = 0.03,
    gamma_growth: float = 1e-3,
    alpha: float = 0.25,
    noise: float = 1e-4,
    seed: int = 0,
    scale_by_gamma: bool = False,
    momentum: float = 0.0,
    nesterov: bool = True,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Replace the gradient by Entropy-SGD's local-entropy direction (the authors' code's Algorithm 1).

    At outer step :math:`t = 0, 1, \dots` with parameters :math:`x`, coupling
    :math:`\gamma_t = \gamma_0 (1 + \gamma_1)^t` (``gamma``, ``gamma_growth``),
    start from :math:`x'_0 = \mu_0 = x` and take :math:`L` = ``inner_steps``
    SGLD steps, :math:`k = 0, \dots, L-1`:

    .. math::
        d_k &= \nabla f_k(x'_k) + \lambda x'_k, \qquad
        v_k = \beta v_{k-1} + d_k \;(v_{-1} = 0), \qquad
        \tilde d_k = d_k + \beta v_k \text{ (Nesterov) or } v_k, \\
        x'_{k+1} &= x'_k - \eta' \bigl(\tilde d_k - \gamma_t (x - x'_k)\bigr)
                    - \sqrt{2\eta'}\, \varepsilon\, \xi_k,
                    \qquad \xi_k \sim \mathcal N(0, I), \\
        \mu_{k+1} &= (1 - \alpha)\, \mu_k + \alpha\, x'_{k+1},

    (:math:`\eta'` = ``inner_lr``, :math:`\varepsilon` = ``noise``, the paper's
    thermal noise, :math:`\alpha` = ``alpha``, default 0.25: the authors' code's
    ``mw = 0.75 mw + 0.25 w'``; :math:`\beta` = ``momentum`` and :math:`\lambda`
    = ``weight_decay``, the authors' code's SGD momentum and L2 term inside the
    Langevin loop, its buffer :math:`v` zeroed every outer step; both 0 by
    default here, :func:`entropy_sgd` passes its own), and return

    .. math:: u_t = x - \mu_L,

    as the authors' code does (``w.grad = wc - mw``), which the outer optimizer
    then descends. It is the gradient of the negative local entropy divided by
    :math:`\gamma_t`; ``scale_by_gamma=True`` returns Algorithm 1's
    :math:`u_t = \gamma_t (x - \mu_L)` instead. :math:`f_k` is the loss on the
    minibatch of inner step :math:`k`.

    The Langevin noise is the authors' code's: it adds
    :math:`\varepsilon / \sqrt{\eta'/2}\; \xi_k` to the gradient, i.e.
    :math:`\sqrt{2\eta'}\, \varepsilon\, \xi_k` on :math:`x'` (SGLD at
    temperature :math:`\varepsilon^2`). Algorithm 1 of the paper writes
    :math:`\sqrt{\eta'}\, \varepsilon\, \xi_k`; pass
    ``noise = ε / √2`` to get that.

    Against the authors' code (``ucla-vision/entropy-sgd``, ``python/optim.py``):
    the defaults follow it in returning :math:`x - \mu` and in the weight 0.25
    of the newest iterate, and its inner momentum and weight decay are the
    arguments ``momentum``, ``nesterov``, ``weight_decay``. Two differences:
    with ``nesterov=False`` its code rebinds the gradient to the momentum
    buffer before adding the coupling and the noise in place, so they
    accumulate in the buffer (an aliasing slip; its scripts use Nesterov): here
    they do not; and its PyTorch version never advances the step count of the scoping (its
    :math:`\gamma` stays :math:`\gamma_0`; its README and Lua version scope as
    here, the Lua one from :math:`t = 1`). The scoping has no cap:
    the inner loop is stable only while :math:`\eta' \gamma_t < 2`, i.e. with
    the defaults for about the first 6,500 outer steps (the paper's runs are
    shorter); for longer runs lower ``gamma_growth``.

    Gradients: ``update(grads, state, params, grad_fn=grad_fn)``.

    * ``grads`` is :math:`\nabla f_0(x)`, the gradient at the parameters on
      the minibatch of inner step 0 (the one a training loop computes anyway):
      it is the first inner gradient, since :math:`x'_0 = x`.
    * ``grad_fn(params, k) -> grads`` evaluates :math:`\nabla f_k` at any point
      (``k``: an int32 array in ``1..L-1``; ignore it to use one batch); it is
      called :math:`L - 1` times per outer step, with the points in the
      parameters' dtypes, and may be omitted only when ``inner_steps == 1``.

    The noise is drawn from a key kept in the state (seeded by ``seed``, split
    every outer step), so a run is deterministic given ``seed``. The
    arithmetic, :math:`x'` and :math:`\mu` are in float32 (or the parameters'
    wider type); the result has the gradients' dtypes. The inner loop is a
    ``lax.fori_loop``.

    Args:
      inner_steps: :math:`L \ge 1`, Langevin steps per outer step (an int; a
        static argument under ``optax.inject_hyperparams``).
      inner_lr: :math:`\eta' > 0`, the Langevin step size.
      gamma: :math:`\gamma_0 > 0`, the initial coupling ("scope").
      gamma_growth: :math:`\gamma_1 \ge 0`, the scoping rate: :math:`\gamma_t =
        \gamma_0 (1 + \gamma_1)^t`.
      alpha: :math:`\alpha \in (0, 1]`, the weight of the newest iterate in
        the running average :math:`\mu`. The default 0.25 is the authors'
        code's (``beta1 = 0.75`` on the old average); Algorithm 1 writes
        :math:`\mu \leftarrow (1 - \alpha)\mu + \alpha x'` with
        :math:`\alpha = 0.75` as we read the paper: pass ``alpha=0.75`` for
        that reading.
      noise: :math:`\varepsilon \ge 0`, the thermal noise (0: plain gradient
        steps in the inner loop).
      seed: the int seed of the noise's PRNG key (static under
        ``optax.inject_hyperparams``).
      momentum: :math:`\beta \in [0, 1)`, SGD momentum of the Langevin steps
        (the authors' code uses its optimizer's momentum here too; default 0).
      nesterov: Nesterov form of that momentum (a Python bool).
      weight_decay: :math:`\lambda \ge 0`, the L2 term added to the Langevin
        gradients (default 0).
      scale_by_gamma: return :math:`\gamma_t (x - \mu_L)`, the local-entropy
        gradient as Algorithm 1 writes it, instead of the authors' code's
        :math:`x - \mu_L` (default ``False``). Learning rates tuned on the
        authors' code assume the unscaled form: with ``True`` the same rate
        steps :math:`\gamma_t` times as far. ``alpha=0.75,
        scale_by_gamma=True`` is Algorithm 1 as we read the paper (a Python
        bool; static under ``optax.inject_hyperparams``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` and takes the extra argument ``grad_fn``; chain it with an
      outer optimizer, as :func:`entropy_sgd` does.
    """
    inner_steps = _int_arg("inner_steps", inner_steps, 1)
    seed = check.static_int("seed", seed)
    check.positive("inner_lr", inner_lr)
    check.positive("gamma", gamma)
    check.non_negative("gamma_growth", gamma_growth)
    check.require("alpha", alpha, lambda v: 0 < v <= 1, "in (0, 1]")
    check.non_negative("noise", noise)
    check.in_unit_interval("momentum", momentum)
    check.non_negative("weight_decay", weight_decay)
    _bool_arg("scale_by_gamma", scale_by_gamma)
    _bool_arg("nesterov", nesterov)
    seed = int(seed)

    def init_fn(params):
        del params
        return EntropySGDState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed))

    def update_fn(
        grads,
        state,
        params=None,
        *,
        grad_fn: Callable[[optax.Params, jax.Array], optax.Updates] | None = None,
        **extra_args,
    ):
        del extra_args
        if params is None:
            raise ValueError("entropy_sgd needs params: call update(grads, state, params, grad_fn=grad_fn)")
        if grad_fn is None and inner_steps > 1:
            raise ValueError(
                f"entropy_sgd with inner_steps={inner_steps!r} needs grad_fn: call "
                f"update(grads, state, params, grad_fn=grad_fn) with grad_fn(params, k) -> grads"
            )
        treedef = jax.tree.structure(params)
        p_leaves = treedef.flatten_up_to(params)
        ctypes = [compute_dtype(p.dtype) for p in p_leaves]
        x = [p.astype(c) for p, c in zip(p_leaves, ctypes)]
        gamma_t = jnp.asarray(gamma, jnp.float32) * jnp.power(
            1 + jnp.asarray(gamma_growth, jnp.float32), state.count.astype(jnp.float32)
        )
        next_key, step_key = jax.random.split(state.key)

        def inner_step(k, g_leaves, xp, mu, vel):
            leaf_keys = jax.random.split(jax.random.fold_in(step_key, k), len(x))
            new_xp, new_mu, new_vel = [], [], []
            for xi, xpi, mi, vi, gi, kk, c in zip(x, xp, mu, vel, g_leaves, leaf_keys, ctypes):
                lr, gam, a, b, wd = (
                    jnp.asarray(v, jnp.float32).astype(c) for v in (inner_lr, gamma_t, alpha, momentum, weight_decay)
                )
                d = gi.astype(c) + wd * xpi
                vi = b * vi + d
                d = d + b * vi if nesterov else vi
                step = xpi - lr * (d - gam * (xi - xpi))
                eps = jnp.asarray(noise, jnp.float32).astype(c)
                # the official code adds eps / sqrt(lr / 2) * xi to the gradient: sqrt(2 lr) eps xi on x'
                step = step - jnp.sqrt(2 * lr) * eps * jax.random.normal(kk, xi.shape, c)
                new_xp.append(step)
                new_mu.append((1 - a) * mi + a * step)
                new_vel.append(vi)
            return new_xp, new_mu, new_vel

        g0 = treedef.flatten_up_to(grads)
        carry = inner_step(jnp.zeros([], jnp.int32), g0, x, x, [jnp.zeros_like(v) for v in x])
        if inner_steps > 1:

            def body(k, carry):
                xp = carry[0]
                point = treedef.unflatten([v.astype(p.dtype) for v, p in zip(xp, p_leaves)])
                g = treedef.flatten_up_to(grad_fn(point, k))
                return tuple(inner_step(k, g, *carry))

            carry = jax.lax.fori_loop(1, inner_steps, body, tuple(carry))
        mu = carry[1]

        scale = gamma_t if scale_by_gamma else jnp.ones([], jnp.float32)
        out = [(scale.astype(c) * (xi - mi)).astype(g.dtype) for xi, mi, g, c in zip(x, mu, g0, ctypes)]
        return treedef.unflatten(out), EntropySGDState(count=optax.safe_increment(state.count), key=next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def entropy_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    inner_steps: int = 20,
    inner_lr: float = 0.1,
    gamma: float = 0.03,
    gamma_growth: float = 1e-3,
    alpha: float = 0.25,
    noise: float = 1e-4,
    seed: int = 0,
    scale_by_gamma: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The Entropy-SGD optimizer (Chaudhari et al., 2017) as the authors' code runs it.

    The authors' ``EntropySGD.step`` (``ucla-vision/entropy-sgd``,
    ``python/optim.py``, with its scripts' ``momentum=0.9, nesterov=True``):
    :func:`scale_by_entropy_sgd` with the same ``momentum``, ``nesterov`` and
    ``weight_decay`` inside the Langevin loop gives :math:`u_t = x_t - \mu`
    (:math:`\gamma_t (x_t - \mu)` with ``scale_by_gamma=True``), then

    .. math::
        d_t = u_t + \lambda x_t, \qquad m_t = \beta m_{t-1} + d_t, \qquad
        x_{t+1} = x_t - \eta_t\, (d_t + \beta m_t \text{ if Nesterov, else } m_t),

    with the outer buffer started, as the authors' code starts it, at the first
    minibatch gradient: :math:`m_{-1} = \nabla f(x_0)` (the ``grads`` of the
    first update), not at zero. ``momentum=0, weight_decay=0`` gives the plain
    step :math:`x \leftarrow x - \eta\, (x - \mu)`, or with ``alpha=0.75,
    scale_by_gamma=True`` Algorithm 1's :math:`x \leftarrow x - \eta\, \gamma
    (x - \mu)`. For a buffer started at zero and no momentum inside the
    Langevin loop, chain ``scale_by_entropy_sgd(...)``, ``optax.trace`` and
    ``optax.scale_by_learning_rate`` yourself.

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or an optax schedule.
      momentum: :math:`\beta \in [0, 1)`, of the outer step and of the Langevin steps.
      nesterov: Nesterov momentum (the paper's choice), outer and inner.
      weight_decay: :math:`\lambda \ge 0`, the L2 term of the outer step and
        of the Langevin steps (the authors' ``weight_decay``/``--l2``; default 0).
      inner_steps, inner_lr, gamma, gamma_growth, alpha, noise, seed, scale_by_gamma: as in
        :func:`scale_by_entropy_sgd` (``inner_steps``, ``seed`` and
        ``scale_by_gamma`` are static under ``optax.inject_hyperparams``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      and the extra argument ``grad_fn(params, k) -> grads``.
    """
    check.non_negative("learning_rate", learning_rate)
    inner = scale_by_entropy_sgd(
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        gamma=gamma,
        gamma_growth=gamma_growth,
        alpha=alpha,
        noise=noise,
        seed=seed,
        scale_by_gamma=scale_by_gamma,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )

    def init_fn(params):
        return EntropySGDMomentumState(inner=inner.init(params), momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(grads, state, params=None, **extra_args):
        u, inner_state = inner.update(grads, state.inner, params, **extra_args)
        first = state.inner.count == 0

        def outer(u, g, m, p):
            c = compute_dtype(p.dtype)
            b, wd = (jnp.asarray(v, jnp.float32).astype(c) for v in (momentum, weight_decay))
            d = u.astype(c) + wd * p.astype(c)
            m = b * jnp.where(first, g.astype(c), m.astype(c)) + d
            step = d + b * m if nesterov else m
            return step.astype(u.dtype), m.astype(p.dtype)

        pairs = jax.tree.map(outer, u, grads, state.momentum, params)
        is_pair = lambda x: isinstance(x, tuple)
        step = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
        new_m = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
        return step, EntropySGDMomentumState(inner=inner_state, momentum=new_m)

    return optax.chain(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        optax.scale_by_learning_rate(learning_rate),
    )
