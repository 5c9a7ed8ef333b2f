r"""FedSpeed: prox-correction plus a merged gradient-ascent perturbation on the clients.

Sun, Shen, Chen, Ding & Tao, "FedSpeed: Larger Local Interval, Less Communication
Round, and Higher Generalization Accuracy" (ICLR 2023), https://arxiv.org/abs/2302.10429;
official code: https://github.com/woodenchild95/FL-Simulator (``client/fedspeed.py``,
``server/FedSpeed.py``, ``optimizer/ESAM.py``), which the defaults reproduce.

Client i keeps a correction :math:`h_i` (the sum of its past local updates
:math:`x_{i,K} - x_t`, zero at first; the paper's :math:`\hat g_i = -h_i / \lambda`).
Sent :math:`x_t` (and :math:`h_i`), it runs K steps; step k on minibatch :math:`B_k`:

.. math::

   g_1 &= \nabla f_i(x_k; B_k), \qquad
   g_2 = \nabla f_i\bigl(x_k + \rho\, g_1 / (\lVert g_1\rVert + 10^{-7}); B_k\bigr), \\
   \tilde g &= (1 - \alpha) g_1 + \alpha g_2, \\
   d &= \operatorname{clip}\bigl(\tilde g + \lambda (h_i - x_t),\ c\bigr) + \lambda x_k, \qquad
   x_{k+1} = x_k - \eta_l d

(``optimizer`` applies :math:`d`; ``optax.sgd(eta_l)`` is the official client, and
``optax.chain(optax.add_decayed_weights(wd), optax.sgd(eta_l))`` its weight decay).
So :math:`d = \tilde g + \lambda (x_k - x_t) + \lambda h_i` unclipped: the FedProx term
:math:`\lambda (x_k - x_t)` and the prox-correction :math:`-\hat g_i = \lambda h_i`.
The server, with :math:`S_t` the clients that returned:

.. math::

   h_i \leftarrow h_i + (x_{i,K} - x_t)\ (i \in S_t), \qquad
   x_{t+1} = \frac{1}{|S_t|}\sum_{i \in S_t} x_{i,K} + \frac1N \sum_{i=1}^N h_i .

As in the official code:

- the merged gradient has :math:`\alpha = 1` (ESAM's ``step(alpha=1)`` keeps only the
  perturbed gradient :math:`g_2`); :math:`\alpha \in [0, 1)` is the paper's general merge;
- the clip (global norm ``clip_norm`` = 10, ``clip_grad_norm_`` in the client) acts on
  :math:`\tilde g + \lambda(h_i - x_t)`, before the :math:`\lambda x_k` that torch's SGD
  adds as weight decay; ``clip_norm=None`` turns it off (the paper's equations);
- the server averages the returned models uniformly (``weighting="examples"``: by
  example counts) and adds the mean correction over all N clients (clients never
  sampled count as zero), with no server learning rate (``learning_rate=1``).

The correction table lives in the server rule's state (:class:`FedSpeedState`, one
row per client, like the official ``h_params_list``) and reaches the clients through
the simulator's ``client_context`` (:func:`fedspeed_context`); each client reads its own row.
Usage::

    local = fl.fedspeed_local_update(loss_fn, clients, optax.sgd(0.1), batch_size=16, lamb=0.1, rho=0.1)
    sim = fl.FederatedSimulator(local, fl.fedspeed(num_clients=100), fl.SyncRound(10), num_clients=100,
                                local_steps=..., client_context=fl.fedspeed_context)

Under asynchronous triggers the simulator keeps a copy of the context (the whole
table) per in-flight slot; a client's own row does not change while it is in flight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.federated._checks import check_int, check_real
from jaxopt_lab.distributed.federated.aggregate import WEIGHTINGS, _leading, client_weights, weighted_sum
from jaxopt_lab.distributed.federated.local import ClientData, ClientWalk


class FedSpeedState(NamedTuple):
    """The server's correction table."""

    correction: Any  # params with leading axis N: h_i = sum of client i's local updates x_iK - x_t
    count: jax.Array  # int32: server steps so far


def _find(rule_state, kind, name):
    found = [s for s in jax.tree.leaves(rule_state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)]
    if not found:
        raise ValueError(f"{name}: the rule state holds no {kind.__name__} (is the rule {name.split('_')[0]}()?)")
    return found[0]


def fedspeed_context(rule_state):
    """The ``client_context`` of :class:`FederatedSimulator` for FedSpeed: the correction table
    (leading axis N) of the :class:`FedSpeedState` in ``rule_state``; each client reads its row."""
    return _find(rule_state, FedSpeedState, "fedspeed_context").correction


def scale_by_fedspeed(num_clients: int, weighting: str = "uniform") -> optax.GradientTransformationExtraArgs:
    r"""FedSpeed's server direction :math:`\bar\Delta - \frac1N\sum_i h_i` and correction table.

    Reads the extra arguments ``mask``, ``client_ids`` and (``weighting="examples"``)
    ``num_examples``. With pseudo-gradients :math:`\Delta_i = x_t - x_{i,K}`: updates
    :math:`h_i \leftarrow h_i - \Delta_i` for the returned clients, then outputs
    :math:`\sum_i w_i \Delta_i - \frac1N \sum_j h_j` (``sgd(1.0)`` after it gives the official step).

    Args:
      num_clients: N, the rows of the table.
      weighting: ``"uniform"`` over the returned clients (official) or ``"examples"``.
    """
    n = check_int("num_clients", num_clients, 1)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    def init_fn(params):
        return FedSpeedState(jax.tree.map(lambda p: jnp.zeros((n,) + jnp.shape(p), jnp.result_type(p)), params),
                             jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        del params
        size = _leading(updates)
        mask = extra.get("mask")
        mask = jnp.ones((size,), bool) if mask is None else jnp.asarray(mask, bool)
        weights = client_weights(mask, weighting, extra)
        mean_delta = weighted_sum(updates, weights, mask)
        ids = extra.get("client_ids")
        ids = jnp.arange(size) if ids is None else jnp.asarray(ids, jnp.int32)
        at = jnp.where(mask, ids, n)  # out of range: no write
        table = jax.tree.map(lambda t, d: t.at[at].add(-d.astype(t.dtype), mode="drop"), state.correction, updates)
        direction = jax.tree.map(lambda m, t: m - jnp.mean(t, axis=0).astype(m.dtype), mean_delta, table)
        return direction, FedSpeedState(table, state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fedspeed(learning_rate: optax.ScalarOrSchedule = 1.0, *, num_clients: int,
             weighting: str = "uniform") -> optax.GradientTransformationExtraArgs:
    """FedSpeed's server rule: ``chain(scale_by_fedspeed(num_clients, weighting), sgd(learning_rate))``.

    ``learning_rate=1`` is the official server; run it with :func:`fedspeed_local_update`
    clients and ``client_context=fedspeed_context``.
    """
    return optax.chain(scale_by_fedspeed(num_clients, weighting), optax.sgd(learning_rate))


def fedspeed_local_update(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    data: ClientData,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    *,
    lamb: float = 0.1,
    rho: float = 0.1,
    alpha: float = 1.0,
    clip_norm: float | None = 10.0,
    shuffle: bool = True,
):
    r"""FedSpeed's client: ``local_update(params, client_id, num_steps, key, table) -> (params, {})``.

    Runs ``num_steps`` steps of the module docstring's rule from ``params`` with
    :math:`h_i` = ``table[client_id]``, minibatches walked as in
    :func:`~jaxopt_lab.distributed.federated.make_local_update`.

    Args:
      loss_fn: ``(params, x_batch, y_batch) -> per-example losses``.
      data: padded clients (:func:`pad_clients`).
      optimizer: applied to the direction :math:`d` (``optax.sgd(eta_l)``: official).
      batch_size: local minibatch size.
      lamb: :math:`\lambda`, the prox coefficient (official ``--lamb`` 0.1; the paper's :math:`1/\lambda`).
      rho: the perturbation radius :math:`\rho` (official ``--rho`` 0.1).
      alpha: the merge weight of the perturbed gradient (1: official).
      clip_norm: global-norm clip of :math:`\tilde g + \lambda(h_i - x_t)` (10: official; None: none).
      shuffle: shuffle each client's examples per dispatch.
    """
    lamb, rho, alpha = check_real("lamb", lamb), check_real("rho", rho), check_real("alpha", alpha)
    if lamb < 0:
        raise ValueError(f"lamb must be >= 0, got {lamb}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if clip_norm is not None:
        clip_norm = check_real("clip_norm", clip_norm)
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    walk = ClientWalk(data, optimizer, batch_size, shuffle)
    grad = jax.grad(functools.partial(walk.mean_loss, loss_fn))

    def local_update(params, client_id, num_steps, key, table):
        rows, n = walk.rows(client_id, key)
        h = jax.tree.map(lambda t, p: jnp.asarray(t[client_id], p.dtype), table, params)

        def step(s, carry):
            p, opt_state = carry
            idx, valid = walk.batch(rows, n, s)
            g1 = grad(p, idx, valid)
            if rho:
                scale = rho / (optax.tree.norm(g1) + 1e-7)
                g2 = grad(jax.tree.map(lambda w, g: w + scale * g, p, g1), idx, valid)
                g = g2 if alpha == 1.0 else jax.tree.map(lambda a, b: (1 - alpha) * a + alpha * b, g1, g2)
            else:
                g = g1
            if lamb:
                g = jax.tree.map(lambda gg, hh, w0: gg + lamb * (hh - w0), g, h, params)
            if clip_norm is not None:
                norm = optax.tree.norm(g)
                g = jax.tree.map(lambda gg: gg * jnp.minimum(1.0, clip_norm / (norm + 1e-6)), g)
            if lamb:
                g = jax.tree.map(lambda gg, w: gg + lamb * w, g, p)
            updates, opt_state = optimizer.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        out, _ = jax.lax.fori_loop(0, num_steps, step, (params, optimizer.init(params)))
        return out, {}

    return local_update
