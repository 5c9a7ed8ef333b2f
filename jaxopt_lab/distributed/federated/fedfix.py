r"""FedFix: aggregate whatever arrived in a fixed wall-clock window.

Fraboni, Vidal, Kameni & Lorenzi, "A General Theory for Federated Optimization
with Asynchronous and Heterogeneous Clients Updates" (2022; JMLR 2023).

Every :math:`\Delta t` simulated seconds (``trigger=TimeWindow(period)``) the
server aggregates the clients that finished during the window,

.. math::

   \theta_{n+1} = \theta_n - \eta \sum_{i \in A_n} \frac{n_i}{\sum_{j \in A_n} n_j}\, s(\tau_i)\, \Delta_i,

and sends the new model to exactly those clients; the others keep working on
their older model and contribute in a later window (their update is then stale
by :math:`\tau_i` windows). Clients that finish early idle until the window
closes, so the server never waits for stragglers but still aggregates in
synchronous-looking batches. A window in which nothing arrived leaves the model
unchanged. Default :math:`s \equiv 1` (the paper's FedFix aggregates stale
updates unweighted); pass a staleness function to damp them.
"""

from __future__ import annotations

import optax

from jaxopt_lab.distributed.federated.aggregate import aggregate_pseudo_gradients, server_step
from jaxopt_lab.distributed.federated.staleness import StalenessFn


def scale_by_fedfix(
    weighting: str = "examples", staleness: str | StalenessFn | None = "constant", **staleness_kwargs
) -> optax.GradientTransformationExtraArgs:
    """The FedFix direction over one window's arrivals (no learning rate)."""
    return aggregate_pseudo_gradients(weighting, staleness, **staleness_kwargs)


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
