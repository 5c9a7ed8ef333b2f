r"""FedAsync: mix each arriving client model into the server model, damped by staleness.

Xie, Koyejo & Gupta, "Asynchronous Federated Optimization" (OPT 2020),
https://arxiv.org/abs/1903.03934.

When the model :math:`x` of a client that was sent :math:`\theta_{t-1-\tau}`
arrives (:math:`\tau` server updates ago; 0 for a fresh one, as APPFL and
FLSim count it; the paper's :math:`t - \tau` is our :math:`\tau + 1`), the server sets

.. math::

   \alpha_t = \alpha\, s(\tau), \qquad
   \theta_t = (1 - \alpha_t)\, \theta_{t-1} + \alpha_t\, x
            = \theta_{t-1} - \alpha_t (\theta_{t-1} - x),

with mixing :math:`\alpha \in (0, 1]` and a staleness function :math:`s`
(constant, polynomial, hinge; :mod:`.staleness`). The pseudo-gradient is taken
against the *current* server model, :math:`\theta_{t-1} - x`: run the simulator
with ``pseudo_gradient="current"`` and ``trigger=every_arrival()``. With more than
one arrival per server step the mixed direction is averaged over them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.federated._checks import check_real
from jaxopt_lab.distributed.federated.aggregate import _leading, arrival_weights, weighted_sum
from jaxopt_lab.distributed.federated.staleness import StalenessFn, staleness_function


class ScaleByFedAsyncState(NamedTuple):
    count: jax.Array  # server steps taken (the schedule's step)


def _check_alpha(alpha):
    if callable(alpha):
        return alpha
    if getattr(alpha, "shape", None) == () and not isinstance(alpha, bool):
        alpha = alpha.item()  # a numpy / jax scalar
    alpha = check_real("FedAsync mixing alpha", alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"FedAsync mixing alpha must be in (0, 1], got {alpha!r}")
    return alpha


def scale_by_fedasync(
    alpha: optax.ScalarOrSchedule = 0.6,
    staleness: str | StalenessFn | None = "polynomial",
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """The FedAsync direction :math:`\\alpha\\, s(\\tau)(\\theta_{t-1} - x)` (averaged over arrivals).

    Args:
      alpha: mixing weight in (0, 1], or a schedule of the server step.
      staleness: staleness function or name (default ``"polynomial"``, ``a=0.5``).
      **staleness_kwargs: its ``a`` / ``b``.
    """
    alpha = _check_alpha(alpha)
    if staleness == "polynomial" and not staleness_kwargs:
        staleness_kwargs = {"a": 0.5}
    fn = staleness_function(staleness, **staleness_kwargs)

    def init_fn(params):
        del params
        return ScaleByFedAsyncState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        del params
        weights, mask = arrival_weights(_leading(updates), "uniform", fn, extra)
        a = alpha(state.count) if callable(alpha) else alpha
        direction = weighted_sum(updates, weights * jnp.asarray(a, jnp.float32), mask)
        return direction, ScaleByFedAsyncState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fedasync(
    alpha: optax.ScalarOrSchedule = 0.6,
    staleness: str | StalenessFn | None = "polynomial",
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """FedAsync: ``chain(scale_by_fedasync(alpha, staleness), scale(-1))``, i.e.
    :math:`\\theta \\leftarrow (1-\\alpha_t)\\theta + \\alpha_t x`.

    Use with ``trigger=every_arrival()`` and ``pseudo_gradient="current"``.
    """
    return optax.chain(scale_by_fedasync(alpha, staleness, **staleness_kwargs), optax.scale(-1.0))
