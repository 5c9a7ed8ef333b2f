r"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek & Huba, "Federated Learning with
Buffered Asynchronous Aggregation" (AISTATS 2022), https://arxiv.org/abs/2106.06639.

The server keeps ``concurrency`` clients training at all times; each client
trains from the model it was sent and returns its change
:math:`\Delta_i = \theta_{t-\tau_i} - x_i`. Arrivals go into a buffer; once it
holds K updates the server steps

.. math::

   \bar\Delta = \frac1K \sum_{i=1}^{K} s(\tau_i)\, \Delta_i, \qquad
   s(\tau) = \frac{1}{\sqrt{1 + \tau}}, \qquad
   \theta \leftarrow \theta - \eta_g \bar\Delta,

and clears the buffer (Algorithm 1 of the paper; the staleness weight is the
paper's :math:`1/\sqrt{1+\tau}`). Run it with ``trigger=Buffer(K)`` (K about 10)
and ``concurrency >= K``. With ``weighting="examples"`` the mean is weighted by
the clients' example counts instead of :math:`1/K`.
"""

from __future__ import annotations

import optax

from jaxopt_lab.distributed.federated.aggregate import aggregate_pseudo_gradients, server_step
from jaxopt_lab.distributed.federated.staleness import StalenessFn


def scale_by_fedbuff(
    staleness: str | StalenessFn | None = "polynomial",
    weighting: str = "uniform",
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """The FedBuff direction :math:`\\bar\\Delta` (no learning rate).

    Args:
      staleness: staleness function or name; default ``"polynomial"`` with ``a=0.5``
        (:math:`1/\\sqrt{1+\\tau}`).
      weighting: ``"uniform"`` (:math:`1/K`, the paper) or ``"examples"``.
      **staleness_kwargs: the staleness function's ``a`` / ``b``.
    """
    if staleness == "polynomial" and not staleness_kwargs:
        staleness_kwargs = {"a": 0.5}
    return aggregate_pseudo_gradients(weighting, staleness, **staleness_kwargs)


def fedbuff(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    staleness: str | StalenessFn | None = "polynomial",
    weighting: str = "uniform",
    **staleness_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """FedBuff: ``chain(scale_by_fedbuff(staleness, weighting), sgd(learning_rate, momentum))``.

    Args:
      learning_rate: server learning rate :math:`\\eta_g`.
      momentum: optional server momentum.
      nesterov: Nesterov server momentum.
      staleness, weighting, staleness_kwargs: see :func:`scale_by_fedbuff`.
    """
    return server_step(scale_by_fedbuff(staleness, weighting, **staleness_kwargs), learning_rate, momentum, nesterov)
