"""diffGrad: Adam whose step is damped where the gradient changes little.

Dubey, Chakraborty, Roy, Mukherjee, Singh & Chaudhuri, "diffGrad: An
Optimization Method for Convolutional Neural Networks", IEEE TNNLS 31(11), 2020
(arXiv 2019), https://arxiv.org/abs/1909.11015.

Conventions follow the authors' corrected code (``diffGrad_v2.py`` in
github.com/shivram1987/diffGrad) and ``torch_optimizer.DiffGrad``, which
compute the same step; see :func:`scale_by_diffgrad`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms._numerics import abs_sq, compute_dtype, one_minus, one_minus_power, unzip
from jaxopt_lab.transforms.weight_decay import _add_scaled_params


class ScaleByDiffGradState(NamedTuple):
    """State of :func:`scale_by_diffgrad`."""

    count: jax.Array  # steps taken, int32 scalar
    mu: optax.Updates  # first moment (EMA of gradients), not bias-corrected
    nu: optax.Updates  # second moment (EMA of squared gradients), not bias-corrected
    prev_grad: optax.Updates  # gradient of the previous step (zeros before the first)


def scale_by_diffgrad(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    r"""Rescale updates by diffGrad's friction-damped Adam direction.

    With gradient :math:`g_t` (step :math:`t = 1, 2, \dots`) and
    :math:`g_0 = 0`, elementwise:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2, \\
        \xi_t &= \operatorname{sigmoid}(|g_{t-1} - g_t|)
               = \frac{1}{1 + e^{-|g_{t-1} - g_t|}} \in [\tfrac12, 1), \\
        u_t &= \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
               \frac{\xi_t\, m_t}{\sqrt{v_t} + \epsilon}
             = \frac{\xi_t\, \hat m_t}{\sqrt{\hat v_t} + \epsilon / \sqrt{1 - \beta_2^t}} .

    The friction coefficient :math:`\xi_t` is close to 1/2 where the gradient
    barely changes (near an optimum) and close to 1 where it changes fast.

    Conventions (those of ``torch_optimizer.DiffGrad`` and the authors'
    ``diffGrad_v2.py``): :math:`\epsilon` is added to :math:`\sqrt{v_t}` *before*
    bias correction (the step-size form at the end of Kingma & Ba's Section 2),
    whereas the paper's equation, :func:`optax.scale_by_adam` and today's
    ``torch.optim.Adam`` add it to :math:`\sqrt{\hat v_t}`;
    :math:`\xi_t` multiplies the bias-corrected first moment only in the step,
    the stored :math:`m_t` is undamped; :math:`g_0 = 0`, so the first step has
    :math:`\xi_1 = \operatorname{sigmoid}(|g_1|)`; :math:`g_{t-1}` is the true
    previous gradient, L2 term included. (The authors' first version and
    ``torch_optimizer`` store a reference to ``p.grad``: with
    ``zero_grad(set_to_none=False)`` the next backward pass overwrites it in
    place and :math:`\xi_t` is always 1/2; PyTorch >= 2.0's default
    ``set_to_none=True`` gives the rule above, which ``diffGrad_v2.py``
    guarantees by cloning.)

    The arithmetic is done in float32 (or the gradient's wider type); the
    moments and the previous gradient are stored in the parameters' dtype, the
    updates are returned in the gradients' dtype.

    Args:
      b1: decay rate :math:`\beta_1` of the first moment, in [0, 1).
      b2: decay rate :math:`\beta_2` of the second moment, in [0, 1).
      eps: :math:`\epsilon`, added to :math:`\sqrt{v_t}`; >= 0.

    Returns:
      An ``optax.GradientTransformation`` (no params needed); chain it with
      :func:`optax.scale_by_learning_rate`, as :func:`diffgrad` does.
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return ScaleByDiffGradState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), prev_grad=zeros())

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        beta1, beta2 = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
        step_scale = jnp.sqrt(one_minus_power(b2, count)) / one_minus_power(b1, count)

        def leaf(g, m, v, g_prev):
            ct = compute_dtype(g.dtype)
            gf = g.astype(ct)
            m_new = beta1.astype(ct) * m.astype(ct) + one_minus(b1, ct) * gf
            v_new = beta2.astype(ct) * v.astype(ct) + one_minus(b2, ct) * abs_sq(gf)
            friction = jax.nn.sigmoid(jnp.abs(g_prev.astype(ct) - gf))
            u = step_scale.astype(ct) * friction * m_new / (jnp.sqrt(v_new) + jnp.asarray(eps, ct))
            return u.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype), g.astype(g_prev.dtype)

        out = jax.tree.map(leaf, updates, state.mu, state.nu, state.prev_grad)
        u, mu, nu, prev = unzip(jax.tree.structure(updates), out, 4)
        return u, ScaleByDiffGradState(count=count, mu=mu, nu=nu, prev_grad=prev)

    return optax.GradientTransformation(init_fn, update_fn)


def diffgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    r"""The diffGrad optimizer (Dubey et al., 2019).

    .. math::
        \tilde g_t = g_t + \lambda \theta_{t-1}, \qquad
        \theta_t = \theta_{t-1} - \eta_t\, u_t(\tilde g_1, \dots, \tilde g_t)

    with :math:`u_t` the direction of :func:`scale_by_diffgrad`. As in
    ``torch_optimizer.DiffGrad``, ``weight_decay`` is a *coupled* L2 penalty:
    :math:`\lambda\theta` is added to the gradient before the moments and the
    friction are computed (so the stored previous gradient includes it). It is
    the chain of that L2 term (``optax.add_decayed_weights(weight_decay)``, but
    keeping the gradients' dtype), :func:`scale_by_diffgrad` and
    ``optax.scale_by_learning_rate(learning_rate)``.

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or an optax schedule.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{v_t}` (before bias correction); >= 0.
      weight_decay: L2 coefficient :math:`\lambda` >= 0 (or a schedule), added
        to the gradient.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.non_negative("learning_rate", learning_rate)
    check.non_negative("weight_decay", weight_decay)
    return optax.chain(
        _add_scaled_params(weight_decay, 1.0, None, "diffgrad"),
        scale_by_diffgrad(b1=b1, b2=b2, eps=eps),
        optax.scale_by_learning_rate(learning_rate),
    )
