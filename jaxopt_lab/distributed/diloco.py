"""DiLoCo: many inner steps per worker, then one outer step on the averaged parameter change.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models" (2023), https://arxiv.org/abs/2311.08105.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed import collectives
from jaxopt_lab.distributed.accounting import CommBytes, add_pmean_bytes, tree_bytes, zero_comm
from jaxopt_lab.distributed.compression import compressed_pmean
from jaxopt_lab.distributed.sync import NO_SYNC, check_sync

AxisName = Any


class DiLoCoState(NamedTuple):
    step: jax.Array  # inner steps taken
    anchor: optax.Params  # θ_global: the parameters at the last synchronization
    inner_state: optax.OptState
    outer_state: optax.OptState
    compressor_state: Any  # empty without a compressor
    key: jax.Array  # for stochastic rounding
    bytes_sent: CommBytes  # payload and wire bytes (jaxopt_lab.distributed.accounting)
    next_sync: jax.Array  # int32: 0 if the next update synchronizes, else -1 (see distributed.sync)


def diloco_inner(learning_rate: optax.ScalarOrSchedule = 4e-4) -> optax.GradientTransformation:
    """The paper's inner optimizer: AdamW, β = (0.9, 0.95), weight decay 0.1."""
    return optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=0.1)


def diloco_outer(learning_rate: optax.ScalarOrSchedule = 0.7, momentum: float = 0.9) -> optax.GradientTransformation:
    """The paper's outer optimizer: SGD with Nesterov momentum (lr 0.7, momentum 0.9)."""
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def diloco(
    inner: optax.GradientTransformation | None = None,
    outer: optax.GradientTransformation | None = None,
    sync_every: int = 500,
    compressor: Any = None,
    seed: int = 0,
    axis_name: AxisName = "workers",
) -> optax.GradientTransformation:
    r"""DiLoCo for one worker of a named worker axis.

    Each worker runs the inner optimizer on its own data. Every ``H =
    sync_every`` inner steps the workers average their parameter change since
    the last synchronization (the *outer gradient*) and apply the outer
    optimizer to the shared anchor:

    .. math::
        \Delta = \frac{1}{W}\sum_w \bigl(\theta^{(t-H)} - \theta_w^{(t)}\bigr), \qquad
        \theta^{(t)} = \theta^{(t-H)} + \mathrm{OuterOpt}(\Delta),

    after which every worker continues from :math:`\theta^{(t)}`. With H = 1,
    inner SGD and outer SGD at lr 1 this is data-parallel SGD (tested).

    Communication: one all-reduce of the outer gradient per H steps, payload
    ``tree_bytes(params)`` per worker and wire ``2 (W-1) / W`` times that (ring
    all-reduce; with a compressor, payload its bytes and wire ``W-1`` times them),
    counted in ``state.bytes_sent``. Inner
    and outer states are kept per worker; the outer state evolves identically on
    all workers since its input is the worker average.

    Fault tolerance: ``update(..., present=flag)`` (a bool per worker) averages
    the outer gradient over the workers present only; an absent worker's local
    progress is dropped and it continues from the new anchor. If no worker is
    present there is no outer step: anchor and outer state (momentum) stay
    as they are. Absent workers still count their
    bytes as sent (a worker that is absent sends zeros here; a real system
    would skip the send, which we do not model).

    Synchronization decided on the host: ``update(..., sync=False)`` (a static
    Python value) compiles an inner step with no collective and no outer step,
    ``sync=True`` the synchronizing step; the default ``sync=None`` decides in
    the graph with ``lax.cond``, which under ``vmap`` runs both branches on
    every step. ``state.next_sync`` says what the next update needs; see
    :mod:`jaxopt_lab.distributed.sync` and ``WorkerRunner.map_sync``.

    Args:
      inner: optax transformation each worker applies to its own gradients
        (default :func:`diloco_inner`, AdamW lr 4e-4).
      outer: optax transformation applied to the averaged outer gradient
        (default :func:`diloco_outer`, Nesterov SGD lr 0.7, momentum 0.9).
      sync_every: H, inner steps between synchronizations.
      compressor: a ``jaxopt_lab.distributed.compression`` compressor applied to
        each worker's outer gradient before the all-reduce (bytes: its payload),
        or None. Not combined with ``present``.
      seed: seed of the stochastic-rounding key (folded with step and worker).
      axis_name: the worker axis.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` and takes the optional extra arguments ``present`` and ``sync``;
      any other extra argument (e.g. a low-rank optimizer's ``refresh``) goes to ``inner``.
    """
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if compressor is not None and not hasattr(compressor, "compress"):
        raise ValueError(f"compressor must be a jaxopt_lab.distributed.compression compressor, got {compressor!r}")
    inner = optax.with_extra_args_support(diloco_inner() if inner is None else inner)
    outer = diloco_outer() if outer is None else outer

    def next_sync_after(step):
        return jnp.where((step + 1) % sync_every == 0, 0, NO_SYNC).astype(jnp.int32)

    def init_fn(params):
        return DiLoCoState(
            step=jnp.zeros((), jnp.int32),
            anchor=params,
            inner_state=inner.init(params),
            outer_state=outer.init(params),
            compressor_state=compressor.init(params) if compressor else (),
            key=jax.random.key_data(jax.random.key(seed)),
            bytes_sent=zero_comm(),
            next_sync=next_sync_after(jnp.zeros((), jnp.int32)),
        )

    def update_fn(grads, state, params=None, *, present=None, sync=None, **extra_args):
        sync = check_sync(sync, 1, "diloco")
        if params is None:
            raise ValueError("diloco needs params: call update(grads, state, params)")
        if present is not None and compressor is not None:
            raise ValueError("diloco: present (absent workers) is not supported together with a compressor")
        inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        step = state.step + 1

        def synchronize(_):
            local = optax.apply_updates(params, inner_updates)
            outer_grad = jax.tree.map(lambda a, p: a - p, state.anchor, local)
            comp_state, nbytes = state.compressor_state, tree_bytes(outer_grad)
            if compressor is not None:
                key = jax.random.fold_in(jax.random.wrap_key_data(state.key), step)
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
                outer_grad, comp_state, nbytes = compressed_pmean(
                    outer_grad, comp_state, key, step, compressor, axis_name
                )
            elif present is None:
                outer_grad = collectives.pmean(outer_grad, axis_name)
            else:  # average over the workers present
                weight = jnp.asarray(present, jnp.float32)
                count = collectives.psum(weight, axis_name)
                sums = collectives.psum(jax.tree.map(lambda d: d * weight.astype(d.dtype), outer_grad), axis_name)
                outer_grad = jax.tree.map(
                    lambda s, d: (s / jnp.maximum(count, 1.0)).astype(d.dtype), sums, outer_grad
                )
            outer_updates, outer_state = outer.update(outer_grad, state.outer_state, state.anchor)
            anchor = optax.apply_updates(state.anchor, outer_updates)
            if present is not None:  # nobody present: no outer step (momentum would still move the anchor)
                keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(count > 0, n, o), old, new)  # noqa: E731
                anchor, outer_state = keep(state.anchor, anchor), keep(state.outer_state, outer_state)
            updates = jax.tree.map(lambda n, p: n - p, anchor, params)
            sent = add_pmean_bytes(state.bytes_sent, nbytes, axis_name, compressed=compressor is not None)
            return updates, anchor, outer_state, comp_state, sent

        def keep_going(_):  # the inner update as it is: no collective, no outer step
            updates = jax.tree.map(lambda u, p: jnp.asarray(u, p.dtype), inner_updates, params)
            return updates, state.anchor, state.outer_state, state.compressor_state, state.bytes_sent

        if sync is None:  # decided in the graph (under vmap: both branches run)
            out = jax.lax.cond(step % sync_every == 0, synchronize, keep_going, None)
        else:  # decided by the caller, at trace time
            out = synchronize(None) if sync == 0 else keep_going(None)
        updates, anchor, outer_state, comp_state, sent = out
        return updates, DiLoCoState(
            step, anchor, inner_state, outer_state, comp_state, state.key, sent, next_sync_after(step)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
