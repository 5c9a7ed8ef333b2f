r"""Opposing signals: paired groups of training examples whose gradients pull against each other.

Rosenfeld & Risteski, "Outliers with Opposing Signals Have an Outsized Effect
on Neural Network Optimization" (ICLR 2024), https://arxiv.org/abs/2311.04163.
Paired groups of outliers carry large, consistent features whose gradients
point in opposite directions; training balances them in a narrow valley, and
as it sharpens their losses oscillate, high on one group then on the other.

Two ways to find them, both here:

* by gradients (:func:`opposing_signals`): stack the per-example gradients
  :math:`g_i = \nabla_\theta \ell_i(\theta)` into :math:`G \in \mathbb{R}^{N \times d}`,
  centre them (:math:`\tilde g_i = g_i - \bar g`, so the shared descent
  direction is removed), take the top right singular vector :math:`v` of
  :math:`\tilde G` (the direction along which the examples disagree most) and
  the projections :math:`c_i = \tilde g_i^\top v`. The ``k`` examples of
  largest :math:`c_i` and the ``k`` of most negative :math:`c_i` are the two
  opposing groups (sign fixed so the largest :math:`|c_i|` is positive). Their
  mean gradients have a negative cosine when the signals oppose.
* by loss changes (:func:`largest_loss_changes`), the paper's selection: the
  examples whose loss rose most and fell most between two iterates.

:func:`group_losses` tracks the mean loss of each group along training; the
script ``scripts/opposing_signals.py`` plots them next to the sharpness of
:func:`jaxopt_lab.diagnostics.edge_of_stability`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


class OpposingSignals(NamedTuple):
    positive: jax.Array  # (k,) indices of the largest projections, largest first
    negative: jax.Array  # (k,) indices of the most negative projections, most negative first
    projections: jax.Array  # (N,) c_i
    direction: jax.Array  # (d,) unit v, flat (ravel_pytree order)
    cosine: jax.Array  # cosine between the two groups' mean (uncentred) gradients


def _check_k(k: Any, n: int) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be a positive int, got {k!r}") from None
    if k < 1 or 2 * k > n:
        raise ValueError(f"k must be in [1, N/2] for N = {n} examples, got {k}")
    return k


def per_example_gradients(loss_fn: Callable[..., jax.Array], params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """``(N, d)`` flat gradients of ``loss_fn(params, x_i, y_i)`` (one example, no batch axis) for every i."""
    flat, unravel = ravel_pytree(params)
    return jax.vmap(lambda xi, yi: ravel_pytree(jax.grad(lambda f: loss_fn(unravel(f), xi, yi))(flat))[0])(x, y)


def opposing_signals_from_gradients(grads: jax.Array, k: int, center: bool = True) -> OpposingSignals:
    """The two opposing groups of ``k`` examples from ``(N, d)`` per-example gradients (module docstring)."""
    if grads.ndim != 2:
        raise ValueError(f"expected per-example gradients of shape (N, d), got {tuple(grads.shape)}")
    k = _check_k(k, grads.shape[0])
    g = grads.astype(jnp.promote_types(grads.dtype, jnp.float32))
    centred = g - g.mean(axis=0) if center else g
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    v = vt[0]
    c = centred @ v
    sign = jnp.where(c[jnp.argmax(jnp.abs(c))] < 0, -1.0, 1.0).astype(c.dtype)
    v, c = v * sign, c * sign
    order = jnp.argsort(c)
    pos, neg = order[::-1][:k], order[:k]
    mp, mn = g[pos].mean(0), g[neg].mean(0)
    cosine = mp @ mn / jnp.maximum(jnp.linalg.norm(mp) * jnp.linalg.norm(mn), jnp.finfo(g.dtype).tiny)
    return OpposingSignals(pos, neg, c, v, cosine)


def opposing_signals(loss_fn: Callable[..., jax.Array], params: Any, x: jax.Array, y: jax.Array, k: int = 10,
                     center: bool = True) -> OpposingSignals:
    """:func:`opposing_signals_from_gradients` of the per-example gradients of ``loss_fn`` at ``params``
    (``loss_fn(params, x_i, y_i)`` on one example). Memory: ``N x d`` floats."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different numbers of examples: {x.shape[0]} vs {y.shape[0]}")
    _check_k(k, x.shape[0])
    return opposing_signals_from_gradients(per_example_gradients(loss_fn, params, x, y), k, center)


def largest_loss_changes(loss_before: jax.Array, loss_after: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(rose, fell)``: the ``k`` examples whose loss rose most and the ``k`` whose loss fell most."""
    if loss_before.shape != loss_after.shape or loss_before.ndim != 1:
        raise ValueError(f"expected two (N,) loss vectors, got {loss_before.shape} and {loss_after.shape}")
    k = _check_k(k, loss_before.shape[0])
    order = jnp.argsort(loss_after - loss_before)
    return order[::-1][:k], order[:k]


def group_losses(per_example_losses: jax.Array, groups: Sequence[jax.Array]) -> jax.Array:
    """Mean loss of each group (index arrays) from ``(..., N)`` per-example losses: ``(..., len(groups))``."""
    return jnp.stack([per_example_losses[..., jnp.asarray(g)].mean(-1) for g in groups], axis=-1)
