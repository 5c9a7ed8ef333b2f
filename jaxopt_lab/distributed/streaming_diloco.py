"""Streaming DiLoCo: parameter fragments synchronized on a staggered schedule, overlapped, quantized.

Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch" (2025), https://arxiv.org/abs/2501.18512.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed import collectives
from jaxopt_lab.distributed.accounting import CommBytes, add_pmean_bytes, tree_bytes, zero_comm
from jaxopt_lab.distributed.diloco import diloco_inner, diloco_outer
from jaxopt_lab.distributed.sync import NO_SYNC, check_sync

AxisName = Any


class StreamingDiLoCoState(NamedTuple):
    step: jax.Array  # inner steps taken
    anchor: optax.Params  # θ_global, fragment by fragment as of its last synchronization
    inner_state: optax.OptState
    outer_states: tuple  # one outer-optimizer state per fragment (over that fragment's leaves)
    compressor_states: tuple  # one compressor state per fragment (error feedback etc.)
    key: jax.Array  # for stochastic rounding
    bytes_sent: CommBytes  # payload and wire bytes (jaxopt_lab.distributed.accounting)
    next_sync: jax.Array  # int32: the fragment the next update synchronizes, or -1 (see distributed.sync)
    absent_at_sync: jax.Array = ()  # bool (P,): this worker missed fragment p's last synchronization


def balanced_fragments(sizes: Sequence[int], num_fragments: int) -> list[list[int]]:
    r"""Split leaves (in tree order) into ``num_fragments`` contiguous, ordered, non-empty groups of similar size.

    Leaf i goes to fragment :math:`\lfloor P \cdot c_i \rfloor` (:math:`c_i`: the fraction of all
    entries in leaves 0..i); where a huge leaf would leave a fragment empty, the cuts move just enough
    to give every fragment a leaf, keeping the order.
    """
    if num_fragments > len(sizes):
        raise ValueError(f"num_fragments={num_fragments} is more than the {len(sizes)} parameter tensors")
    n = len(sizes)
    slot = np.floor((np.cumsum(sizes) / np.sum(sizes) - 1e-12) * num_fragments)
    cuts = [0]
    for p in range(1, num_fragments):
        cuts.append(min(max(int(np.sum(slot < p)), cuts[-1] + 1), n - (num_fragments - p)))
    cuts.append(n)
    return [list(range(cuts[p], cuts[p + 1])) for p in range(num_fragments)]


FRAGMENT_PATTERNS = ("strided", "contiguous")


def _block_key(path) -> tuple | None:
    """The path prefix that names the block a leaf belongs to: up to its first integer key, or None."""
    for depth, key in enumerate(path):
        index = getattr(key, "idx", getattr(key, "key", None))
        if isinstance(index, int) and not isinstance(index, bool):
            return tuple(path[: depth + 1])
    return None


def strided_fragments(paths: Sequence[tuple], num_fragments: int) -> list[list[int]]:
    r"""The paper's strided pattern: transformer block i goes to fragment :math:`i \bmod P`.

    A *block* is every leaf under one integer key of the tree (an ``nnx.List``
    or Python list element: ``blocks/3/...``), numbered in tree order. Leaves
    outside any block (embeddings, final norm, head) are units of their own
    and continue the stride after the blocks: unit k (blocks first, then those
    leaves in tree order) goes to fragment :math:`k \bmod P`. A tree without
    integer keys is thus split leaf by leaf, round robin.

    Args:
      paths: the key paths of the leaves, in tree order (``jax.tree_util.tree_flatten_with_path``).
      num_fragments: P.

    Returns:
      P lists of leaf indices, each in tree order.
    """
    blocks: dict[tuple, list[int]] = {}
    loose: list[list[int]] = []
    for i, path in enumerate(paths):
        key = _block_key(path)
        if key is None:
            loose.append([i])
        else:
            blocks.setdefault(key, []).append(i)
    units = list(blocks.values()) + loose
    if num_fragments > len(units):
        raise ValueError(
            f"num_fragments={num_fragments} is more than the {len(units)} units of the strided pattern "
            f"({len(blocks)} blocks and {len(loose)} parameter tensors outside a block)"
        )
    groups: list[list[int]] = [[] for _ in range(num_fragments)]
    for k, unit in enumerate(units):
        groups[k % num_fragments].extend(unit)
    return [sorted(g) for g in groups]


def fragment_assignment(params: Any, num_fragments: int, pattern: str = "strided") -> list[list[int]]:
    """Which leaves of ``params`` (indices in ``jax.tree.leaves`` order) form each of the P fragments.

    ``"strided"``: :func:`strided_fragments` (the paper's choice); ``"contiguous"``:
    :func:`balanced_fragments` (consecutive leaves, balanced by size).
    """
    if pattern not in FRAGMENT_PATTERNS:
        raise ValueError(f"fragment_pattern must be one of {FRAGMENT_PATTERNS}, got {pattern!r}")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if pattern == "strided":
        return strided_fragments([path for path, _ in flat], num_fragments)
    return balanced_fragments([max(1, int(np.prod(np.shape(x)))) for _, x in flat], num_fragments)


def streaming_diloco(
    inner: optax.GradientTransformation | None = None,
    outer: optax.GradientTransformation | None = None,
    sync_every: int = 100,
    num_fragments: int = 4,
    overlap: int = 0,
    merge_alpha: float = 0.0,
    fragment_pattern: str = "strided",
    compressor: Any = None,
    seed: int = 0,
    axis_name: AxisName = "workers",
) -> optax.GradientTransformation:
    r"""Streaming DiLoCo for one worker of a named worker axis.

    The parameters are split into P = ``num_fragments`` fragments, by default
    in the paper's strided pattern (transformer block i in fragment i mod P,
    see :func:`strided_fragments`; ``fragment_pattern="contiguous"``: runs of
    consecutive leaves balanced by size, :func:`balanced_fragments`). The
    schedule is torchft's (``torchft/local_sgd.py``, ``DiLoCo._step_post_hook``):
    every H/P steps (H = ``sync_every``) one fragment, in the order 0, 1, ...,
    P-1, 0, ..., finishes a synchronization, so fragment p's result is merged
    at steps :math:`(p+1)\,H/P + kH`, and its outer gradient is sent
    :math:`\tau` = ``overlap`` steps earlier, at :math:`(p+1)\,H/P - \tau + kH`.
    At the send of fragment p at step t:

    .. math::
        \Delta_p = \frac1W \sum_w Q\bigl(\theta^{g}_p - \theta_{w,p}^{(t)}\bigr), \qquad
        \theta^g_p \leftarrow \theta^g_p + \mathrm{OuterOpt}_p(\Delta_p)

    with Q the ``compressor`` (quantization before the all-reduce; none: exact).
    The result is merged into the worker's parameters τ steps later, while the
    worker kept training in between (torchft's ``lerp_`` with
    ``fragment_update_alpha``):

    .. math:: \theta_{w,p} \leftarrow \alpha\,\theta_{w,p}^{(t+\tau)} + (1-\alpha)\,\theta^g_p .

    The default α = 0 is torchft's (``fragment_update_alpha=0.0``): the worker
    takes the new global fragment, and with τ > 0 its last τ local steps on
    that fragment are dropped. The paper mixes with α = 0.5 when it overlaps;
    pass ``merge_alpha=0.5`` for that. With P = 1, τ = 0 and no compressor this
    is DiLoCo (tested).

    Bytes: each fragment synchronization adds the compressor's payload bytes
    (``tree_bytes`` of the fragment without one); on the wire ``W-1`` times the
    payload (all-gather), or ``2 (W-1) / W`` times the fragment without a
    compressor (ring all-reduce; :mod:`jaxopt_lab.distributed.accounting`).

    Synchronization decided on the host: ``update(..., sync=p)`` (a static
    Python int) compiles the step that synchronizes fragment p, ``sync=-1`` (or
    ``False``) a step with no collective and no outer step; the default
    ``None`` decides in the graph (one ``lax.cond`` per fragment; under ``vmap``
    every fragment's all-reduce runs on every step). ``state.next_sync`` names
    the fragment the next update synchronizes; see
    :mod:`jaxopt_lab.distributed.sync`. Merges τ > 0 steps after a send stay
    in the graph (a select per fragment, no collective).

    Fault tolerance, as in :func:`~jaxopt_lab.distributed.diloco`:
    ``update(..., present=flag)`` (a bool per worker, read at each fragment's
    synchronization) averages :math:`\Delta_p` over the workers present only; a
    worker absent at fragment p's synchronization does not merge at its arrival
    but takes :math:`\theta^g_p` (its local progress on p is dropped, it continues
    from the global fragment). If nobody is present, fragment p takes no outer
    step (anchor and outer momentum stay). Absent workers still count their
    bytes. Not combined with a compressor.

    Args:
      inner: each worker's optimizer (default AdamW as in DiLoCo).
      outer: outer optimizer, one state per fragment (default Nesterov SGD 0.7, 0.9).
      sync_every: H.
      num_fragments: P; must divide H.
      overlap: τ, inner steps between sending a fragment and merging its result
        (torchft's ``fragment_sync_delay``); τ < H/P.
      merge_alpha: α, the weight of the local parameters in the merge
        (torchft's ``fragment_update_alpha``, default 0.0 as there; the paper
        uses 0.5 with overlap).
      fragment_pattern: ``"strided"`` (the paper's, default) or ``"contiguous"``.
      compressor: a ``jaxopt_lab.distributed.compression`` compressor applied to
        the outer gradient before the all-reduce, or None.
      seed: seed of the stochastic-rounding key (folded with step and worker index).
      axis_name: the worker axis.
    """
    for name, value in (("sync_every", sync_every), ("num_fragments", num_fragments)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if sync_every % num_fragments:
        raise ValueError(f"num_fragments={num_fragments} must divide sync_every={sync_every}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < sync_every // num_fragments:
        raise ValueError(f"overlap must be an int in [0, H/P = {sync_every // num_fragments}), got {overlap!r}")
    if isinstance(merge_alpha, bool) or not isinstance(merge_alpha, (int, float)) or not 0.0 <= merge_alpha <= 1.0:
        raise ValueError(f"merge_alpha must be a number in [0, 1], got {merge_alpha!r}")
    if fragment_pattern not in FRAGMENT_PATTERNS:
        raise ValueError(f"fragment_pattern must be one of {FRAGMENT_PATTERNS}, got {fragment_pattern!r}")
    if compressor is not None and not hasattr(compressor, "compress"):
        raise ValueError(f"compressor must be a jaxopt_lab.distributed.compression compressor, got {compressor!r}")
    inner = optax.with_extra_args_support(diloco_inner() if inner is None else inner)
    outer = diloco_outer() if outer is None else outer
    spacing = sync_every // num_fragments

    def fragments_of(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return leaves, treedef, fragment_assignment(tree, num_fragments, fragment_pattern)

    def next_sync_after(step):  # fragment p sends when (t + τ) % H == (p+1)·H/P % H
        r = (step + 1 + overlap) % sync_every
        return jnp.where(r % spacing == 0, (r // spacing - 1) % num_fragments, NO_SYNC).astype(jnp.int32)

    def init_fn(params):
        leaves, _, groups = fragments_of(params)
        parts = [[leaves[i] for i in g] for g in groups]
        return StreamingDiLoCoState(
            step=jnp.zeros((), jnp.int32),
            anchor=params,
            inner_state=inner.init(params),
            outer_states=tuple(outer.init(p) for p in parts),
            compressor_states=tuple(compressor.init(p) if compressor else () for p in parts),
            key=jax.random.key_data(jax.random.key(seed)),
            bytes_sent=zero_comm(),
            next_sync=next_sync_after(jnp.zeros((), jnp.int32)),
            absent_at_sync=jnp.zeros((num_fragments,), bool),
        )

    def all_reduce(delta, comp_state, key, step, weight=None):
        if weight is not None:  # mean over the workers present (weight 1), and how many there were
            count = jax.lax.psum(weight, axis_name)
            mean = [(jax.lax.psum(d * weight.astype(d.dtype), axis_name) / jnp.maximum(count, 1.0)).astype(d.dtype)
                    for d in delta]
            return mean, comp_state, tree_bytes(delta), count
        if compressor is None:
            return collectives.pmean(delta, axis_name), comp_state, tree_bytes(delta)
        from jaxopt_lab.distributed.compression import compressed_pmean

        return compressed_pmean(delta, comp_state, key, step, compressor, axis_name)

    def update_fn(grads, state, params=None, *, sync=None, present=None, **extra_args):
        if params is None:
            raise ValueError("streaming_diloco needs params: call update(grads, state, params)")
        sync = check_sync(sync, num_fragments, "streaming_diloco")
        if present is not None and compressor is not None:
            raise ValueError("streaming_diloco: present (absent workers) is not supported together with a compressor")
        weight = None if present is None else jnp.asarray(present, jnp.float32)
        absent = state.absent_at_sync
        inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        local = optax.apply_updates(params, inner_updates)
        step = state.step + 1
        local_leaves, treedef, groups = fragments_of(local)
        anchor_leaves = jax.tree.leaves(state.anchor)
        outer_states, comp_states = list(state.outer_states), list(state.compressor_states)
        sent = state.bytes_sent
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), step),
                                 jax.lax.axis_index(axis_name))
        touched = set()  # leaves the step may change beyond the inner update
        for p, group in enumerate(groups):
            arrival = ((p + 1) * spacing) % sync_every  # t % H of fragment p's merge; its send is τ earlier
            anchor_p = [anchor_leaves[i] for i in group]
            local_p = [local_leaves[i] for i in group]

            def synchronize(carry, p=p, local_p=local_p):
                anchor_p, outer_state, comp_state, sent = carry
                delta = [a - x for a, x in zip(anchor_p, local_p)]
                if weight is None:
                    mean, comp_state, nbytes = all_reduce(delta, comp_state, jax.random.fold_in(key, p), step)
                else:
                    mean, comp_state, nbytes, count = all_reduce(delta, comp_state, None, step, weight)
                upd, new_outer = outer.update(mean, outer_state, anchor_p)
                new_anchor = optax.apply_updates(anchor_p, upd)
                if weight is not None:  # nobody present: no outer step (momentum would still move the anchor)
                    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(count > 0, n, o), old, new)  # noqa: E731
                    new_anchor, new_outer = keep(anchor_p, new_anchor), keep(outer_state, new_outer)
                sent = add_pmean_bytes(sent, nbytes, axis_name, compressed=compressor is not None)
                return new_anchor, new_outer, comp_state, sent

            carry = (anchor_p, outer_states[p], comp_states[p], sent)
            if sync is None:  # decided in the graph (under vmap: every fragment's all-reduce runs)
                due = (step + overlap) % sync_every == arrival  # first send (p+1)·H/P - τ >= 1
                carry = jax.lax.cond(due, synchronize, lambda c: c, carry)
            else:  # decided by the caller, at trace time
                due = sync == p
                if due:
                    carry = synchronize(carry)
            anchor_p, outer_states[p], comp_states[p], sent = carry
            for i, a in zip(group, anchor_p):
                anchor_leaves[i] = a
            if weight is not None:
                absent = absent.at[p].set(jnp.where(due, weight == 0, absent[p]))
            if sync is not None and overlap == 0:  # the merge is the synchronization's own step
                if sync != p:
                    continue
                merge = True
            else:
                merge = step % sync_every == arrival  # first at (p+1)·H/P, after the first send
            touched.update(group)
            alpha = merge_alpha if weight is None else jnp.where(absent[p], 0.0, merge_alpha)  # missed it: global
            for i in group:
                merged = alpha * local_leaves[i] + (1 - alpha) * anchor_leaves[i]
                local_leaves[i] = jnp.where(merge, merged.astype(local_leaves[i].dtype), local_leaves[i])
        param_leaves = jax.tree.leaves(params)
        update_leaves = [  # leaves left alone get the inner update as it is (exact, no extra pass)
            local_leaves[i] - param_leaves[i] if i in touched else jnp.asarray(u, param_leaves[i].dtype)
            for i, u in enumerate(jax.tree.leaves(inner_updates))
        ]
        return jax.tree.unflatten(treedef, update_leaves), StreamingDiLoCoState(
            step, jax.tree.unflatten(treedef, anchor_leaves), inner_state, tuple(outer_states), tuple(comp_states),
            state.key, sent, next_sync_after(step), absent,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
