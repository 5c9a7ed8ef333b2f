"""Communication accounting: the bytes a worker passed to collectives, kept in state.

Counts can exceed 2**31 (int32, the widest integer JAX uses without x64), so a
count is two int32s: whole MiB and the remainder in bytes. Every multi-worker
transform keeps a :class:`ByteCount` in its state and adds, at each collective,
the bytes of what it passed (shape × itemsize, values plus indices for sparse
payloads). :func:`communicated_bytes` reads them all from any state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_MIB = 1 << 20


class ByteCount(NamedTuple):
    """Bytes sent by one worker: ``mib * 2**20 + rem`` (both int32)."""

    mib: jax.Array
    rem: jax.Array


def zero_bytes() -> ByteCount:
    return ByteCount(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def add_bytes(count: ByteCount, nbytes) -> ByteCount:
    """``count + nbytes``; ``nbytes`` is a Python int or an int32 array below 2**31."""
    if isinstance(nbytes, int):
        mib, rem = divmod(nbytes, _MIB)
        rem = count.rem + rem
        return ByteCount(count.mib + mib + rem // _MIB, rem % _MIB)
    nbytes = jnp.asarray(nbytes, jnp.int32)
    rem = count.rem + nbytes % _MIB
    return ByteCount(count.mib + nbytes // _MIB + rem // _MIB, rem % _MIB)


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (static: from shapes and dtypes)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _is_count(x: Any) -> bool:
    return isinstance(x, ByteCount)


def communicated_bytes(state: Any) -> np.ndarray:
    """Total bytes in every ByteCount of ``state`` (per worker if the state is stacked).

    Returns a float64 numpy array (a scalar for one worker's state, shape (W,) for
    the stacked state of W workers).
    """
    total = np.zeros(())
    for node in jax.tree.leaves(state, is_leaf=_is_count):
        if _is_count(node):
            total = total + np.asarray(node.mib, np.float64) * _MIB + np.asarray(node.rem, np.float64)
    return total
