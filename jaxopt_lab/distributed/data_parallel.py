"""Data parallelism as a transformation: average the gradient over workers every step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from jaxopt_lab.distributed.accounting import ByteCount, add_bytes, tree_bytes, zero_bytes

AxisName = Any  # a name, or a tuple of names (several workers per device)


class DataParallelState(NamedTuple):
    inner_state: optax.OptState
    bytes_sent: ByteCount


def data_parallel(
    inner: optax.GradientTransformation, axis_name: AxisName = "workers"
) -> optax.GradientTransformation:
    r"""Synchronous data parallelism (the baseline every distributed method is measured against).

    Each worker :math:`w` computes its gradient :math:`g_w` on its own batch; all
    workers then apply the inner optimizer to the same average

    .. math:: \bar g = \frac{1}{W} \sum_w g_w \quad (\texttt{pmean over axis\_name}),

    so the workers' parameters stay identical. Each step a worker sends its full
    gradient: ``tree_bytes(grads)`` bytes (4 · n_params in fp32), counted in
    ``state.bytes_sent``.

    Args:
      inner: any optax transformation, applied to the averaged gradient.
      axis_name: the worker axis the step runs over.

    Returns:
      An ``optax.GradientTransformation`` to be run once per worker under a
      named worker axis (see ``jaxopt_lab.distributed.WorkerRunner``).
    """

    def init_fn(params):
        return DataParallelState(inner.init(params), zero_bytes())

    def update_fn(updates, state, params=None):
        mean = jax.lax.pmean(updates, axis_name)
        updates, inner_state = inner.update(mean, state.inner_state, params)
        return updates, DataParallelState(inner_state, add_bytes(state.bytes_sent, tree_bytes(mean)))

    return optax.GradientTransformation(init_fn, update_fn)
