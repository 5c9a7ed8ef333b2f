"""Periodic synchronization decided on the host: no collective on a step that does not synchronize.

A method that synchronizes every H steps (DiLoCo, Streaming DiLoCo, local
SGD/QSR) can decide *in the graph*, with ``lax.cond`` on its step counter. That
is right under ``shard_map`` with one worker per device, but under ``vmap``
(simulated workers, or k > 1 workers per device inside ``shard_map``) the
counter is batched, the ``cond`` becomes a ``select`` that runs both branches,
and the compiled program all-reduces and takes the outer step on *every* inner
step while the byte count says 1/H.

So the decision is made on the host, between two compiled programs:

* every periodically synchronizing transform takes a **static** extra argument
  ``update(..., sync=...)``, a Python value fixed at trace time:
  ``None`` (the default) decides in the graph as before; ``-1`` (or ``False``)
  traces the step with no synchronization at all (no collective, no outer
  step); ``0`` (or ``True``) traces the synchronizing step of a whole-model
  method; Streaming DiLoCo takes the fragment index ``p`` that synchronizes;
  A value that disagrees with the state's schedule is not checked (that
  would need the in-graph predicate again): it skips or adds a
  synchronization, so pass what ``next_sync`` says or leave it to
  ``map_sync``;
* their states keep ``next_sync``, computed in the graph: what the *next*
  update synchronizes (-1: nothing), so the host never replays a schedule
  (QSR's depends on the learning rate) and a restored checkpoint carries it;
* :func:`next_sync` reads those flags from any tree of states on the host
  (through ``optax.chain``, ``optax.MultiSteps``, a trainer's state);
* :meth:`WorkerRunner.map_sync <jaxopt_lab.distributed.WorkerRunner.map_sync>`
  compiles one program per value (two for DiLoCo) and calls the one the flags
  name. The trainer runs every multi-worker method through it.

Deciding on the host also avoids what a real (unbatched) ``cond`` costs: the
copy of the state its two branches return.

The same holds for the low-rank optimizers' projector refresh (GaLore, Fira,
Q-GaLore, APOLLO as the inner optimizer of a worker-axis method): their
``update(..., refresh=False)`` traces no decomposition, and
:func:`static_decisions` passes it when no projector in the tree is due
(``count < next_refresh``); on a step where one is due the in-graph decision
runs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

NO_SYNC = -1


def _has_flag(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields") and "next_sync" in x._fields


def sync_flags(tree: Any) -> list[jax.Array]:
    """The ``next_sync`` arrays of every periodically synchronizing state in ``tree``."""
    return [node.next_sync for node in jax.tree.leaves(tree, is_leaf=_has_flag) if _has_flag(node)]


def next_sync(tree: Any) -> int | None:
    """The static ``sync`` value the next update of the states in ``tree`` needs, read on the host.

    Returns None when ``tree`` holds no periodically synchronizing state, else
    -1 (no synchronization) or the unit that synchronizes (0 for a whole-model
    method, the fragment for Streaming DiLoCo). ``tree`` may be worker-stacked;
    host numpy arrays or fully addressable jax arrays (in several processes,
    gather them first, e.g. with ``WorkerRunner.get``).

    Raises:
      ValueError: if the workers, or two transforms in the tree, disagree (the
        decision is one per program; pass ``sync`` yourself then).
    """
    return agreed_sync(sync_flags(tree))


def agreed_sync(flags: list[Any]) -> int | None:
    """The one value the ``next_sync`` arrays in ``flags`` agree on (None if there are none); see :func:`next_sync`."""
    if not flags:
        return None
    values = {int(v) for flag in flags for v in np.ravel(np.asarray(flag))}
    if len(values) != 1:
        raise ValueError(
            f"the states disagree on the next synchronization ({sorted(values)} across {len(flags)} transform(s) "
            f"and their workers): one compiled step can take one decision; pass sync= explicitly"
        )
    return values.pop()


def _is_low_rank(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields") and {"count", "next_refresh"} <= set(x._fields)


def refresh_counters(tree: Any) -> list[tuple[jax.Array, jax.Array]]:
    """``(count, next_refresh)`` of every low-rank state in ``tree`` (a projector is due when count >= next)."""
    return [(node.count, node.next_refresh) for node in jax.tree.leaves(tree, is_leaf=_is_low_rank)
            if _is_low_rank(node)]


def static_decisions(flags: list[Any], counters: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The static extra arguments the next update needs, from host copies of :func:`sync_flags` and
    :func:`refresh_counters`: ``sync`` if there are flags, ``refresh=False`` if there are low-rank
    states and none of their projectors is due (else nothing: decided in the graph)."""
    out: dict[str, Any] = {}
    sync = agreed_sync(flags)
    if sync is not None:
        out["sync"] = sync
    if counters and not any(
        np.any(np.asarray(count)[..., None] >= np.asarray(nxt)) for count, nxt in counters
    ):
        out["refresh"] = False
    return out


def check_sync(sync: Any, units: int, name: str) -> int | None:
    """``sync`` as an int in [-1, units) (or None), with a clear error for anything else.

    ``True``/``False`` mean 0/-1, allowed only where there is one unit (the whole model).
    """
    if sync is None:
        return None
    if isinstance(sync, (bool, np.bool_)):
        if units != 1 and sync:
            raise ValueError(f"{name}: sync=True is ambiguous with {units} fragments: pass the fragment index")
        return 0 if sync else NO_SYNC
    if isinstance(sync, (int, np.integer)) and NO_SYNC <= int(sync) < units:
        return int(sync)
    if isinstance(sync, jax.Array) or hasattr(sync, "aval"):
        raise ValueError(f"{name}: sync must be a static Python value (bool or int), got a traced/array value; "
                         "leave it None to decide in the graph")
    raise ValueError(f"{name}: sync must be None, a bool, or an int in [-1, {units}), got {sync!r}")
