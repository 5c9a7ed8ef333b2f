"""Independent weight decay, and coordinate-wise gradient clipping.

Wortsman, Liu, Xiao, Everett, Alemi, Adlam, Co-Reyes, Gur, Kumar, Novak,
Pennington, Sohl-Dickstein, Xu, Lee, Gilmer & Kornblith, "Small-scale proxies
for large-scale Transformer training instabilities" (ICLR 2024),
https://arxiv.org/abs/2309.14322 ("independent" weight decay).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check


class AddScaledParamsState(NamedTuple):
    """Steps taken (read by a weight-decay schedule)."""

    count: jax.Array  # int32 scalar


def _add_scaled_params(
    coefficient: optax.ScalarOrSchedule,
    sign: float,
    mask: Any | Callable[[optax.Params], Any] | None,
    name: str,
) -> optax.GradientTransformation:
    """``u + sign * c_t * params`` leaf by leaf, in the updates' dtype; ``c_t`` a float or ``c(count)``."""

    def init_fn(params):
        del params
        return AddScaledParamsState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs params: call update(updates, state, params)")
        c = coefficient(state.count) if callable(coefficient) else coefficient

        def leaf(u, p):
            ct = jnp.promote_types(u.dtype, jnp.float32)
            return (u.astype(ct) + sign * jnp.asarray(c, ct) * p.astype(ct)).astype(u.dtype)

        return jax.tree.map(leaf, updates, params), AddScaledParamsState(optax.safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def independent_weight_decay(
    weight_decay: optax.ScalarOrSchedule,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    r"""Weight decay that is not multiplied by the learning rate (Wortsman et al., 2023).

    Put it *last* in a chain, after the learning-rate scaling:

    .. math::
        u_t \leftarrow u_t - \lambda_t\, \theta_{t-1}, \qquad
        \theta_t = \theta_{t-1} + u_t ,

    so each step shrinks the parameters by the factor :math:`1 - \lambda_t`
    whatever the learning rate :math:`\eta`. PyTorch's and optax's AdamW decay
    by :math:`\eta\lambda` instead (``optax.add_decayed_weights`` placed before
    ``scale_by_learning_rate``), which couples the two hyperparameters: a
    learning-rate sweep then also sweeps the effective decay. The paper
    decouples them so that learning-rate sensitivity can be measured alone.

    The paper still anneals the decay with the shape of the learning-rate
    schedule, :math:`\lambda_t = \lambda\, s(t)` with :math:`\max_t s(t) = 1`;
    pass that as a schedule, e.g. ``lambda t: 1e-4 * sched(t) / peak_lr``. The
    schedule is evaluated at this transform's own step count (0 on the first
    update), as ``optax.scale_by_schedule`` does::

        optax.chain(optax.adam(sched), independent_weight_decay(lambda t: 1e-4 * sched(t) / peak))

    Args:
      weight_decay: :math:`\lambda` >= 0, a float or a schedule ``step -> λ_t``.
      mask: which parameters decay: a pytree of bools with the structure of the
        params (or a prefix of it), or a callable ``params -> that pytree``, as
        in :func:`optax.add_decayed_weights`. ``None`` decays every parameter.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``. The
      updates keep their dtype (the product is formed in float32 or wider).
    """
    check.non_negative("weight_decay", weight_decay)
    return _add_scaled_params(weight_decay, -1.0, mask, "independent_weight_decay")


def clip_by_coordinate(max_abs: float) -> optax.GradientTransformation:
    r"""Clip every coordinate of the updates to :math:`[-c, c]`.

    .. math:: u_i \leftarrow \min(\max(u_i, -c), c)

    This is exactly :func:`optax.clip` (which it returns) under a name that says
    what it does, with the argument checked. Placed first in a chain it clips
    the raw gradients coordinate by coordinate (the norm is not preserved,
    unlike :func:`optax.clip_by_global_norm`)::

        optax.chain(clip_by_coordinate(1.0), optax.adam(1e-3))

    Args:
      max_abs: :math:`c` > 0.

    Returns:
      A stateless ``optax.GradientTransformation``.
    """
    check.positive("max_abs", max_abs)
    return optax.clip(max_abs)
