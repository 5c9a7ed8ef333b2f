r"""FedProx: FedAvg whose clients minimize a proximal objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in
Heterogeneous Networks" (MLSys 2020), https://arxiv.org/abs/1812.06127.

Client k, sent :math:`\theta_t`, approximately minimizes

.. math:: h_k(w) = F_k(w) + \frac{\mu}{2} \lVert w - \theta_t \rVert^2,

i.e. each local step adds :math:`\mu (w - \theta_t)` to its gradient; the server
aggregates exactly as FedAvg. So FedProx is a *client-side* option:
``make_local_update(..., prox_mu=mu)`` (or :func:`fedprox_local_update`) with the
:func:`fedprox` (= :func:`~jaxopt_lab.distributed.federated.fedavg`) server rule.
"""

from __future__ import annotations

import optax

from jaxopt_lab.distributed.federated.fedavg import fedavg
from jaxopt_lab.distributed.federated.local import make_local_update


def fedprox_local_update(loss_fn, data, optimizer, batch_size: int, mu: float, *, shuffle: bool = True):
    """A local update with the proximal term :math:`\\frac{\\mu}{2}\\lVert w - \\theta_t\\rVert^2`, ``mu > 0``.

    Same arguments as :func:`~jaxopt_lab.distributed.federated.make_local_update`.
    """
    if not (isinstance(mu, (int, float)) and not isinstance(mu, bool) and mu > 0):
        raise ValueError(f"FedProx mu must be a number > 0, got {mu!r}")
    return make_local_update(loss_fn, data, optimizer, batch_size, prox_mu=mu, shuffle=shuffle)


def fedprox(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    weighting: str = "examples",
) -> optax.GradientTransformationExtraArgs:
    """The FedProx server rule: identical to :func:`fedavg` (the proximal term lives in the clients)."""
    return fedavg(learning_rate, momentum, nesterov, weighting)
