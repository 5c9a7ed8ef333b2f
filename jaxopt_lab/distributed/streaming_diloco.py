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

from jaxopt_lab.distributed.accounting import ByteCount, add_bytes, tree_bytes, zero_bytes
from jaxopt_lab.distributed.diloco import diloco_inner, diloco_outer

AxisName = Any


class StreamingDiLoCoState(NamedTuple):
    step: jax.Array  # inner steps taken
    anchor: optax.Params  # θ_global, fragment by fragment as of its last synchronization
    inner_state: optax.OptState
    outer_states: tuple  # one outer-optimizer state per fragment (over that fragment's leaves)
    compressor_states: tuple  # one compressor state per fragment (error feedback etc.)
    key: jax.Array  # for stochastic rounding
    bytes_sent: ByteCount
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


def streaming_diloco(
    inner: optax.GradientTransformation | None = None,
    outer: optax.GradientTransformation | None = None,
    sync_every: int = 100,
    num_fragments: int = 4,
    overlap: int = 0,
    merge_alpha: float = 0.5,
    compressor: Any = None,
    seed: int = 0,
    axis_name: AxisName = "workers",
) -> optax.GradientTransformation:
    r"""Streaming DiLoCo for one worker of a named worker axis.

    The parameter leaves are split into P = ``num_fragments`` fragments (in
    tree order, balanced by size). Fragment p is synchronized every H =
    ``sync_every`` steps at offset :math:`t_p = p\,H/P`, so the all-reduces of
    the fragments are spread over the H steps instead of all at once. At a
    synchronization of fragment p at step t:

    .. math::
        \Delta_p = \frac1W \sum_w Q\bigl(\theta^{g}_p - \theta_{w,p}^{(t)}\bigr), \qquad
        \theta^g_p \leftarrow \theta^g_p + \mathrm{OuterOpt}_p(\Delta_p)

    with Q the ``compressor`` (quantization before the all-reduce; none: exact).
    The result is merged into the worker's parameters :math:`\tau` =
    ``overlap`` steps later, while the worker kept training in between:

    .. math:: \theta_{w,p} \leftarrow \alpha\,\theta_{w,p}^{(t+\tau)} + (1-\alpha)\,\theta^g_p .

    With P = 1, τ = 0, α = 0 and no compressor this is DiLoCo (tested).

    Bytes: each fragment synchronization adds the compressor's payload bytes
    (``tree_bytes`` of the fragment without one).

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
      overlap: τ, inner steps between sending a fragment and merging its result; τ < H/P.
      merge_alpha: α, the weight of the local parameters in the merge.
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
    if compressor is not None and not hasattr(compressor, "compress"):
        raise ValueError(f"compressor must be a jaxopt_lab.distributed.compression compressor, got {compressor!r}")
    inner = diloco_inner() if inner is None else inner
    outer = diloco_outer() if outer is None else outer
    spacing = sync_every // num_fragments

    def fragments_of(tree):
        leaves, treedef = jax.tree.flatten(tree)
        groups = balanced_fragments([max(1, int(np.prod(x.shape))) for x in leaves], num_fragments)
        return leaves, treedef, groups

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
            bytes_sent=zero_bytes(),
            absent_at_sync=jnp.zeros((num_fragments,), bool),
        )

    def all_reduce(delta, comp_state, key, step, weight=None):
        if weight is not None:  # mean over the workers present (weight 1), and how many there were
            count = jax.lax.psum(weight, axis_name)
            mean = [(jax.lax.psum(d * weight.astype(d.dtype), axis_name) / jnp.maximum(count, 1.0)).astype(d.dtype)
                    for d in delta]
            return mean, comp_state, tree_bytes(delta), count
        if compressor is None:
            return jax.lax.pmean(delta, axis_name), comp_state, tree_bytes(delta)
        from jaxopt_lab.distributed.compression import compressed_pmean

        return compressed_pmean(delta, comp_state, key, step, compressor, axis_name)

    def update_fn(grads, state, params=None, *, present=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("streaming_diloco needs params: call update(grads, state, params)")
        if present is not None and compressor is not None:
            raise ValueError("streaming_diloco: present (absent workers) is not supported together with a compressor")
        weight = None if present is None else jnp.asarray(present, jnp.float32)
        absent = state.absent_at_sync
        inner_updates, inner_state = inner.update(grads, state.inner_state, params)
        local = optax.apply_updates(params, inner_updates)
        step = state.step + 1
        local_leaves, treedef, groups = fragments_of(local)
        anchor_leaves = jax.tree.leaves(state.anchor)
        outer_states, comp_states = list(state.outer_states), list(state.compressor_states)
        sent = state.bytes_sent
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), step),
                                 jax.lax.axis_index(axis_name))
        for p, group in enumerate(groups):
            offset = p * spacing
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
                return new_anchor, new_outer, comp_state, add_bytes(sent, nbytes)

            due = (step % sync_every == offset % sync_every) & (step >= max(offset, 1))
            anchor_p, outer_states[p], comp_states[p], sent = jax.lax.cond(
                due, synchronize, lambda c: c, (anchor_p, outer_states[p], comp_states[p], sent)
            )
            for i, a in zip(group, anchor_p):
                anchor_leaves[i] = a
            if weight is not None:
                absent = absent.at[p].set(jnp.where(due, weight == 0, absent[p]))
            merge = ((step - overlap) % sync_every == offset % sync_every) & (step - overlap >= max(offset, 1))
            alpha = merge_alpha if weight is None else jnp.where(absent[p], 0.0, merge_alpha)  # missed it: global
            for i in group:
                merged = alpha * local_leaves[i] + (1 - alpha) * anchor_leaves[i]
                local_leaves[i] = jnp.where(merge, merged.astype(local_leaves[i].dtype), local_leaves[i])
        new_params = jax.tree.unflatten(treedef, local_leaves)
        updates = jax.tree.map(lambda n, p: n - p, new_params, params)
        return updates, StreamingDiLoCoState(
            step, jax.tree.unflatten(treedef, anchor_leaves), inner_state, tuple(outer_states), tuple(comp_states),
            state.key, sent, absent,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
