r"""SSO: stochastic surrogate optimization in the target space.

Lavington, Vaswani, Babanezhad, Schmidt & Le Roux, "Target-based Surrogates
for Stochastic Optimization", ICML 2023, https://proceedings.mlr.press/v202/lavington23a.html.
Official code: github.com/WilderLavington/Target-Based-Surrogates-For-Stochastic-Optimization
(``optimizers/sgd_fmdopt.py`` with the Armijo inner optimizer ``optimizers/lsopt.py``).

One expensive gradient, of the loss :math:`L` with respect to the targets
:math:`z = f(\theta)` (e.g. the logits of a linear model or of a network's last
layer), builds a surrogate that only needs the cheap model :math:`f`; it is
then minimized by :math:`m` inner gradient steps, each with an Armijo line
search on the surrogate. See :func:`scale_by_sso`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check


class SSOState(NamedTuple):
    """State of :func:`scale_by_sso`."""

    count: jax.Array  # outer steps (expensive gradients) taken, int32
    step_size: jax.Array  # the last inner step size the line search accepted, float32
    backtracks: jax.Array  # surrogate evaluations the line searches spent in total, int32


def _tree_vdot(a, b):
    return sum((jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.float32(0))


def _refuse_complex(tree, what="SSO"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.iscomplexobj(leaf):
            raise ValueError(f"{what}: parameter {jax.tree_util.keystr(path)} is {leaf.dtype}; complex parameters are not supported")


def scale_by_sso(
    eta: float = 1.0,
    m: int = 5,
    inner_lr: float = 10.0,
    c: float = 0.1,
    beta: float = 0.9,
    expand: float = 1.0,
    max_backtracks: int = 100,
    min_step: float = 1e-6,
    line_search: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""SSO's outer step: :math:`m` inner steps on the target-space surrogate.

    At :math:`\theta_t`, with :math:`z_t = f(\theta_t)` (``targets_fn``) and
    :math:`\nabla_z L(z_t)` (``target_grad``, a tree like :math:`z`), the
    surrogate is the official code's

    .. math::
        s_t(\theta) = \frac{1}{N}\sum_{i}\Big[\frac{1}{\eta}\,
            \nabla_z L(z_t)_i\, f(\theta)_i + \big(f(\theta)_i - z_{t,i}\big)^2\Big]

    (:math:`N` target entries): up to a constant and a factor it is the paper's
    :math:`\langle\nabla L(z_t), f(\theta) - z_t\rangle + \frac{1}{2\eta'}\lVert
    f(\theta) - z_t\rVert^2` with :math:`\eta' = 1/(2\eta)`, whose minimizer in
    target space is the projected target-space gradient step
    :math:`z_t - \nabla L(z_t) / (2\eta)`. Starting from :math:`\theta^0 =
    \theta_t`, :math:`m` steps :math:`\theta^{k+1} = \theta^k - \alpha_k \nabla
    s_t(\theta^k)`, each :math:`\alpha_k` from the Armijo backtracking of the
    official ``LSOpt``: start from ``expand`` :math:`\times` the previous step
    size (for the first inner step of every outer step the previous one is
    ``inner_lr``, the official ``reset_lr_on_step``: that step starts from
    ``expand * inner_lr``), accept when :math:`s_t(\theta^k - \alpha
    d) \le s_t(\theta^k) - c\,\alpha \lVert d\rVert^2`, else
    :math:`\alpha \leftarrow \beta\alpha`, at most ``max_backtracks`` times or
    until :math:`\alpha <` ``min_step`` (the step is then taken with that
    :math:`\alpha`, as the official code does). ``line_search=False`` takes the
    fixed :math:`\alpha = ` ``inner_lr``.

    The returned update is :math:`\theta_t - \theta^m` (a descent direction:
    chain :func:`optax.scale_by_learning_rate`, as :func:`sso` does, with
    learning rate 1 for the paper's step). The incoming gradient is not used:
    the surrogate's gradient at :math:`\theta_t` is
    :math:`J_f^\top \nabla_z L / (N\eta)`, formed from ``target_grad`` by a VJP
    of ``targets_fn``. Arithmetic in float32 (or wider); complex parameters are
    refused.

    Args:
      eta: the official outer :math:`\eta > 0` (the target-space step is
        :math:`1/(2\eta)` times the gradient of the loss as passed). The official
        runs set it per loss (``loaders/load_optim.py``: ``1 / optimal_stepsize``, e.g.
        1/2 for the logistic loss); it cannot be known here, so the default is 1.
      m: inner steps per expensive gradient, an int >= 1 (official 5: ``parser.py`` ``--m``).
      inner_lr: the line search's starting step size (official 10), > 0.
      c: Armijo constant in (0, 1) (official 0.1: ``parser.py`` ``--c``, which
        ``loaders/load_optim.py`` passes to ``LSOpt``, whose own default is 0.5).
      beta: backtracking factor in (0, 1) (official 0.9).
      expand: growth of the step size between inner steps, >= 1 (the official
        ``expand_coeff ** (1 / n_batches_per_epoch)``; 1 keeps it).
      max_backtracks: backtracking steps per inner step, an int >= 1 (official 100).
      min_step: the search stops below this step size (official 1e-6).
      line_search: Armijo search (default, the official algorithm) or a fixed
        inner step ``inner_lr``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      and the keyword arguments ``targets_fn`` (``params -> z``, the cheap
      model, closed over the batch's inputs) and ``target_grad``
      (:math:`\nabla_z L(z_t)`, a tree like ``targets_fn(params)``).
    """
    check.positive("eta", eta)
    m = check.static_int("m", m, 1)
    check.positive("inner_lr", inner_lr)
    check.require("c", c, lambda v: 0 < v < 1, "in (0, 1)")
    check.require("beta", beta, lambda v: 0 < v < 1, "in (0, 1)")
    check.require("expand", expand, lambda v: v >= 1, ">= 1")
    max_backtracks = check.static_int("max_backtracks", max_backtracks, 1)
    check.non_negative("min_step", min_step)

    def init_fn(params):
        _refuse_complex(params)
        return SSOState(jnp.zeros([], jnp.int32), jnp.asarray(inner_lr, jnp.float32), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, targets_fn: Callable[[Any], Any] | None = None,
                  target_grad: Any = None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("scale_by_sso needs params")
        _refuse_complex(params)
        if not jax.tree.leaves(params):
            return updates, state._replace(count=optax.safe_increment(state.count))
        if targets_fn is None or target_grad is None:
            raise ValueError("scale_by_sso needs update(..., targets_fn=f, target_grad=dL/dz)")
        ct = lambda x: jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))  # noqa: E731
        theta0 = jax.tree.map(ct, params)
        z0 = jax.tree.map(ct, targets_fn(theta0))
        gz = jax.tree.map(ct, target_grad)
        if jax.tree.structure(gz) != jax.tree.structure(z0):
            raise ValueError("target_grad must have the structure of targets_fn(params)")
        n = sum(z.size for z in jax.tree.leaves(z0))
        eta_ = jnp.asarray(eta, jnp.float32)

        def surrogate(theta):
            z = targets_fn(theta)
            lin = _tree_vdot(gz, z) / eta_
            quad = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(z), jax.tree.leaves(z0)))
            return (lin + quad) / n

        value_and_grad = jax.value_and_grad(surrogate)
        lr0 = jnp.asarray(inner_lr, jnp.float32)

        def inner(k, carry):
            theta, alpha, evals = carry
            s0, d = value_and_grad(theta)
            dd = _tree_vdot(d, d)
            # LSOpt.step starts from expand_coeff * state['step_size'], the first one too (after the reset to 10)
            alpha = jnp.where(k == 0, lr0, alpha) * jnp.asarray(expand, jnp.float32)
            step = lambda a: jax.tree.map(lambda t, g: t - a.astype(t.dtype) * g, theta, d)  # noqa: E731

            if not line_search:
                return step(alpha), alpha, evals

            def cond(c_):
                a, found, i = c_
                return (~found) & (i < max_backtracks) & (a >= min_step)

            def body(c_):
                a, _, i = c_
                ok = surrogate(step(a)) <= s0 - jnp.asarray(c, jnp.float32) * a * dd
                return jnp.where(ok, a, a * jnp.asarray(beta, jnp.float32)), ok, i + 1

            alpha, _, used = jax.lax.while_loop(cond, body, (alpha, jnp.asarray(False), jnp.zeros([], jnp.int32)))
            return step(alpha), alpha, evals + used

        theta, alpha, evals = jax.lax.fori_loop(0, m, inner, (theta0, lr0, jnp.zeros([], jnp.int32)))
        out = jax.tree.map(lambda t0, t, u: (t0 - t).astype(u.dtype), theta0, theta, updates)
        return out, SSOState(optax.safe_increment(state.count), alpha, state.backtracks + evals)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sso(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    eta: float = 1.0,
    m: int = 5,
    inner_lr: float = 10.0,
    line_search: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """SSO (Lavington et al., 2023): :func:`scale_by_sso` then the learning rate.

    ``learning_rate`` multiplies the displacement :math:`\\theta^m - \\theta_t`
    of the inner loop; 1 (the default) is the paper's algorithm.

    Args:
      learning_rate: multiplier of SSO's step, float >= 0 or a schedule.
      eta: the official outer :math:`\\eta > 0`.
      m: inner steps per expensive gradient (official 5).
      inner_lr: the Armijo search's starting step (or the fixed inner step).
      line_search: Armijo inner steps (default) or fixed ones.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_sso(eta=eta, m=m, inner_lr=inner_lr, line_search=line_search),
        optax.scale_by_learning_rate(learning_rate),
    )
