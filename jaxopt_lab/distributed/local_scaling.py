r"""Local SGD with adaptivity via scaling: a diagonal preconditioner shared by all workers.

Chezhegov, Skorik, Khachaturov, Shalagin, Avetisyan, Takáč, Kholodov & Beznosikov,
"Local Methods with Adaptivity via Scaling" (2024), https://arxiv.org/abs/2406.00846.

Local SGD whose local steps are scaled by a diagonal preconditioner :math:`\hat D`
that is the **same on every worker** and **fixed within a communication round**; it
is refreshed only when the workers communicate, from the workers' averaged statistic
at the synchronized point. Round :math:`p` (H local steps from the averaged
:math:`\bar x^{p}`), worker :math:`w`:

.. math::

   s^{p} &= \Bigl(\tfrac1W \textstyle\sum_w g_w(\bar x^{p})\Bigr)^{\odot 2}
        \quad \text{(Adam, RMSProp)}, \qquad
   s^{p} = \tfrac1W \textstyle\sum_w z_w \odot \nabla^2 f_w(\bar x^{p}) z_w \quad \text{(OASIS)}, \\
   v^{p} &= \beta v^{p-1} + (1 - \beta) s^{p} \quad (v^{0} = s^{0}), \qquad
   \hat D^{p} = \max\bigl(\alpha, D^{p}\bigr),\quad
   D^{p} = \sqrt{v^{p} / (1 - \beta^{p+1})}\ (\text{Adam}),\ \sqrt{v^{p}}\ (\text{RMSProp}),\ |v^{p}|\ (\text{OASIS}), \\
   x_w &\leftarrow x_w - \eta\, (\hat D^{p})^{-1} g_w(x_w) \quad \text{(H local steps)}, \qquad
   \bar x^{p+1} = \tfrac1W \textstyle\sum_w x_w .

(:math:`z_w` Rademacher; Adam's :math:`v` starts from 0 with its bias correction, which gives
:math:`v^0 = s^0` too.) ``scaling="identity"`` (:math:`\hat D = I`) is local SGD exactly.

What is our reading (the paper's algorithm, not code): the statistic is taken on the
first local step of each round, i.e. at the point the workers just averaged (step 0:
the common initial point), and all-reduced there (one extra all-reduce of a gradient per
round; the bytes are counted); ``hessian_diag`` (OASIS) is supplied by the caller
(:func:`hutchinson_diagonal`), since a transform sees gradients only.

Synchronization as in :func:`~jaxopt_lab.distributed.local_sgd`: ``update(..., sync=...)``
static (``-1``: a local step with no collective; ``0``: a step that refreshes the scaling
and/or averages, chosen in the graph), ``None`` decides in the graph; ``state.next_sync``
says which the next update needs.

In the federated simulator the same method is :func:`scaled_local_update` clients with
the rule and context of :func:`local_scaling_server`: there a
round's :math:`\hat D` is built from the gradients the clients of the *previous* round
computed at the model they were sent (a client cannot wait for the others' gradients
before its local steps without a second round trip), and :math:`\hat D = I` in the first round.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed import collectives
from jaxopt_lab.distributed.accounting import CommBytes, add_pmean_bytes, tree_bytes, zero_comm
from jaxopt_lab.distributed.sync import NO_SYNC, check_sync

SCALINGS = ("adam", "rmsprop", "oasis", "identity")


class LocalScalingState(NamedTuple):
    step: jax.Array  # int32: local steps taken
    since_sync: jax.Array  # int32: local steps since the last averaging
    v: Any  # the scaling statistic's running average (params-like)
    count: jax.Array  # int32: scaling refreshes so far
    bytes_sent: CommBytes
    next_sync: jax.Array  # int32: 0 if the next update communicates, else -1


def _traced(x) -> bool:  # inject_hyperparams passes arrays: checked by the caller, not here
    return isinstance(x, jax.Array) or hasattr(x, "aval")


def _check(scaling, beta, alpha, sync_every=1):
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if not _traced(beta) and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not _traced(alpha) and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")


def scaling_statistic(scaling: str, mean_grad, mean_hessian_diag=None):
    """:math:`s`: the squared mean gradient (Adam, RMSProp) or the mean Hutchinson diagonal (OASIS)."""
    if scaling == "oasis":
        if mean_hessian_diag is None:
            raise ValueError("scaling='oasis' needs hessian_diag (see hutchinson_diagonal)")
        return mean_hessian_diag
    return jax.tree.map(jnp.square, mean_grad)


def refresh_average(scaling: str, beta: float, v, count, stat):
    """:math:`v \\leftarrow \\beta v + (1-\\beta) s` (the first refresh: :math:`v = s`; Adam: from 0)."""
    if scaling == "adam":
        return jax.tree.map(lambda a, s: beta * a + (1 - beta) * s, v, stat)
    first = count == 0
    return jax.tree.map(lambda a, s: jnp.where(first, s, beta * a + (1 - beta) * s), v, stat)


def preconditioner(scaling: str, beta: float, alpha: float, v, count):
    r""":math:`\hat D = \max(\alpha, D)` from the running average ``v`` after ``count`` refreshes."""
    if scaling == "identity":
        return jax.tree.map(jnp.ones_like, v)
    if scaling == "adam":
        corr = 1.0 - jnp.power(jnp.float32(beta), jnp.maximum(count, 1).astype(jnp.float32))
        d = jax.tree.map(lambda a: jnp.sqrt(a / corr), v)
    elif scaling == "rmsprop":
        d = jax.tree.map(jnp.sqrt, v)
    else:
        d = jax.tree.map(jnp.abs, v)
    return jax.tree.map(lambda x: jnp.maximum(alpha, x), d)


def hutchinson_diagonal(loss_fn: Callable, params, key, *args):
    r"""OASIS's Hutchinson estimate :math:`z \odot \nabla^2 f(x) z`, :math:`z` Rademacher from ``key``."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    z = jax.tree.unflatten(treedef, [jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x))
                                     for k, x in zip(keys, leaves)])
    _, hz = jax.jvp(jax.grad(lambda p: loss_fn(p, *args)), (params,), (z,))
    return jax.tree.map(lambda a, b: a * b, z, hz)


def local_scaling(
    learning_rate: optax.ScalarOrSchedule,
    scaling: str = "adam",
    sync_every: int = 4,
    beta: float = 0.999,
    alpha: float = 1e-8,
    axis_name: Any = "workers",
) -> optax.GradientTransformationExtraArgs:
    """Local SGD scaled by a preconditioner synchronized across workers (module docstring).

    Args:
      learning_rate: :math:`\\eta` (float or schedule over local steps).
      scaling: ``"adam"``, ``"rmsprop"``, ``"oasis"`` or ``"identity"`` (plain local SGD).
      sync_every: H, local steps per round.
      beta: :math:`\\beta` of the running average.
      alpha: the floor :math:`\\alpha` of :math:`\\hat D`.
      axis_name: the worker axis.

    Extra update arguments: ``sync`` (static, see the module docstring) and, for OASIS,
    ``hessian_diag`` (this worker's :func:`hutchinson_diagonal` at ``params``).
    """
    _check(scaling, beta, alpha, sync_every)
    lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def next_after(since):
        return jnp.where((since == 0) | (since + 1 >= sync_every), 0, NO_SYNC).astype(jnp.int32)

    def init_fn(params):
        zero = jnp.zeros((), jnp.int32)
        v = jax.tree.map(jnp.zeros_like, params)
        return LocalScalingState(zero, zero, v, zero, zero_comm(), next_after(zero))

    def update_fn(grads, state, params=None, *, sync=None, hessian_diag=None, **extra):
        del extra
        if params is None:
            raise ValueError("local_scaling needs params: call update(grads, state, params)")
        sync = check_sync(sync, 1, "local_scaling")
        if scaling == "oasis" and hessian_diag is None and sync != NO_SYNC:
            raise ValueError("scaling='oasis' needs update(..., hessian_diag=...) (see hutchinson_diagonal)")
        v, count, sent = state.v, state.count, state.bytes_sent
        if scaling != "identity" and sync != NO_SYNC:
            payload = hessian_diag if scaling == "oasis" else grads

            def refresh(_):
                mean = collectives.pmean(payload, axis_name)
                stat = scaling_statistic(scaling, mean, mean)
                return (refresh_average(scaling, beta, v, count, stat), count + 1,
                        add_pmean_bytes(sent, tree_bytes(payload), axis_name))

            v, count, sent = jax.lax.cond(state.since_sync == 0, refresh, lambda _: (v, count, sent), None)
        d = preconditioner(scaling, beta, alpha, v, count)
        eta = lr(state.step)
        local = jax.tree.map(lambda p, g, dd: p - (eta * g / dd).astype(p.dtype), params, grads, d)
        since = state.since_sync + 1

        def average(_):
            mean = collectives.pmean(local, axis_name)
            return mean, jnp.zeros((), jnp.int32), add_pmean_bytes(sent, tree_bytes(local), axis_name)

        if sync == NO_SYNC:
            new, since_out = local, since
        else:
            new, since_out, sent = jax.lax.cond(since >= sync_every, average, lambda _: (local, since, sent), None)
        updates = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new, params)
        return updates, LocalScalingState(state.step + 1, since_out, v, count, sent, next_after(since_out))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------ the federated simulator's form


class LocalScalingServerState(NamedTuple):
    v: Any  # running average of the statistic (params-like)
    count: jax.Array  # int32: refreshes so far (0: identity scaling)


def local_scaling_server(scaling: str = "adam", beta: float = 0.999, alpha: float = 1e-8,
                         learning_rate: optax.ScalarOrSchedule = 1.0, weighting: str = "examples"):
    """The simulator's server rule for :func:`scaled_local_update` clients: FedAvg of the
    pseudo-gradients, and a refresh of the scaling statistic from the clients' ``client_aux["stat"]``
    (each client's gradient, or Hutchinson diagonal, at the model it was sent).

    Returns ``(rule, client_context)``: pass both to :class:`FederatedSimulator`.
    """
    from jaxopt_lab.distributed.federated.aggregate import WEIGHTINGS, client_weights, weighted_sum
    from jaxopt_lab.distributed.federated.fedavg import fedavg

    _check(scaling, beta, alpha)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    def init_fn(params):
        return LocalScalingServerState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        del params
        aux = extra.get("client_aux")
        if aux is None or "stat" not in aux:
            raise ValueError("local_scaling_server needs client_aux={'stat'}: use scaled_local_update clients")
        mask = jnp.asarray(extra["mask"], bool)
        w = client_weights(mask, weighting, extra)
        mean = weighted_sum(aux["stat"], w, mask)
        stat = scaling_statistic(scaling, mean, mean)
        any_ = jnp.any(mask)
        v = jax.tree.map(lambda new, old: jnp.where(any_, new, old),
                         refresh_average(scaling, beta, state.v, state.count, stat), state.v)
        return updates, LocalScalingServerState(v, state.count + any_.astype(jnp.int32))

    holder = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    rule = optax.chain(holder, fedavg(learning_rate, weighting=weighting))

    def context(rule_state):
        found = [s for s in jax.tree.leaves(rule_state, is_leaf=lambda x: isinstance(x, LocalScalingServerState))
                 if isinstance(s, LocalScalingServerState)]
        if not found:
            raise ValueError("the rule state holds no LocalScalingServerState (is the rule local_scaling_server's?)")
        st = found[0]
        d = preconditioner(scaling, beta, alpha, st.v, st.count)
        return jax.tree.map(lambda x: jnp.where(st.count > 0, x, jnp.ones_like(x)), d)

    return rule, context


def scaled_local_update(loss_fn: Callable, data, learning_rate: float, batch_size: int, *,
                        scaling: str = "adam", shuffle: bool = True):
    r"""The simulator's client: ``local_update(params, client_id, num_steps, key, D) -> (params, aux)``:
    ``num_steps`` steps :math:`x \leftarrow x - \eta\, g / \hat D` (minibatches walked as in
    :func:`~jaxopt_lab.distributed.federated.make_local_update`) and ``aux = {"stat": the first
    minibatch's gradient at the received model}`` (OASIS: its Hutchinson diagonal there)."""
    from jaxopt_lab.distributed.federated.local import ClientWalk, _key_data

    _check(scaling, 0.0, 1.0)
    walk = ClientWalk(data, optax.sgd(learning_rate), batch_size, shuffle)
    mean_loss = functools.partial(walk.mean_loss, loss_fn)
    grad = jax.grad(mean_loss)

    def local_update(params, client_id, num_steps, key, d):
        rows, n = walk.rows(client_id, key)
        idx0, valid0 = walk.batch(rows, n, 0)
        if scaling == "oasis":
            stat = hutchinson_diagonal(mean_loss, params, jax.random.wrap_key_data(_key_data(key)), idx0, valid0)
        else:
            stat = grad(params, idx0, valid0)

        def step(s, p):
            idx, valid = walk.batch(rows, n, s)
            return jax.tree.map(lambda w, g, dd: w - learning_rate * g / dd, p, grad(p, idx, valid), d)

        return jax.lax.fori_loop(0, num_steps, step, params), {"stat": stat}

    return local_update
