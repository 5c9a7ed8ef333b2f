r"""FedFix: aggregate whatever arrived in a fixed wall-clock window.

Fraboni, Vidal, Kameni & Lorenzi, "A General Theory for Federated Optimization
with Asynchronous and Heterogeneous Clients Updates" (2022; JMLR 2023); code:
https://github.com/Accenture/Labs-Federated-Learning (branch ``asynchronous_FL``).

Every :math:`\Delta t` simulated seconds (``trigger=TimeWindow(period)``) the
server aggregates the clients that finished during the window,

.. math::

   \theta_{n+1} = \theta_n - \eta \sum_{i \in A_n} p_i\, d_i\, s(\tau_i)\, \Delta_i,
   \qquad p_i = \frac{n_i}{\sum_{j=1}^{N} n_j}, \qquad d_i = \frac{t_n - t^\text{sent}_i}{\Delta t},

and sends the new model to exactly those clients; the others keep working on
their older model and contribute in a later window. :math:`d_i` is the number
of windows client i's update took (the paper's :math:`\lceil T_i / \Delta t \rceil`):
a client that contributes once every :math:`d_i` windows is weighted
:math:`d_i` times as much when it does, so that over time every client counts
in proportion to its data :math:`n_i` whatever its speed (the paper's
condition for the optimum to be the federated problem's; without it the fast
clients' data would dominate). :math:`p_i` is the client's share of *all* N
clients' data (``weighting="uniform"``: :math:`1/N`), and the weights
:math:`p_i d_i` are applied unnormalized, as the official ``Server.clients_importances``
(``agg_weights = ceil(tau_i / delta_t) * P``) and ``Server.aggregation``
(``new = g_model + lr_g * sum_i d_i (received_i - sent_i)``) of
Accenture/Labs-Federated-Learning (``FL/server.py``) do: a window's step is
about the fraction of the federation's data that arrived in it. So the
default needs ``period`` (:math:`\Delta t`) and ``num_clients`` (uniform) or
``total_examples`` (:math:`\sum_j n_j`, examples). ``normalize="window"`` divides the
weights by their sum over the window instead (the self-normalized form this
library used before: every non-empty window steps as far as a full FedAvg round,
whatever fraction of the clients is in flight; it needs neither). Clients that
finish early idle until the window closes. A window in which nothing arrived
leaves the model unchanged. Default :math:`s \equiv 1` (official); a staleness
function (``staleness=``; staleness counted in server steps, so empty windows do
not count) damps stale updates further.

The simulator passes ``elapsed_time`` (:math:`t_n - t^\text{sent}_i`) to the rule.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.federated._checks import check_int, check_positive
from jaxopt_lab.distributed.federated.aggregate import (
    WEIGHTINGS,
    AggregateState,
    _leading,
    aggregate_pseudo_gradients,
    server_step,
    weighted_sum,
)
from jaxopt_lab.distributed.federated.staleness import StalenessFn, staleness_function

NORMALIZATIONS = ("clients", "window")


def scale_by_fedfix(
    weighting: str = "examples",
    staleness: str | StalenessFn | None = "constant",
    *,
    normalize: str = "clients",
    period: float | None = None,
    num_clients: int | None = None,
    total_examples: float | None = None,
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """The FedFix direction over one window's arrivals (module docstring; no learning rate):
    :math:`\\sum_i p_i d_i s(\\tau_i) \\Delta_i`. Needs the extra argument ``elapsed_time``.

    Args:
      weighting: ``"examples"`` (:math:`p_i = n_i / \\sum_{j \\le N} n_j`) or ``"uniform"`` (:math:`1/N`).
      staleness: staleness function or name (default constant, as the official code).
      normalize: ``"clients"`` (default, official: the weights :math:`p_i d_i` unnormalized)
        or ``"window"`` (divided by their sum over the window's arrivals; opt-in, see the module docstring).
      period: the window length :math:`\\Delta t` in simulated seconds (``normalize="clients"``).
      num_clients: N, the number of all clients (``normalize="clients"``, ``weighting="uniform"``).
      total_examples: :math:`\\sum_j n_j` over all N clients (``normalize="clients"``, ``weighting="examples"``).
      **staleness_kwargs: the staleness function's ``a`` / ``b``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"FedFix normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    period = None if period is None else check_positive("FedFix period", period)
    total_examples = None if total_examples is None else check_positive("FedFix total_examples", total_examples)
    if num_clients is not None:
        num_clients = check_int("FedFix num_clients", num_clients, 1)
    if normalize == "clients":
        if period is None:
            raise ValueError("FedFix with normalize='clients' (the official unnormalized weights p_i d_i) needs "
                             "period, the window length in simulated seconds; got None")
        if weighting == "uniform" and num_clients is None:
            raise ValueError("FedFix with normalize='clients' and weighting='uniform' (p_i = 1/N) needs num_clients; "
                             "got None")
        if weighting == "examples" and total_examples is None:
            raise ValueError("FedFix with normalize='clients' and weighting='examples' (p_i = n_i / sum_j n_j) needs "
                             "total_examples, the example count of all clients; got None")
    fn = staleness_function(staleness, **staleness_kwargs)
    mean = aggregate_pseudo_gradients("examples", fn)

    def update_fn(updates, state, params=None, **extra):
        elapsed = extra.get("elapsed_time")
        if elapsed is None:
            raise ValueError("fedfix needs elapsed_time (time since each arrival was sent): run it in FederatedSimulator")
        elapsed = jnp.asarray(elapsed, jnp.float32)
        counts = extra.get("num_examples") if weighting == "examples" else None
        counts = jnp.ones_like(elapsed) if counts is None else jnp.asarray(counts, jnp.float32)
        if normalize == "window":
            return mean.update(updates, state, params, **{**extra, "num_examples": counts * elapsed})
        n = _leading(updates)
        mask = extra.get("mask")
        mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)
        tau = extra.get("staleness")
        tau = jnp.zeros((n,), jnp.int32) if tau is None else tau
        share = counts / (total_examples if weighting == "examples" else num_clients)
        weights = jnp.where(mask, share * (elapsed / period) * fn(tau), 0.0)
        return weighted_sum(updates, weights, mask), AggregateState(state.count + 1)

    return optax.GradientTransformationExtraArgs(mean.init, update_fn)


def fedfix(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    weighting: str = "examples",
    staleness: str | StalenessFn | None = "constant",
    *,
    normalize: str = "clients",
    period: float | None = None,
    num_clients: int | None = None,
    total_examples: float | None = None,
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """FedFix: ``chain(scale_by_fedfix(...), sgd(learning_rate, momentum))``; run it with
    ``trigger=TimeWindow(period)`` and the same ``period``. The official code's server step is
    plain SGD with ``lr_g`` (momentum is an extension). Arguments: see :func:`scale_by_fedfix`."""
    direction = scale_by_fedfix(weighting, staleness, normalize=normalize, period=period, num_clients=num_clients,
                                total_examples=total_examples, **staleness_kwargs)
    return server_step(direction, learning_rate, momentum, nesterov)
