r"""FedAvg: the example-weighted mean of the participants' model changes.

McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data" (AISTATS 2017),
https://arxiv.org/abs/1602.05629. Server optimizers over the same
pseudo-gradient (FedAvgM, FedAdam, FedYogi): Reddi et al., "Adaptive Federated
Optimization" (ICLR 2021), https://arxiv.org/abs/2003.00295.

Each round the server samples m of the N clients (``SyncRound(m)``), sends them
:math:`\theta_t`, each runs local SGD to :math:`\theta^k_{t}` and the server sets

.. math::

   \Delta_t = \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j} (\theta_t - \theta^k_t),
   \qquad \theta_{t+1} = \theta_t - \eta_s \Delta_t

(:math:`\eta_s = 1`: the plain weighted average of the client models).
"""

from __future__ import annotations

import optax

from jaxopt_lab.distributed.federated.aggregate import aggregate_pseudo_gradients, server_step


def scale_by_fedavg(weighting: str = "examples") -> optax.GradientTransformationExtraArgs:
    """The FedAvg direction :math:`\\Delta_t` (no learning rate), for chaining with any server optimizer.

    Args:
      weighting: ``"examples"`` (:math:`n_k / \\sum n_j`, the paper) or ``"uniform"``.

    Returns:
      A transform over a stack of pseudo-gradients (extra args ``mask``,
      ``num_examples``); see :mod:`jaxopt_lab.distributed.federated.aggregate`.
    """
    return aggregate_pseudo_gradients(weighting, "constant")


def fedavg(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    weighting: str = "examples",
) -> optax.GradientTransformationExtraArgs:
    """FedAvg (``momentum=None``) or FedAvgM: ``chain(scale_by_fedavg(weighting), sgd(learning_rate, momentum))``.

    For FedAdam/FedYogi chain ``scale_by_fedavg()`` with ``optax.adam``/``optax.yogi``.
    Run it with the ``SyncRound(m)`` trigger (partial participation m of N).

    Args:
      learning_rate: server learning rate :math:`\\eta_s` (1: plain averaging).
      momentum: server momentum (FedAvgM), None for none.
      nesterov: Nesterov server momentum.
      weighting: ``"examples"`` or ``"uniform"``.
    """
    return server_step(scale_by_fedavg(weighting), learning_rate, momentum, nesterov)
