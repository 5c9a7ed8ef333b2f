r"""FedFix: aggregate whatever arrived in a fixed wall-clock window.

Fraboni, Vidal, Kameni & Lorenzi, "A General Theory for Federated Optimization
with Asynchronous and Heterogeneous Clients Updates" (2022; JMLR 2023); code:
https://github.com/Accenture/Labs-Federated-Learning (branch ``asynchronous_FL``).

Every :math:`\Delta t` simulated seconds (``trigger=TimeWindow(period)``) the
server aggregates the clients that finished during the window,

.. math::

   \theta_{n+1} = \theta_n - \eta \sum_{i \in A_n} \frac{n_i d_i}{\sum_{j \in A_n} n_j d_j}\, s(\tau_i)\, \Delta_i,
   \qquad d_i = \frac{t_n - t^\text{sent}_i}{\Delta t},

and sends the new model to exactly those clients; the others keep working on
their older model and contribute in a later window. :math:`d_i` is the number
of windows client i's update took (the paper's :math:`\lceil T_i / \Delta t \rceil`):
a client that contributes once every :math:`d_i` windows is weighted
:math:`d_i` times as much when it does, so that over time every client counts
in proportion to its data :math:`n_i` whatever its speed (the paper's
condition for the optimum to be the federated problem's; without it the fast
clients' data would dominate). The paper applies the weights
:math:`p_i d_i` unnormalized; we divide by their sum over the window (the
self-normalized form of the same estimator: the step does not grow or shrink
with how many clients are in flight). Clients that finish early idle until the
window closes. A window in which nothing arrived leaves the model unchanged.
Default :math:`s \equiv 1`; a staleness function (``staleness=``; staleness
counted in server steps, so empty windows do not count) damps stale updates
further. ``weighting="uniform"`` drops :math:`n_i`, not :math:`d_i`.

The simulator passes ``elapsed_time`` (:math:`t_n - t^\text{sent}_i`) to the rule.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.federated.aggregate import WEIGHTINGS, aggregate_pseudo_gradients, server_step
from jaxopt_lab.distributed.federated.staleness import StalenessFn


def scale_by_fedfix(
    weighting: str = "examples", staleness: str | StalenessFn | None = "constant", **staleness_kwargs
) -> optax.GradientTransformationExtraArgs:
    """The FedFix direction over one window's arrivals, each weighted by its data and its windows
    in flight (module docstring; no learning rate). Needs the extra argument ``elapsed_time``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    mean = aggregate_pseudo_gradients("examples", staleness, **staleness_kwargs)

    def update_fn(updates, state, params=None, **extra):
        elapsed = extra.get("elapsed_time")
        if elapsed is None:
            raise ValueError("fedfix needs elapsed_time (time since each arrival was sent): run it in FederatedSimulator")
        elapsed = jnp.asarray(elapsed, jnp.float32)
        counts = extra.get("num_examples") if weighting == "examples" else None
        counts = jnp.ones_like(elapsed) if counts is None else jnp.asarray(counts, jnp.float32)
        return mean.update(updates, state, params, **{**extra, "num_examples": counts * elapsed})

    return optax.GradientTransformationExtraArgs(mean.init, update_fn)


def fedfix(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    weighting: str = "examples",
    staleness: str | StalenessFn | None = "constant",
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """FedFix: ``chain(scale_by_fedfix(weighting, staleness), sgd(learning_rate, momentum))``;
    run it with ``trigger=TimeWindow(period)``."""
    return server_step(scale_by_fedfix(weighting, staleness, **staleness_kwargs), learning_rate, momentum, nesterov)
