"""Adaptive batch size by the norm test (AdAdaGrad), as a trainer option.

Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
Gradient Methods" (2024), https://arxiv.org/abs/2402.11215; the norm test of
Byrd, Chin, Nocedal & Wu (2012).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_norm_test_statistics(loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]):
    """A jitted ``(params, x, y) -> (sum_i ||g_i - g_B||², ||g_B||²)`` from per-example gradients.

    ``loss_fn(params, x, y)`` is the mean loss of a batch; per-example gradients
    are its gradient on batches of one, vmapped.
    """

    def statistics(params, x, y):
        per_example = jax.vmap(lambda xi, yi: jax.grad(loss_fn)(params, xi[None], yi[None]))(x, y)
        mean = jax.tree.map(lambda g: g.mean(axis=0), per_example)
        spread = sum(jnp.sum(jnp.square(g - m[None])) for g, m in zip(jax.tree.leaves(per_example), jax.tree.leaves(mean)))
        return spread, jnp.square(optax.tree.norm(mean))

    return jax.jit(statistics)


def next_batch_size(batch_size: int, spread: float, grad_norm_sq: float, eta: float, base: int, maximum: int) -> int:
    r"""The batch size after a norm test at batch size b.

    With the sample variance :math:`s^2 = \frac{1}{b-1}\sum_i \lVert g_i - g_B \rVert^2`
    the test passes when :math:`s^2 / b \le \eta^2 \lVert g_B \rVert^2`. When it
    fails the batch grows to :math:`\lceil s^2 / (\eta^2 \lVert g_B \rVert^2) \rceil`,
    rounded up to a multiple of ``base`` (the configured batch size, which bounds
    the number of distinct shapes to compile) and capped at ``maximum``. The batch
    size never shrinks.
    """
    if batch_size < 2 or grad_norm_sq <= 0.0:
        return batch_size
    variance = spread / (batch_size - 1)
    if variance / batch_size <= eta**2 * grad_norm_sq:
        return batch_size
    wanted = math.ceil(variance / (eta**2 * grad_norm_sq))
    return min(maximum, max(batch_size, base * math.ceil(wanted / base)))
