r"""FedCompass: a computing-power-aware scheduler so that arrivals come in groups.

Z. Li et al., "FedCompass: Efficient Cross-Silo Federated Learning on
Heterogeneous Client Devices using a Computing Power Aware Scheduler" (ICLR
2024); code: https://github.com/APPFL/FedCompass.

The server estimates each client's time per local step :math:`\hat t_k` from its
past round trips (``(arrival - dispatch) / steps``) and gives it a number of
local steps :math:`Q_k` so that it arrives together with a *group* of other
clients. In the simulator (``trigger=Compass(q_min, q_max)``): a client
dispatched at time :math:`t` joins the open group :math:`g` whose deadline
:math:`T_g` allows the most steps within bounds,

.. math:: Q_k = \lfloor (T_g - t) / \hat t_k \rfloor, \quad q_\min \le Q_k \le q_\max,

and otherwise opens a new group with :math:`Q_k = q_\max`,
:math:`T = t + q_\max \hat t_k`. Clients with no estimate yet use the nominal
step time. When the last in-flight member of a group arrives the server
aggregates every arrival since its previous step (a group, possibly with early
members of other groups) as the official ``FedCompassAggregator`` (APPFL) does:

.. math::

   \alpha_i = \frac{\alpha\, s(\tau_i)}{N}, \qquad
   \theta \leftarrow \Bigl(1 - \sum_i \alpha_i\Bigr)\theta + \sum_i \alpha_i x_i
          = \theta - \sum_i \alpha_i (\theta - x_i),

with :math:`N` the number of *all* clients (not of the group), mixing
:math:`\alpha = 0.9` and :math:`s(\tau) = (1+\tau)^{-1/2}` (the staleness
function of the official configs). So a group of 2 of 10 clients moves the
model by :math:`\approx 0.18` of the way to its members' mean, not all the way.
The pseudo-gradient is taken against the *current* server model,
:math:`\theta - x_i`: run the simulator with ``pseudo_gradient="current"`` (the
experiment runner does for ``rule = "fedcompass"``). APPFL's example configs set
``gradient_based: True`` (clients send :math:`\theta_\text{sent} - x_i`): that is
``pseudo_gradient="dispatch"`` with the same rule. ``normalize="group"`` gives
the group-normalized form this library used before (see :func:`scale_by_fedcompass`).

The server then re-dispatches the arrived clients with new step counts. The
clients dispatched together are assigned fastest first, and an open group is
joined where it allows the most steps (both as the official scheduler does).
Simplifications against it: no "latest-time factor" :math:`\lambda` (a group
waits for its last member); a new group always gets :math:`q_\max` steps (the
official code may size it to arrive with an existing group); :math:`\hat t_k`
is the last round trip's, not a moving average of them.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.distributed.federated.aggregate import (
    WEIGHTINGS,
    _leading,
    arrival_weights,
    server_step,
    weighted_sum,
)
from jaxopt_lab.distributed.federated.staleness import StalenessFn, staleness_function

NORMALIZATIONS = ("clients", "group")


class ScaleByFedCompassState(NamedTuple):
    count: jax.Array  # server steps aggregated so far (int32)


def _check_alpha(alpha):
    """A number in (0, 1]; a traced value (``optax.inject_hyperparams`` under jit) is let through."""
    if isinstance(alpha, (bool, str)) or alpha is None:
        raise TypeError(f"FedCompass mixing alpha must be a number, got {alpha!r}")
    check.require("FedCompass mixing alpha", alpha, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    return alpha


def _check_num_clients(num_clients):
    """None, an int >= 1 (a concrete integer array too), or a traced value, let through."""
    if num_clients is None or isinstance(num_clients, jax.core.Tracer):
        return num_clients
    if isinstance(num_clients, bool):
        raise TypeError(f"FedCompass num_clients must be an int, got {num_clients!r}")
    try:
        num_clients = operator.index(num_clients)
    except TypeError:
        raise TypeError(f"FedCompass num_clients must be an int, got {num_clients!r}") from None
    if num_clients < 1:
        raise ValueError(f"FedCompass num_clients must be >= 1, got {num_clients}")
    return num_clients


def _unwrap(staleness_kwargs: dict) -> dict:
    """``optax.inject_hyperparams`` binds the factory's signature and passes ``**staleness_kwargs``
    on as one keyword, ``staleness_kwargs={...}``: unpack it."""
    kwargs = dict(staleness_kwargs)
    return {**kwargs.pop("staleness_kwargs", {}), **kwargs}


def scale_by_fedcompass(
    num_clients: int | None = None,
    alpha: float = 0.9,
    staleness: str | StalenessFn | None = "polynomial",
    *,
    normalize: str = "clients",
    weighting: str = "uniform",
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    r"""The FedCompass aggregation of one server step's arrivals (a descent direction).

    .. math::

       u = \alpha \sum_i w_i\, s(\tau_i)\, \Delta_i, \qquad
       w_i = \begin{cases} 1/N & \text{normalize = "clients" (official)} \\
                            c_i / \sum_{j \in \text{arrivals}} c_j & \text{normalize = "group"} \end{cases}

    with :math:`c_i` the example count (``weighting="examples"``) or 1; masked
    arrivals count 0. ``sgd(1.0)`` after it (:func:`fedcompass`) steps
    :math:`\theta \leftarrow \theta - u`.

    Args:
      num_clients: N, the number of all clients (required for ``normalize="clients"``).
      alpha: mixing weight in (0, 1] (official: 0.9). Under ``optax.inject_hyperparams``
        ``alpha`` and ``num_clients`` may be injected (traced values are not checked).
      staleness: staleness function or name; default ``"polynomial"`` with ``a=0.5``,
        as the official FedCompass configs.
      normalize: ``"clients"`` (default): each arrival weighs :math:`\alpha/N`, as the
        official ``FedCompassAggregator``; a group of k clients moves the model
        :math:`\approx k\alpha/N` of the way to its mean. ``"group"``: the weights
        are normalized over the arrivals of this step, so every group steps as far
        as a full FedAvg round whatever its size (N/k times the official step: 5x for
        k = 2 of N = 10); an opt-in difference for runs where groups are small and a
        per-group FedAvg step is wanted. With ``alpha=1.0`` and ``weighting="examples"``
        it is the rule jaxopt_lab used before (5.6x the official step for 2 of 10).
      weighting: ``"uniform"`` or ``"examples"`` (only with ``normalize="group"``:
        the official rule weighs every client :math:`1/N`).
      **staleness_kwargs: the named staleness function's ``a`` / ``b``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"FedCompass normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    staleness_kwargs = _unwrap(staleness_kwargs)
    num_clients = _check_num_clients(num_clients)
    if normalize == "clients":
        if num_clients is None:
            raise ValueError("FedCompass with normalize='clients' (the official rule, alpha_i = alpha s(tau_i) / N) "
                             "needs num_clients, the number of all clients N; got None")
        if weighting != "uniform":
            raise ValueError(f"FedCompass weighting={weighting!r} needs normalize='group': the official rule "
                             "weighs every client 1/N")
    alpha = _check_alpha(alpha)
    if staleness == "polynomial" and not staleness_kwargs:
        staleness_kwargs = {"a": 0.5}
    fn = staleness_function(staleness, **staleness_kwargs)

    def init_fn(params):
        del params
        return ScaleByFedCompassState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        del params
        n = _leading(updates)
        if normalize == "group":
            weights, mask = arrival_weights(n, weighting, fn, extra)
        else:  # alpha_i / alpha = s(tau_i) / N, whatever arrived
            mask = extra.get("mask")
            mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)
            tau = extra.get("staleness")
            tau = jnp.zeros((n,), jnp.int32) if tau is None else tau
            weights = jnp.where(mask, fn(tau) / num_clients, 0.0)
        direction = weighted_sum(updates, weights * jnp.asarray(alpha, jnp.float32), mask)
        return direction, ScaleByFedCompassState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fedcompass(
    num_clients: int | None = None,
    alpha: float = 0.9,
    staleness: str | StalenessFn | None = "polynomial",
    *,
    normalize: str = "clients",
    weighting: str = "uniform",
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    r"""FedCompass server rule: ``chain(scale_by_fedcompass(...), sgd(learning_rate, momentum))``.

    With the defaults (``learning_rate=1``, no momentum) this is the official
    :math:`\theta \leftarrow (1 - \sum_i \alpha_i)\theta + \sum_i \alpha_i x_i`,
    :math:`\alpha_i = \alpha s(\tau_i)/N`, when run with ``pseudo_gradient="current"``
    and ``trigger=Compass(q_min, q_max)`` (which sets the local step counts). The
    server learning rate and momentum are extensions (the official code has none).
    Arguments: see :func:`scale_by_fedcompass`.
    """
    direction = scale_by_fedcompass(num_clients, alpha, staleness, normalize=normalize, weighting=weighting,
                                    **_unwrap(staleness_kwargs))
    return server_step(direction, learning_rate, momentum, nesterov)
