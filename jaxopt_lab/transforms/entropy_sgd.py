r"""Entropy-SGD: gradient descent on the local entropy, estimated by Langevin dynamics.

Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun &
Zecchina, "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys", ICLR 2017,
https://arxiv.org/abs/1611.01838 (Algorithm 1, with the "scoping" of
:math:`\gamma` of its Section 4.3).

Each outer step runs ``inner_steps`` stochastic gradient Langevin (SGLD) steps
from the current parameters and returns :math:`x - \mu`, as the authors'
code does (Algorithm 1's local-entropy gradient :math:`\gamma(x - \mu)` is
opt-in); any outer optimizer can follow (the paper: SGD with Nesterov
momentum, :func:`entropy_sgd`). See :func:`scale_by_entropy_sgd`.
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


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, jax.Array):  # e.g. injected by optax.inject_hyperparams without static_args
        raise check.not_static(name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def scale_by_entropy_sgd(
    inner_steps: int = 20,
    inner_lr: float = 0.1,
    gamma: float = 0.03,
    gamma_growth: float = 1e-3,
    alpha: float = 0.25,
    noise: float = 1e-4,
    seed: int = 0,
    scale_by_gamma: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Replace the gradient by Entropy-SGD's local-entropy direction (the authors' code's Algorithm 1).

    At outer step :math:`t = 0, 1, \dots` with parameters :math:`x`, coupling
    :math:`\gamma_t = \gamma_0 (1 + \gamma_1)^t` (``gamma``, ``gamma_growth``),
    start from :math:`x'_0 = \mu_0 = x` and take :math:`L` = ``inner_steps``
    SGLD steps, :math:`k = 0, \dots, L-1`:

    .. math::
        x'_{k+1} &= x'_k - \eta' \bigl(\nabla f_k(x'_k) - \gamma_t (x - x'_k)\bigr)
                    - \sqrt{2\eta'}\, \varepsilon\, \xi_k,
                    \qquad \xi_k \sim \mathcal N(0, I), \\
        \mu_{k+1} &= (1 - \alpha)\, \mu_k + \alpha\, x'_{k+1},

    (:math:`\eta'` = ``inner_lr``, :math:`\varepsilon` = ``noise``, the paper's
    thermal noise, :math:`\alpha` = ``alpha``, default 0.25: the authors' code's
    ``mw = 0.75 mw + 0.25 w'``), and return

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
    of the newest iterate; it also applies its momentum and weight decay
    inside the Langevin loop (we do not), its outer momentum buffer starts at
    the first minibatch gradient (optax's, in :func:`entropy_sgd`, at zero), and
    its PyTorch version never advances the step count of the scoping (its
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
    if isinstance(scale_by_gamma, jax.Array):
        raise check.not_static("scale_by_gamma")
    if not isinstance(scale_by_gamma, bool):
        raise ValueError(f"scale_by_gamma must be a bool, got {scale_by_gamma!r}")
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

        def inner_step(k, g_leaves, xp, mu):
            leaf_keys = jax.random.split(jax.random.fold_in(step_key, k), len(x))
            new_xp, new_mu = [], []
            for xi, xpi, mi, gi, kk, c in zip(x, xp, mu, g_leaves, leaf_keys, ctypes):
                lr, gam, a = (jnp.asarray(v, jnp.float32).astype(c) for v in (inner_lr, gamma_t, alpha))
                step = xpi - lr * (gi.astype(c) - gam * (xi - xpi))
                eps = jnp.asarray(noise, jnp.float32).astype(c)
                # the official code adds eps / sqrt(lr / 2) * xi to the gradient: sqrt(2 lr) eps xi on x'
                step = step - jnp.sqrt(2 * lr) * eps * jax.random.normal(kk, xi.shape, c)
                new_xp.append(step)
                new_mu.append((1 - a) * mi + a * step)
            return new_xp, new_mu

        g0 = treedef.flatten_up_to(grads)
        xp, mu = inner_step(jnp.zeros([], jnp.int32), g0, x, x)
        if inner_steps > 1:

            def body(k, carry):
                xp, mu = carry
                point = treedef.unflatten([v.astype(p.dtype) for v, p in zip(xp, p_leaves)])
                g = treedef.flatten_up_to(grad_fn(point, k))
                return tuple(inner_step(k, g, xp, mu))

            xp, mu = jax.lax.fori_loop(1, inner_steps, body, (xp, mu))

        scale = gamma_t if scale_by_gamma else jnp.ones([], jnp.float32)
        out = [(scale.astype(c) * (xi - mi)).astype(g.dtype) for xi, mi, g, c in zip(x, mu, g0, ctypes)]
        return treedef.unflatten(out), EntropySGDState(count=optax.safe_increment(state.count), key=next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def entropy_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = True,
    inner_steps: int = 20,
    inner_lr: float = 0.1,
    gamma: float = 0.03,
    gamma_growth: float = 1e-3,
    alpha: float = 0.25,
    noise: float = 1e-4,
    seed: int = 0,
    scale_by_gamma: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The Entropy-SGD optimizer (Chaudhari et al., 2017): SGD with momentum on the local entropy.

    .. math::
        m_t = \beta m_{t-1} + u_t, \qquad
        x_{t+1} = x_t - \eta_t\, (u_t + \beta m_t \text{ if Nesterov, else } m_t),

    with :math:`u_t = x_t - \mu` the direction of :func:`scale_by_entropy_sgd`
    (:math:`\gamma_t (x_t - \mu)` with ``scale_by_gamma=True``): the chain of
    that transformation, ``optax.trace(momentum, nesterov)`` (optax's SGD
    momentum) and ``optax.scale_by_learning_rate(learning_rate)``.
    ``momentum=0`` gives the authors' code's step (with their
    ``momentum=0``) :math:`x \leftarrow x - \eta\, (x - \mu)`, or with
    ``alpha=0.75, scale_by_gamma=True`` Algorithm 1's :math:`x \leftarrow x -
    \eta\, \gamma (x - \mu)`.

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or an optax schedule.
      momentum: :math:`\beta \in [0, 1)`.
      nesterov: Nesterov momentum (the paper's choice).
      inner_steps, inner_lr, gamma, gamma_growth, alpha, noise, seed, scale_by_gamma: as in
        :func:`scale_by_entropy_sgd` (``inner_steps``, ``seed`` and
        ``scale_by_gamma`` are static under ``optax.inject_hyperparams``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      and the extra argument ``grad_fn(params, k) -> grads``.
    """
    check.non_negative("learning_rate", learning_rate)
    check.in_unit_interval("momentum", momentum)
    return optax.chain(
        scale_by_entropy_sgd(
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            gamma=gamma,
            gamma_growth=gamma_growth,
            alpha=alpha,
            noise=noise,
            seed=seed,
            scale_by_gamma=scale_by_gamma,
        ),
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )
