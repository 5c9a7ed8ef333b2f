"""The compressor protocol, the identity compressor, and a compressed all-reduce mean.

A compressor is what a worker applies to a tree (a gradient, or a DiLoCo outer
gradient) before putting it on the wire. It is written for one worker; the
collective is :func:`compressed_pmean`, run over a named worker axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.distributed import collectives
from jaxopt_lab.distributed.accounting import tree_bytes

PyTree = Any
AxisName = Any


class Compressor(NamedTuple):
    """A lossy (or lossless) encoder of a tree, seen through what the receivers decode.

    Attributes:
      init: ``init(tree) -> state``; ``tree`` has the shapes and dtypes of what
        will be compressed (params or updates); the state holds error-feedback
        buffers and the like (an empty tuple when there are none).
      compress: ``compress(tree, state, key, step) -> (decoded, new_state, nbytes)``.
        ``decoded`` is what the receivers reconstruct, ``decompress(compress(tree))``,
        with the shapes and dtypes of ``tree``; ``nbytes`` is an int32 scalar array,
        the bytes this worker puts on the wire for the payload (values, indices and
        scales). ``key`` is a PRNG key (stochastic rounding); ``step`` an int32
        scalar (schedules).
    """

    init: Callable[[PyTree], PyTree]
    compress: Callable[[PyTree, PyTree, jax.Array, jax.Array], tuple[PyTree, PyTree, jax.Array]]


def as_nbytes(n) -> jax.Array:
    """``n`` (a Python int or an integer array) as an int32 scalar array; must be below 2**31."""
    if isinstance(n, int) and not 0 <= n < 2**31:
        raise ValueError(f"one payload must be below 2**31 bytes, got {n}")
    return jnp.asarray(n, jnp.int32)


def leaf_keys(key: jax.Array, n: int) -> list[jax.Array]:
    """One independent key per leaf (``fold_in`` of the leaf's index)."""
    return [jax.random.fold_in(key, i) for i in range(n)]


def identity() -> Compressor:
    """No compression: ``decoded`` is ``tree`` itself, ``nbytes`` is ``tree_bytes(tree)``."""

    def init_fn(tree):
        del tree
        return ()

    def compress_fn(tree, state, key, step):
        del key, step
        return tree, state, as_nbytes(tree_bytes(tree))

    return Compressor(init_fn, compress_fn)


def compressed_pmean(
    tree: PyTree,
    state: PyTree,
    key: jax.Array,
    step: jax.Array,
    compressor: Compressor,
    axis_name: AxisName = "workers",
) -> tuple[PyTree, PyTree, jax.Array]:
    """Mean over the worker axis of what each worker's compressed payload decodes to.

    Each worker compresses its ``tree`` locally, then the decoded trees are
    averaged with ``collectives.pmean`` (a simulation of the all-gather / all-reduce
    of the payloads: the receivers decode each payload and average). Returns
    ``(mean, new_state, nbytes)`` with ``nbytes`` this worker's payload bytes;
    add them to the caller's :class:`~jaxopt_lab.distributed.accounting.CommBytes`
    with ``add_pmean_bytes(count, nbytes, axis_name, compressed=True)`` (on the
    wire an all-gather: each worker receives the W-1 other payloads).

    Give each worker its own ``key`` (e.g. ``fold_in`` of ``axis_index``) for
    independent stochastic rounding.
    """
    decoded, state, nbytes = compressor.compress(tree, state, key, step)
    return collectives.pmean(decoded, axis_name), state, nbytes
