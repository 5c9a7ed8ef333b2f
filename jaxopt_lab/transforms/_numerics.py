"""Small numerical helpers shared by the single-worker transformations."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def one_minus_power(decay: Any, count: jax.Array) -> jax.Array:
    r"""Adam's bias correction :math:`1 - \beta^t` in float32, accurate for :math:`\beta` near 1.

    ``1 - jnp.float32(0.999) ** t`` is off by about 1e-5 relative, because 0.999
    is not a float32; PyTorch optimizers compute it in float64. For a Python
    number :math:`\beta` we take :math:`\log\beta` in float64 and evaluate
    :math:`-\operatorname{expm1}(t\log\beta)`, exact to float32 rounding. A
    traced :math:`\beta` (``optax.inject_hyperparams``) is used as it is.
    """
    t = jnp.asarray(count).astype(jnp.float32)
    if isinstance(decay, (int, float)):
        if decay == 0:
            return jnp.where(t > 0, jnp.float32(1), jnp.float32(0))
        return -jnp.expm1(t * jnp.float32(math.log(decay)))
    return 1 - jnp.asarray(decay, jnp.float32) ** t


def one_minus(decay: Any, dtype) -> jax.Array:
    r""":math:`1 - \beta` in ``dtype``, formed in float64 when :math:`\beta` is a Python number.

    ``1 - jnp.float32(0.999)`` is off by about 1e-5 relative; PyTorch forms
    ``1 - beta2`` in float64 too. Keeps the moments consistent with
    :func:`one_minus_power`.
    """
    if isinstance(decay, (int, float)):
        return jnp.asarray(1.0 - decay, dtype)
    return 1 - jnp.asarray(decay, dtype)


def abs_sq(x: jax.Array) -> jax.Array:
    """:math:`|x|^2`, real (``x * conj(x)`` for complex ``x``), as ``optax``'s Adam squares gradients."""
    if jnp.iscomplexobj(x):
        return (x.conj() * x).real
    return jnp.square(x)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the arithmetic is done in: float32, or ``dtype`` if wider."""
    return jnp.promote_types(dtype, jnp.float32)


def unzip(treedef, tree_of_tuples, n: int) -> tuple:
    """Split a tree whose leaves (of ``treedef``) are n-tuples into n trees."""
    columns = list(zip(*treedef.flatten_up_to(tree_of_tuples))) if treedef.num_leaves else [()] * n
    return tuple(treedef.unflatten(c) for c in columns)
