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
members of other groups),

.. math:: \theta \leftarrow \theta - \eta \sum_i \frac{n_i}{\sum_j n_j}\, s(\tau_i)\, \Delta_i,

with :math:`s(\tau) = (1+\tau)^{-1/2}` by default, and re-dispatches the arrived
clients with new step counts. The clients dispatched together are assigned
fastest first, and an open group is joined where it allows the most steps
(both as the official scheduler does). Simplifications against it: no
"latest-time factor" :math:`\lambda` (a group waits for its last member); a new
group always gets :math:`q_\max` steps (the official code may size it to
arrive with an existing group); :math:`\hat t_k` is the last round trip's, not
a moving average of them.
"""

from __future__ import annotations

import optax

from jaxopt_lab.distributed.federated.aggregate import aggregate_pseudo_gradients, server_step
from jaxopt_lab.distributed.federated.staleness import StalenessFn


def scale_by_fedcompass(
    weighting: str = "examples", staleness: str | StalenessFn | None = "polynomial", **staleness_kwargs
) -> optax.GradientTransformationExtraArgs:
    """The FedCompass aggregation over one group's arrivals (no learning rate)."""
    if staleness == "polynomial" and not staleness_kwargs:
        staleness_kwargs = {"a": 0.5}
    return aggregate_pseudo_gradients(weighting, staleness, **staleness_kwargs)


def fedcompass(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    weighting: str = "examples",
    staleness: str | StalenessFn | None = "polynomial",
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """FedCompass server rule: ``chain(scale_by_fedcompass(...), sgd(learning_rate, momentum))``;
    run it with ``trigger=Compass(q_min, q_max)``, which sets the local step counts."""
    return server_step(scale_by_fedcompass(weighting, staleness, **staleness_kwargs), learning_rate, momentum, nesterov)
