"""Local SGD with parameter averaging, and the Quadratic Synchronization Rule (QSR).

Gu, Lyu, Arora, Zhang & Huang, "A Quadratic Synchronization Rule for
Distributed Deep Learning" (ICLR 2024), https://arxiv.org/abs/2310.14423.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed import collectives
from jaxopt_lab.distributed.accounting import CommBytes, add_pmean_bytes, tree_bytes, zero_comm
from jaxopt_lab.distributed.sync import NO_SYNC, check_sync

AxisName = Any


class LocalSGDState(NamedTuple):
    step: jax.Array  # inner steps taken
    since_sync: jax.Array  # inner steps since the last averaging
    period: jax.Array  # H of the current round
    inner_state: optax.OptState
    bytes_sent: CommBytes  # payload and wire bytes (jaxopt_lab.distributed.accounting)
    next_sync: jax.Array  # int32: 0 if the next update averages, else -1 (see distributed.sync)


def qsr_period(learning_rate: float | jax.Array, sync_every: int, qsr_beta: float) -> jax.Array:
    r"""QSR's round length :math:`H = \max(H_\text{base}, \lfloor (\beta/\eta)^2 \rfloor)`."""
    h = jnp.floor(jnp.square(qsr_beta / jnp.asarray(learning_rate, jnp.float32)))
    return jnp.maximum(sync_every, jnp.minimum(h, 2**30)).astype(jnp.int32)


def local_sgd(
    inner: optax.GradientTransformation,
    sync_every: int = 4,
    qsr_beta: float | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    warmup_steps: int = 0,
    axis_name: AxisName = "workers",
) -> optax.GradientTransformation:
    r"""Local SGD: each worker steps on its own, parameters are averaged every H steps.

    Between synchronizations worker :math:`w` applies ``inner`` to its own
    gradients; at a synchronization every worker's parameters become the worker
    average :math:`\bar\theta = \frac1W \sum_w \theta_w` (``pmean``). The inner
    optimizer state stays local.

    With ``qsr_beta`` set, the round length follows the Quadratic
    Synchronization Rule: a round that starts at step t lasts

    .. math:: H_t = \max\bigl(H_\text{base}, \lfloor (\beta / \eta_t)^2 \rfloor\bigr)

    steps, so synchronization gets rarer as the learning rate :math:`\eta_t`
    decays (``learning_rate`` must then be the inner optimizer's schedule).
    A round that starts within the first ``warmup_steps`` steps lasts
    :math:`H_\text{base}` (as in the authors' code: during a learning-rate
    warm-up :math:`\eta_t` is small, and from :math:`\eta_0 = 0` the rule would
    never synchronize). :math:`H` is capped at :math:`2^{30}`, so a learning
    rate of exactly 0 after the warm-up means no further synchronization.
    Without it, H = ``sync_every`` always (equal to DiLoCo with outer SGD at lr 1).

    Bytes: payload ``tree_bytes(params)`` per worker per synchronization, wire
    ``2 (W-1) / W`` times that (ring all-reduce).

    Synchronization decided on the host: ``update(..., sync=False)`` (static)
    compiles a step with no collective, ``sync=True`` the averaging step; the
    default ``None`` decides in the graph (``lax.cond``; under ``vmap`` both
    branches run every step). ``state.next_sync`` says what the next update
    needs, QSR's period included; see :mod:`jaxopt_lab.distributed.sync`.

    Args:
      inner: the local optimizer.
      sync_every: H, or H_base under QSR.
      qsr_beta: β of QSR; None for a fixed period.
      learning_rate: the inner learning rate (float or schedule), needed for QSR.
      warmup_steps: rounds starting before this step last H_base (QSR only).
      axis_name: the worker axis.
    """
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if qsr_beta is not None:
        if isinstance(qsr_beta, bool) or not isinstance(qsr_beta, (int, float)) or not qsr_beta > 0:
            raise ValueError(f"qsr_beta must be > 0, got {qsr_beta!r}")
        if learning_rate is None:
            raise ValueError("qsr_beta needs learning_rate: the inner optimizer's learning rate or schedule")
    elif learning_rate is not None or warmup_steps:
        raise ValueError("learning_rate and warmup_steps are QSR's: set qsr_beta too, or leave them out")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    inner = optax.with_extra_args_support(inner)
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def period_at(step):
        if qsr_beta is None:
            return jnp.asarray(sync_every, jnp.int32)
        return jnp.where(step < warmup_steps, sync_every, qsr_period(lr(step), sync_every, qsr_beta))

    def next_sync_after(since, period):
        return jnp.where(since + 1 >= period, 0, NO_SYNC).astype(jnp.int32)

    def init_fn(params):
        zero = jnp.zeros((), jnp.int32)
        period = period_at(zero)
        return LocalSGDState(zero, zero, period, inner.init(params), zero_comm(), next_sync_after(zero, period))

    def update_fn(grads, state, params=None, *, sync=None, **extra_args):
        if params is None:
            raise ValueError("local_sgd needs params: call update(grads, state, params)")
        sync = check_sync(sync, 1, "local_sgd")
        inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        step, since = state.step + 1, state.since_sync + 1

        def synchronize(_):
            local = optax.apply_updates(params, inner_updates)
            mean = collectives.pmean(local, axis_name)
            zero = jnp.zeros((), jnp.int32)
            updates = jax.tree.map(lambda n, p: n - p, mean, params)
            return updates, zero, period_at(step), add_pmean_bytes(state.bytes_sent, tree_bytes(local), axis_name)

        def keep_going(_):  # the inner update as it is: no collective
            updates = jax.tree.map(lambda u, p: jnp.asarray(u, p.dtype), inner_updates, params)
            return updates, since, state.period, state.bytes_sent

        if sync is None:  # decided in the graph (under vmap: both branches run)
            out = jax.lax.cond(since >= state.period, synchronize, keep_going, None)
        else:  # decided by the caller, at trace time
            out = synchronize(None) if sync == 0 else keep_going(None)
        updates, since, period, sent = out
        return updates, LocalSGDState(step, since, period, inner_state, sent, next_sync_after(since, period))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
