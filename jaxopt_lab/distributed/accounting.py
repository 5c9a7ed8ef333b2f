r"""Communication accounting: payload bytes and wire bytes per worker, kept in state.

Every multi-worker transform keeps a :class:`CommBytes` in its state (the field
``bytes_sent``) and adds, at each collective, two counts computed from the
shapes and dtypes of what it passed (values plus indices and scales for
compressed payloads):

payload bytes
  What the worker handed to collectives: the tree once per all-reduce (the
  parameter-server convention: a worker uploads its vector once), its
  compressed payload once per compressed mean, and every point-to-point
  message of a gossip round (``ppermute``). :func:`communicated_bytes`.

wire bytes per worker
  What the worker puts on the network under a stated model, so that methods of
  different families compare on the same footing (:func:`wire_bytes`), with W
  the number of workers:

  - dense all-reduce (``pmean`` / ``psum`` of n bytes): a ring all-reduce, a
    reduce-scatter then an all-gather of W chunks of n/W bytes, each worker
    sending :math:`2(W-1)/W \cdot n` (and receiving as much), rounded up to a
    whole byte (:func:`ring_all_reduce_bytes`);
  - compressed payloads (quantized or sparse, which cannot be summed in
    flight; ``compressed_pmean``): an all-gather, each worker receiving the
    :math:`W-1` payloads of the others, counted as :math:`(W-1) \cdot p` with
    its own payload p (exact for fixed-size payloads, top-k and quantizers; for
    payloads whose size varies by worker, DGC, exact in the mean over workers,
    which the trainer logs);
  - gossip (``ppermute``): the messages the worker sends, wire = payload;
  - one worker (W = 1) puts nothing on the wire.

  Not counted: latency, headers, and diagnostics that a deployed system would
  not run (the consensus distance of gossip) or scalars (DiLoCo's count of the
  workers present).

So data parallelism on W = 8 workers puts 1.75 n on the wire per step and a
ring gossip round 2 n: 1.14x, not the 2x their payloads suggest.

Counts can exceed 2**31 (int32, the widest integer JAX uses without x64), so a
count is two int32s: whole MiB and the remainder in bytes (:class:`ByteCount`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_MIB = 1 << 20
_HALF = 1 << 10  # sqrt(MiB): splits a remainder so that remainder * times fits int32


class ByteCount(NamedTuple):
    """Bytes of one worker: ``mib * 2**20 + rem`` (both int32)."""

    mib: jax.Array
    rem: jax.Array


class CommBytes(NamedTuple):
    """What one worker communicated: payload and wire bytes (see the module docstring)."""

    payload: ByteCount
    wire: ByteCount


def zero_bytes() -> ByteCount:
    return ByteCount(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def zero_comm() -> CommBytes:
    return CommBytes(zero_bytes(), zero_bytes())


def add_bytes(count: ByteCount, nbytes, times: int = 1) -> ByteCount:
    """``count + times * nbytes``, exactly.

    ``nbytes`` is a Python int or an int32 array below 2**31; ``times`` a Python
    int >= 0 below 2**21 (the product may exceed 2**31; a count holds up to
    2**31 MiB).
    """
    if not isinstance(times, int) or isinstance(times, bool) or not 0 <= times < 1 << 21:
        raise ValueError(f"times must be an int in [0, 2**21), got {times!r}")
    if isinstance(nbytes, int):
        mib, rem = divmod(nbytes * times, _MIB)
        rem = count.rem + rem
        return ByteCount(count.mib + mib + rem // _MIB, rem % _MIB)
    nbytes = jnp.asarray(nbytes, jnp.int32)
    mib, rem = nbytes // _MIB * times, nbytes % _MIB  # rem * times = (hi * 2**10 + lo) * times
    hi, lo = (rem // _HALF) * times, (rem % _HALF) * times
    mib = mib + hi // _HALF
    rem = count.rem + (hi % _HALF) * _HALF + lo % _MIB
    return ByteCount(count.mib + mib + lo // _MIB + rem // _MIB, rem % _MIB)


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (static: from shapes and dtypes)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def axis_size(axis_name: Any) -> int:
    """W, the number of workers along ``axis_name`` (a name or a tuple of names), at trace time."""
    return int(jax.lax.axis_size(axis_name))


def ring_all_reduce_bytes(nbytes: int, num_workers: int) -> int:
    """Bytes one worker sends in a ring all-reduce of ``nbytes``: ``ceil(2 (W-1) n / W)``."""
    return -(-2 * (num_workers - 1) * nbytes // num_workers)


def add_pmean_bytes(count: CommBytes, nbytes, axis_name: Any, compressed: bool = False) -> CommBytes:
    """``count`` plus one worker's part in a mean over the worker axis of a tree of ``nbytes``.

    Payload: ``nbytes``. Wire: a ring all-reduce, ``ceil(2 (W-1) / W * nbytes)``
    (``nbytes`` a Python int); with ``compressed`` an all-gather of the payloads,
    ``(W-1) * nbytes`` (``nbytes`` may be an int32 array).
    """
    w = axis_size(axis_name)
    if compressed:
        wire = add_bytes(count.wire, nbytes, times=w - 1)
    else:
        if not isinstance(nbytes, int):
            raise TypeError(f"a dense all-reduce has static bytes (a Python int), got {nbytes!r}")
        wire = add_bytes(count.wire, ring_all_reduce_bytes(nbytes, w))
    return CommBytes(add_bytes(count.payload, nbytes), wire)


def add_message_bytes(count: CommBytes, nbytes, times: int = 1) -> CommBytes:
    """``count`` plus ``times`` point-to-point messages of ``nbytes`` (gossip): payload = wire."""
    return CommBytes(add_bytes(count.payload, nbytes, times), add_bytes(count.wire, nbytes, times))


def _is_count(x: Any) -> bool:
    return isinstance(x, (CommBytes, ByteCount))


def _total(state: Any, field: str) -> np.ndarray:
    total = np.zeros(())
    for node in jax.tree.leaves(state, is_leaf=_is_count):
        if isinstance(node, CommBytes):
            node = getattr(node, field)
        elif not (isinstance(node, ByteCount) and field == "payload"):
            continue
        total = total + np.asarray(node.mib, np.float64) * _MIB + np.asarray(node.rem, np.float64)
    return total


def communicated_bytes(state: Any) -> np.ndarray:
    """Total payload bytes in every count of ``state`` (per worker if the state is stacked).

    Reads the ``payload`` of every :class:`CommBytes` and every bare
    :class:`ByteCount`. Returns a float64 numpy array (a scalar for one worker's
    state, shape (W,) for the stacked state of W workers).
    """
    return _total(state, "payload")


def wire_bytes(state: Any) -> np.ndarray:
    """Total wire bytes per worker in every :class:`CommBytes` of ``state`` (the model: module docstring).

    Returns a float64 numpy array (a scalar, or shape (W,) for a stacked state).
    """
    return _total(state, "wire")
