r"""FedAMD: anchor sampling for federated learning with partial client participation.

Wu, Guo, Qu, He, Liu & Gao, "Anchor Sampling for Federated Learning with
Partial Client Participation" (ICML 2023), https://arxiv.org/abs/2206.05891.

Each dispatched client is, independently with probability :math:`p`, an
**anchor**, else a **miner**. With :math:`\theta_t` the model the client was
sent and :math:`c_t` the control variate it was sent with it:

- an anchor computes one large-batch gradient :math:`g_i = \nabla f_i(\theta_t; B'_i)`
  (its whole data by default, ``anchor_batch_size`` examples otherwise) and
  does not train; the server stores it as client i's latest anchor gradient
  :math:`a_i \leftarrow g_i`;
- a miner runs K local steps of the recursive (SARAH-type) variance-reduced direction

  .. math::

     x_{-1} = x_0 = \theta_t,\quad v_{-1} = c_t,\qquad
     v_k = \nabla f_i(x_k; B_k) - \nabla f_i(x_{k-1}; B_k) + v_{k-1},\qquad
     x_{k+1} = x_k - \eta_l v_k

  (both gradients of step k on step k's minibatch :math:`B_k`; step 0's
  difference is zero, so :math:`x_1 = \theta_t - \eta_l c_t` and :math:`B_0` is
  drawn but unused), as the official ``fedamd_train_iter`` (HarliWu/FedAMD,
  ``algo/fedamd.py``) orders it, and returns :math:`x_K` (pseudo-gradient
  :math:`\theta_t - x_K`).

The server steps with the miners only and refreshes the control variate from the anchors:

.. math::

   \theta_{t+1} = \theta_t - \eta_g \sum_{i \in M_t} w_i (\theta_t - x^i_K),
   \qquad c_{t+1} = \frac{1}{|\mathcal{A}|}\sum_{i \in \mathcal{A}} a_i,

with :math:`w_i` uniform over the step's miners (``weighting="examples"``: by
example counts), a step without miner leaving :math:`\theta` unchanged, and
:math:`\mathcal{A}` the clients that have an anchor gradient.

What is implemented, and what is assumed (the paper's Algorithm 1, and the official
code ``main_fmnist.py`` / ``algo/fedamd.py`` of HarliWu/FedAMD):

- before the first round every client's anchor gradient is its full-batch
  gradient at :math:`\theta_0` (official: ``full_batch_grad`` of all workers,
  computed before training), so :math:`c_0 = \frac1N\sum_i \nabla f_i(\theta_0)`:
  pass ``initial_anchors=fedamd_initial_anchors(loss_fn, data, params0)`` to
  :func:`fedamd`. ``initial_anchors=None`` (opt-in) starts from an empty table
  instead, saving those N gradients: :math:`c` then averages the clients that
  have been an anchor so far (zero before any), and miners do not move until
  some client has been one;
- the miners' direction is the recursive estimator above, started from the
  global control variate (not the SVRG form :math:`g_i(x) - g_i(\text{anchor}) + c`);
- the anchor gradients enter :math:`c` after the server step they arrive in;
- :math:`p` is a constant (the paper also studies time-varying schedules), and the
  anchor/miner draw is a hash of the dispatch's training key
  (:func:`fedamd_is_anchor`);
- the local step is any optax optimizer applied to :math:`v_k` (``optax.sgd(eta_l)``: the paper);
- the simulated compute time of an anchor is that of its ``local_steps`` (the
  time model does not know who is an anchor).

Usage (synchronous rounds; any trigger works, under asynchronous ones a client
uses the control variate of its dispatch)::

    local = fl.fedamd_local_update(loss_fn, clients, optax.sgd(0.1), batch_size=16, anchor_prob=0.3)
    anchors = fl.fedamd_initial_anchors(loss_fn, clients, params0)
    rule = fl.fedamd(1.0, num_clients=100, initial_anchors=anchors)
    sim = fl.FederatedSimulator(local, rule, fl.SyncRound(10),
                                num_clients=100, local_steps=..., client_context=fl.fedamd_context)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated._checks import check_int, check_real
from jaxopt_lab.distributed.federated.aggregate import WEIGHTINGS, _leading, client_weights, weighted_sum
from jaxopt_lab.distributed.federated.local import ClientData, ClientWalk, _key_data

_ANCHOR_STREAM = 0x414D44  # counter of the anchor draw (the batch shuffle uses none)


class FedAMDState(NamedTuple):
    """The server's anchor table."""

    anchor_grads: Any  # params with leading axis N: each client's latest anchor gradient (zeros: none yet)
    has_anchor: jax.Array  # bool (N,)
    count: jax.Array  # int32: server steps so far


def fedamd_is_anchor(key, anchor_prob) -> jax.Array:
    """Whether the dispatch with training key ``key`` is an anchor (probability ``anchor_prob``)."""
    return _rng.uniform(_key_data(key), _ANCHOR_STREAM) < jnp.float32(anchor_prob)


def control_variate(state: FedAMDState):
    """:math:`c`: the mean of the stored anchor gradients of the clients that have one (zeros if none)."""
    w = state.has_anchor.astype(jnp.float32)
    w = w / jnp.maximum(w.sum(), 1.0)
    return jax.tree.map(lambda a: jnp.tensordot(w.astype(a.dtype), a, axes=1), state.anchor_grads)


def fedamd_context(rule_state):
    """The ``client_context`` of :class:`FederatedSimulator` for FedAMD: the control variate :math:`c`
    of the (first) :class:`FedAMDState` found in ``rule_state`` (so ``fedamd`` may sit in an ``optax.chain``)."""
    found = [s for s in jax.tree.leaves(rule_state, is_leaf=lambda x: isinstance(x, FedAMDState))
             if isinstance(s, FedAMDState)]
    if not found:
        raise ValueError("fedamd_context: the rule state holds no FedAMDState (is the rule fedamd()?)")
    return control_variate(found[0])


def fedamd_initial_anchors(loss_fn, data: ClientData, params, *, anchor_batch_size: int | None = None):
    """Every client's anchor gradient at ``params`` (the official warm start, computed before training):
    the gradient of its mean loss over its first ``anchor_batch_size`` examples (all by default),
    stacked along a leading axis of size N. Pass it to :func:`fedamd` as ``initial_anchors``."""
    if anchor_batch_size is not None:
        anchor_batch_size = check_int("anchor_batch_size", anchor_batch_size, 1)
    walk = ClientWalk(data, optax.sgd(0.0), 1, False)
    big = walk.max_size if anchor_batch_size is None else min(anchor_batch_size, walk.max_size)
    grad = jax.grad(functools.partial(walk.mean_loss, loss_fn))

    def one(client_id):
        rows = client_id * walk.max_size + jnp.arange(big)
        return grad(params, rows, jnp.arange(big) < jnp.minimum(walk.sizes[client_id], big))

    return jax.jit(jax.vmap(one))(jnp.arange(int(data.sizes.shape[0])))


def scale_by_fedamd(
    num_clients: int, weighting: str = "uniform", *, initial_anchors
) -> optax.GradientTransformationExtraArgs:
    """The FedAMD server direction (the miners' mean pseudo-gradient) and anchor table.

    Reads the extra arguments ``mask``, ``client_ids``, ``num_examples`` and
    ``client_aux = {"anchor": bool (L,), "grad": params stacked (L, ...)}``
    (from :func:`fedamd_local_update` via the simulator's ``client_context``).

    Args:
      num_clients: N, the rows of the anchor table.
      weighting: ``"uniform"`` over the step's miners (the paper) or ``"examples"``.
      initial_anchors: the anchor table's start: every client's gradient at the initial
        model, stacked (:func:`fedamd_initial_anchors`; the official code), or ``None``
        for an empty table (opt-in: skips the N gradients; see the module docstring).
    """
    n = check_int("num_clients", num_clients, 1)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if initial_anchors is not None:
        rows = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(initial_anchors)}
        if rows != {n}:
            raise ValueError(f"initial_anchors must stack one gradient per client (leading axis {n}), "
                             f"got leading axes {sorted(map(str, rows))}")

    def init_fn(params):
        if initial_anchors is None:
            return FedAMDState(jax.tree.map(lambda p: jnp.zeros((n,) + jnp.shape(p), jnp.result_type(p)), params),
                               jnp.zeros((n,), bool), jnp.zeros((), jnp.int32))
        try:
            table = jax.tree.map(lambda p, a: jnp.asarray(a, jnp.result_type(p)).reshape((n,) + jnp.shape(p)),
                                 params, initial_anchors)
        except (ValueError, TypeError) as e:
            raise ValueError(f"initial_anchors must be the parameters' tree with a leading axis {n}: {e}") from None
        return FedAMDState(table, jnp.ones((n,), bool), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        del params
        size = _leading(updates)
        aux = extra.get("client_aux")
        if aux is None or "anchor" not in aux or "grad" not in aux:
            raise ValueError("fedamd needs client_aux={'anchor', 'grad'}: run it with fedamd_local_update "
                             "and FederatedSimulator(..., client_context=fedamd_context)")
        mask = extra.get("mask")
        mask = jnp.ones((size,), bool) if mask is None else jnp.asarray(mask, bool)
        anchor = jnp.asarray(aux["anchor"], bool) & mask
        miner = mask & ~anchor
        weights = client_weights(miner, weighting, extra)
        direction = weighted_sum(updates, weights, miner)
        ids = extra.get("client_ids")
        ids = jnp.arange(size) if ids is None else jnp.asarray(ids, jnp.int32)
        at = jnp.where(anchor, ids, n)  # out of range: no write (a client is in flight at most once)
        table = jax.tree.map(lambda t, g: t.at[at].set(g.astype(t.dtype), mode="drop"), state.anchor_grads, aux["grad"])
        has = state.has_anchor.at[at].set(True, mode="drop")
        return direction, FedAMDState(table, has, state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fedamd(learning_rate: optax.ScalarOrSchedule = 1.0, *, num_clients: int, initial_anchors,
           weighting: str = "uniform", momentum: float | None = None) -> optax.GradientTransformationExtraArgs:
    """FedAMD's server rule: ``chain(scale_by_fedamd(num_clients, weighting, initial_anchors=...),
    sgd(learning_rate, momentum))`` (official: ``learning_rate`` 1, no momentum).

    Run it with :func:`fedamd_local_update` clients and ``client_context=fedamd_context``.
    ``initial_anchors``: :func:`fedamd_initial_anchors` at the initial model (official), or None
    (opt-in empty table); see :func:`scale_by_fedamd`.
    """
    return optax.chain(scale_by_fedamd(num_clients, weighting, initial_anchors=initial_anchors),
                       optax.sgd(learning_rate, momentum=momentum))


def fedamd_local_update(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    data: ClientData,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    anchor_prob: float,
    *,
    anchor_batch_size: int | None = None,
    shuffle: bool = True,
):
    """FedAMD's client: ``local_update(params, client_id, num_steps, key, c) -> (params, aux)``.

    An anchor (:func:`fedamd_is_anchor`) returns ``params`` unchanged and
    ``aux = {"anchor": True, "grad": grad of the mean loss over its first
    anchor_batch_size examples (all by default) at params}``; a miner runs
    ``num_steps`` recursive variance-reduced steps from ``v_{-1} = c`` (module
    docstring) with minibatches walked as in
    :func:`~jaxopt_lab.distributed.federated.make_local_update` and returns
    ``aux = {"anchor": False, "grad": zeros}``.

    Args:
      loss_fn: ``(params, x_batch, y_batch) -> per-example losses``.
      data: padded clients (:func:`pad_clients`).
      optimizer: applied to the direction :math:`v_k` (``optax.sgd(eta_l)``: the paper).
      batch_size: the miners' minibatch size.
      anchor_prob: :math:`p \\in [0, 1]`.
      anchor_batch_size: the anchors' batch (None: the client's whole data).
      shuffle: shuffle each client's examples per dispatch.
    """
    anchor_prob = check_real("anchor_prob", anchor_prob)
    if not 0.0 <= anchor_prob <= 1.0:
        raise ValueError(f"anchor_prob must be in [0, 1], got {anchor_prob}")
    if anchor_batch_size is not None:
        anchor_batch_size = check_int("anchor_batch_size", anchor_batch_size, 1)
    walk = ClientWalk(data, optimizer, batch_size, shuffle)
    big = walk.max_size if anchor_batch_size is None else min(anchor_batch_size, walk.max_size)
    grad = jax.grad(functools.partial(walk.mean_loss, loss_fn))

    def local_update(params, client_id, num_steps, key, c):
        rows, n = walk.rows(client_id, key)
        anchor = fedamd_is_anchor(key, anchor_prob)
        # anchor: one large-batch gradient at the received model
        g_anchor = grad(params, rows[:big], jnp.arange(big) < jnp.minimum(n, big))
        # miner: recursive variance-reduced local steps
        v0 = jax.tree.map(lambda p, ci: jnp.asarray(ci, p.dtype), params, c)

        def step(s, carry):  # official order: v_s from step s's batch at x_s and x_{s-1}, then the step
            x, x_prev, v, opt_state = carry
            idx, valid = walk.batch(rows, n, s)
            v = jax.tree.map(lambda gn, go, vv: gn - go + vv, grad(x, idx, valid), grad(x_prev, idx, valid), v)
            updates, opt_state = optimizer.update(v, opt_state, x)
            return optax.apply_updates(x, updates), x, v, opt_state

        steps = jnp.where(anchor, 0, num_steps)
        x, _, _, _ = jax.lax.fori_loop(0, steps, step, (params, params, v0, optimizer.init(params)))
        aux = {"anchor": anchor, "grad": jax.tree.map(lambda g: jnp.where(anchor, g, jnp.zeros_like(g)), g_anchor)}
        return x, aux

    return local_update
