"""Hessian-vector products of a scalar loss, on pytrees of parameters.

Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation
6(1), 1994; forward-over-reverse as in the JAX autodiff cookbook.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _check_same_structure(params: PyTree, v: PyTree, name: str = "v") -> None:
    p_def, v_def = jax.tree.structure(params), jax.tree.structure(v)
    if p_def != v_def:
        raise ValueError(f"{name} must have the structure of params: got {v_def}, params have {p_def}")
    for p, x in zip(jax.tree.leaves(params), jax.tree.leaves(v)):
        if jnp.shape(p) != jnp.shape(x):
            raise ValueError(f"{name} leaf of shape {jnp.shape(x)} does not match param of shape {jnp.shape(p)}")


def _acc_dtype(tree: PyTree):
    """The widest leaf dtype, at least float32: the dtype reductions accumulate in."""
    return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in jax.tree.leaves(tree)])


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """sum over leaves of <a, b>, accumulated in at least float32."""
    dtype = jnp.result_type(_acc_dtype(a), _acc_dtype(b))
    parts = [jnp.vdot(x.astype(dtype), y.astype(dtype)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return sum(parts, jnp.zeros((), dtype))


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    r"""Hessian-vector product :math:`H v` with :math:`H = \nabla^2_\theta L(\theta)`.

    .. math::
        H v = \frac{\partial}{\partial \epsilon}\, \nabla L(\theta + \epsilon v)\Big|_{\epsilon=0}

    computed forward-over-reverse (``jax.jvp`` of ``jax.grad``): one gradient's
    cost and memory, never the Hessian. Pure and jit-able.

    Args:
      loss_fn: ``params -> scalar``; close over the batch (inside ``jax.jit``
        a fresh closure per batch costs no retracing).
      params: pytree of floating arrays :math:`\theta`.
      v: pytree of ``params``' structure and shapes; cast to the params' dtypes.

    Returns:
      :math:`H v`, a pytree like ``params``.
    """
    _check_same_structure(params, v)
    v = jax.tree.map(lambda p, x: jnp.asarray(x, jnp.result_type(p)), params, v)
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _hvp_fn(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> Callable[[PyTree], PyTree]:
    """v -> H v at ``params``, for loops of many products.

    Plain forward-over-reverse each time rather than ``jax.linearize``: the
    latter would keep every intermediate of the gradient alive for the whole
    loop, and on small models it also compiles and runs slower.
    """
    grad_fn = jax.grad(loss_fn)
    return lambda v: jax.jvp(grad_fn, (params,), (v,))[1]
