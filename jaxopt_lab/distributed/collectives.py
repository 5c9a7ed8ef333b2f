r"""Sum and mean over the worker axis, fast when the axis is a vmapped one.

The multi-worker methods call :func:`psum` and :func:`pmean` here instead of
``jax.lax.psum`` / ``jax.lax.pmean``. The result is the same to float32
rounding; what differs is the program when the worker axis is a ``vmap`` axis
(``WorkerRunner(W, "vmap")``, or the k > 1 workers per device that
``shard_map`` mode vmaps inside each device):

* ``jax.lax.psum`` over a vmapped axis batches to a reduction over the
  leading (worker) dimension, which XLA:CPU runs several times slower than
  adding the W slices (the mean of (8, 512, 2048) floats: 0.16x the time;
  DDP's step 1.3-1.4x and DiLoCo's synchronizing step 1.7-2.1x faster;
  ``scripts/bench_collectives.py``, BENCHMARKS.md);
* here each vmapped name is summed as slices, ``x_0 + x_1 + ... + x_{W-1}``
  in that order (deterministic; float32 error grows as W, fine for the tens
  of workers a vmap holds), in a loop that writes the sum once, for all
  workers. The loop matters: an unrolled sum of slices is fused by XLA into
  each worker's consumer of the (broadcast) result and computed W times, and
  ``optimization_barrier`` does not stop that on CPU (it is removed before
  fusion). That is the CPU program: lowered for GPU or TPU (chosen at
  lowering, by ``jax.lax.platform_dependent``) the same gathered stack is
  reduced with ``jnp.sum``, since there a loop costs W - 1 kernel launches
  and the slow reduce is XLA:CPU's (not measured on a GPU yet).

A name that is an axis of the current mesh (a ``shard_map`` axis, where the
sum is a real all-reduce between devices) goes to ``jax.lax.psum`` unchanged,
so under ``shard_map`` with one worker per device nothing changes, and with
the runner's tuple ``("devices", "workers")`` the vmapped ``"workers"`` is
summed as slices and ``"devices"`` all-reduced. Non-float leaves (integer
counters) go to ``jax.lax`` as they are.

The slices come from ``jax.lax.all_gather`` over the vmapped name, which
``vmap`` turns into the batched array itself (no copy, no communication);
it is never used on a mesh axis, where it would be a real all-gather.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp

AxisName = Any  # a name, or a tuple of names


def _names(axis_name: AxisName) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _mesh_axes() -> frozenset | None:
    """The axis names of the mesh being traced under (``shard_map``), or None if JAX cannot say."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    if get is None:  # older JAX: take the lax path everywhere
        return None
    return frozenset(get().axis_names)


_LAX_ONLY = contextvars.ContextVar("jaxopt_lab_lax_collectives", default=False)


@contextlib.contextmanager
def lax_collectives():
    """While tracing inside this block, :func:`psum` and :func:`pmean` are ``jax.lax``'s.

    For a worker axis that ``vmap`` shards over devices (``spmd_axis_name``,
    workers spanning devices): there the worker dimension is split across
    devices, so adding its slices would move each slice between devices
    (several collectives across workers where one all-reduce does).
    """
    token = _LAX_ONLY.set(True)
    try:
        yield
    finally:
        _LAX_ONLY.reset(token)


def _split(axis_name: AxisName) -> tuple[tuple, tuple]:
    """``(vmapped, mesh)`` names of ``axis_name``; every name is mesh when the mesh is unknown."""
    names, mesh = _names(axis_name), _mesh_axes()
    if mesh is None or _LAX_ONLY.get():
        return (), names
    return tuple(n for n in names if n not in mesh), tuple(n for n in names if n in mesh)


def _sum_slices(leaves: list[jax.Array], name: Any) -> list[jax.Array]:
    """Sums of ``leaves`` over the vmapped axis ``name``: ``x_0 + x_1 + ... + x_{W-1}`` in that order.

    ``all_gather`` over a vmapped name is the batched array itself, (W, *x.shape),
    unbatched. The slices are added in a loop (not unrolled), so the sum is one
    buffer written once: unrolled, XLA fuses the W-slice sum into each worker's
    consumer of the broadcast result and computes it W times.
    """
    stacked = [jax.lax.all_gather(x, name) for x in leaves]

    def in_a_loop(*stacked):  # XLA:CPU
        add_row = lambda i, acc: [a + s[i] for a, s in zip(acc, stacked)]  # noqa: E731
        return jax.lax.fori_loop(1, stacked[0].shape[0], add_row, [s[0] for s in stacked])

    def reduced(*stacked):  # GPU/TPU reduce the leading axis well; a loop there is W - 1 launches
        return [jnp.sum(s, axis=0) for s in stacked]

    return jax.lax.platform_dependent(*stacked, cpu=in_a_loop, default=reduced)


def _reduce(tree: Any, axis_name: AxisName, mean: bool) -> Any:
    vmapped, mesh = _split(axis_name)
    lax_op = jax.lax.pmean if mean else jax.lax.psum
    if not vmapped:
        return lax_op(tree, axis_name)
    leaves, treedef = jax.tree.flatten(tree)
    fast = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not fast:
        return lax_op(tree, axis_name)
    out = list(leaves)
    rest = [i for i in range(len(leaves)) if i not in set(fast)]
    if rest:
        for i, r in zip(rest, lax_op([leaves[i] for i in rest], axis_name)):
            out[i] = r
    sums = [jnp.asarray(leaves[i]) for i in fast]
    for name in vmapped:
        sums = _sum_slices(sums, name)
    if mesh:
        sums = jax.lax.psum(sums, mesh)
    if mean:
        n = int(jax.lax.axis_size(axis_name))
        sums = [s / n for s in sums]  # as jax.lax.pmean: the sum divided by the axis size
    for i, s in zip(fast, sums):
        out[i] = s
    return jax.tree.unflatten(treedef, out)


def psum(tree: Any, axis_name: AxisName) -> Any:
    """``jax.lax.psum(tree, axis_name)``; vmapped names summed as slices (module docstring)."""
    return _reduce(tree, axis_name, mean=False)


def pmean(tree: Any, axis_name: AxisName) -> Any:
    """``jax.lax.pmean(tree, axis_name)``; vmapped names summed as slices (module docstring)."""
    return _reduce(tree, axis_name, mean=True)
