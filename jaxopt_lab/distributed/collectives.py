r"""Sum and mean over the worker axis, fast when the axis is a vmapped one.

The multi-worker methods call :func:`psum` and :func:`pmean` here instead of
``jax.lax.psum`` / ``jax.lax.pmean``. The result is the same to float32
rounding; what differs is the program when the worker axis is a ``vmap`` axis
(``WorkerRunner(W, "vmap")``, or the k > 1 workers per device that
``shard_map`` mode vmaps inside each device):

* ``jax.lax.psum`` over a vmapped axis batches to a reduction over the
  leading (worker) dimension, and XLA:CPU runs that reduction 25--95x slower
  than adding the W slices (the mean of (8, 512, 2048) floats: ~135 ms
  against ~1.5 ms; ``scripts/bench_collectives.py``);
* here each vmapped name is summed as slices, in a fixed pairwise order
  :math:`((x_0 + x_1) + (x_2 + x_3)) + \dots` (deterministic, and the error
  grows as :math:`\log W`, not :math:`W`), and the sum is computed once for
  all workers (an ``optimization_barrier`` keeps XLA from fusing it into each
  worker's consumer, which would redo the W-slice sum per worker).

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


def _split(axis_name: AxisName) -> tuple[tuple, tuple]:
    """``(vmapped, mesh)`` names of ``axis_name``; every name is mesh when the mesh is unknown."""
    names, mesh = _names(axis_name), _mesh_axes()
    if mesh is None:
        return (), names
    return tuple(n for n in names if n not in mesh), tuple(n for n in names if n in mesh)


def _pairwise_sum(rows: list[jax.Array]) -> jax.Array:
    if len(rows) == 1:
        return rows[0]
    half = len(rows) // 2
    return _pairwise_sum(rows[:half]) + _pairwise_sum(rows[half:])


def _sum_slices(x: jax.Array, name: Any) -> jax.Array:
    """Sum of ``x`` over the vmapped axis ``name``, as slices in a fixed order (unbatched result)."""
    stacked = jax.lax.all_gather(x, name)  # under vmap: the batched array itself, (W, *x.shape)
    return _pairwise_sum([stacked[i] for i in range(stacked.shape[0])])


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
        sums = [_sum_slices(s, name) for s in sums]
    if mesh:
        sums = jax.lax.psum(sums, mesh)
    if mean:
        n = int(jax.lax.axis_size(axis_name))
        sums = [s / n for s in sums]  # as jax.lax.pmean: the sum divided by the axis size
    sums = jax.lax.optimization_barrier(sums)  # computed once, read by every worker
    for i, s in zip(fast, sums):
        out[i] = s
    return jax.tree.unflatten(treedef, out)


def psum(tree: Any, axis_name: AxisName) -> Any:
    """``jax.lax.psum(tree, axis_name)``; vmapped names summed as slices (module docstring)."""
    return _reduce(tree, axis_name, mean=False)


def pmean(tree: Any, axis_name: AxisName) -> Any:
    """``jax.lax.pmean(tree, axis_name)``; vmapped names summed as slices (module docstring)."""
    return _reduce(tree, axis_name, mean=True)
