"""Hutchinson's stochastic estimator of the Hessian trace.

Hutchinson, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines", Communications in Statistics - Simulation and
Computation 19(2), 1990; used for neural networks in Yao et al., "PyHessian"
(2020), https://arxiv.org/abs/1912.07145.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxopt_lab.diagnostics.hvp import _acc_dtype, _hvp_fn, _tree_vdot

PyTree = Any


def hutchinson_trace(
    loss_fn: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array, num_samples: int = 100
) -> jax.Array:
    r"""Unbiased estimate of :math:`\operatorname{tr} \nabla^2 L(\theta)` from Rademacher probes.

    .. math::
        \widehat{\operatorname{tr}}\, H = \frac{1}{m} \sum_{k=1}^{m} v_k^\top H v_k,
        \qquad v_k \in \{-1, +1\}^{d} \text{ i.i.d. uniform}

    :math:`\mathbb{E}[v v^\top] = I` makes it unbiased; its variance is
    :math:`\frac{2}{m}\big(\lVert H\rVert_F^2 - \sum_i H_{ii}^2\big)`, the
    smallest for probes with i.i.d. zero-mean, unit-variance entries (exact
    for diagonal :math:`H`).
    The :math:`m` Hessian-vector products (:func:`hvp`) run in a ``lax.scan``,
    so memory is that of one product. Pure and jit-able.

    Args:
      loss_fn: ``params -> scalar``.
      params: pytree of floating arrays.
      key: ``jax.random`` key for the probes.
      num_samples: number of probes :math:`m \ge 1` (a Python int).

    Returns:
      A scalar (float32 or wider).
    """
    try:
        m = operator.index(num_samples)
    except TypeError:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}") from None
    if m < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    h = _hvp_fn(loss_fn, params)
    flat, unravel = ravel_pytree(params)

    def body(total, k):
        # one flat draw, not one per leaf: a fraction of the compile time
        v = unravel(jax.random.rademacher(k, flat.shape, flat.dtype))
        return total + _tree_vdot(v, h(v)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), _acc_dtype(params)), jax.random.split(key, m))
    return total / m
