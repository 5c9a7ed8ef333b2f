r"""FedZO: federated zeroth-order optimization with the two-point random-direction estimator.

Fang, Yu, Jiang, Shi & Jones, "Communication-Efficient Stochastic Zeroth-Order
Optimization for Federated Learning" (IEEE TSP 2022), https://arxiv.org/abs/2201.09531.

Clients only *query* values of their objective :math:`f_k`; each local step
estimates the gradient from ``num_directions`` :math:`= q` random unit directions
:math:`u_j` (uniform on the sphere) and the smoothing radius :math:`\mu`:

.. math::

   \hat g(x) = \frac{d}{q} \sum_{j=1}^q \frac{f_k(x + \mu u_j) - f_k(x)}{\mu}\, u_j,

and takes an optimizer step on :math:`\hat g` (``optax.sgd(lr)``: the paper);
the server is FedAvg. A step costs :math:`q + 1` queries. ``orthogonal=True``
orthonormalizes the directions first (Gram-Schmidt, as the random-gradient-free
baseline of the FZooS code does, ``optimizers.py: rgf_opt``); with
:math:`q = d` orthonormal directions the estimator is the forward-difference
gradient along a basis (exact for a linear :math:`f_k`). ``scale="mean"`` uses
:math:`\frac1q` instead of :math:`\frac dq` (the FZooS code's baseline).

The estimator, the uniform server mean and the global step 1 are those of the
authors' code (noobyzy/FedZO, ``ObjFunc.GradEst``: ``d / (mu q) (f(x + mu u) - f(x)) u``
summed over q sphere directions; ``alg_FedZO.py``: the mean of the participants' model
changes added to the model). That code evaluates :math:`f_k` on a fresh minibatch of
``local_bs`` examples at every local step; :func:`client_objective` evaluates the
client's whole data (the official run with ``local_bs`` at least the client's size).

The objective is ``value_fn(params, client_id) -> scalar`` (e.g.
:func:`client_objective`: a client's mean loss over its data). Queries are
counted: the client returns ``aux = {"queries": q_k}`` and :func:`count_queries`
(in :func:`fedzo`) sums them in its state; run with
``client_context=fedzo_context``::

    local = fl.fedzo_local_update(fl.client_objective(loss_fn, clients), optax.sgd(0.01), 20, 1e-3)
    sim = fl.FederatedSimulator(local, fl.fedzo(), fl.SyncRound(5), num_clients=5,
                                local_steps=10, client_context=fl.fedzo_context)
    state, _ = sim.run(sim.init(params), 50)
    fl.query_count(state.rule_state)          # function queries made by all clients so far
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated._checks import check_int, check_real
from jaxopt_lab.distributed.federated.fedavg import fedavg
from jaxopt_lab.distributed.federated.local import ClientData, _key_data

SCALES = ("dimension", "mean")


class QueryCountState(NamedTuple):
    """Function queries made by the clients whose updates the server has consumed."""

    queries: jax.Array  # int32


def client_objective(loss_fn: Callable, data: ClientData) -> Callable:
    """``value_fn(params, client_id)``: the mean of ``loss_fn`` over the client's examples (its full data)."""
    x, y, sizes = data.x, data.y, data.sizes
    rows = jnp.arange(data.max_size)

    def value_fn(params, client_id):
        losses = loss_fn(params, x[client_id], y[client_id])
        valid = rows < sizes[client_id]
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(sizes[client_id], 1)

    return value_fn


def count_queries() -> optax.GradientTransformationExtraArgs:
    """Identity on the updates; sums ``client_aux["queries"]`` of the masked lanes into :class:`QueryCountState`."""

    def init_fn(params):
        del params
        return QueryCountState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        del params
        aux = extra.get("client_aux")
        if aux is None or "queries" not in aux:
            raise ValueError("count_queries needs client_aux={'queries': ...}: run zeroth-order clients with "
                             "FederatedSimulator(..., client_context=fedzo_context)")
        q = jnp.asarray(aux["queries"], jnp.int32)
        mask = extra.get("mask")
        mask = jnp.ones(q.shape, bool) if mask is None else jnp.asarray(mask, bool)
        return updates, QueryCountState(state.queries + jnp.sum(jnp.where(mask, q, 0)))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def query_count(rule_state) -> jax.Array:
    """Queries counted so far: from the first :class:`QueryCountState` (or FZooS state) in ``rule_state``."""
    found = [s for s in jax.tree.leaves(rule_state, is_leaf=lambda x: hasattr(x, "queries") and isinstance(x, tuple))
             if hasattr(s, "queries")]
    if not found:
        raise ValueError("query_count: the rule state holds no query counter (use fedzo() or fzoos())")
    return found[0].queries


def fedzo_context(rule_state):
    """The ``client_context`` for FedZO clients: nothing (the context only lets them return their query counts)."""
    del rule_state
    return ()


def fedzo(learning_rate: optax.ScalarOrSchedule = 1.0, weighting: str = "uniform",
          momentum: float | None = None) -> optax.GradientTransformationExtraArgs:
    """FedZO's server: ``chain(count_queries(), fedavg(learning_rate, momentum, weighting=weighting))``.

    ``weighting="uniform"``: the objective :math:`\\frac1N \\sum_k f_k` of the paper.
    """
    return optax.chain(count_queries(), fedavg(learning_rate, momentum, weighting=weighting))


def random_directions(key, counter, num: int, dim: int, orthogonal: bool = False) -> jax.Array:
    """``(num, dim)`` unit directions, uniform on the sphere (Box-Muller normals, normalized), from the uint32
    key and an int counter; ``orthogonal``: orthonormalized (QR: Gram-Schmidt's result up to signs, ``num <= dim``)."""
    u1 = 1.0 - _rng.uniform(key, counter, 0, size=num * dim)
    u2 = _rng.uniform(key, counter, 1, size=num * dim)
    z = (jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)).reshape(num, dim)
    if orthogonal:
        q, r = jnp.linalg.qr(z.T)
        return (q * jnp.sign(jnp.diagonal(r))).T  # the Gram-Schmidt basis of the rows, in order
    return z / jnp.linalg.norm(z, axis=1, keepdims=True)


def fedzo_local_update(
    value_fn: Callable[[Any, jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    num_directions: int,
    smoothing: float,
    *,
    orthogonal: bool = False,
    scale: str = "dimension",
):
    r"""FedZO's client: ``local_update(params, client_id, num_steps, key, context) -> (params, {"queries"})``.

    Args:
      value_fn: ``(params, client_id) -> scalar``: one query of the client's objective.
      optimizer: applied to :math:`\hat g` (fresh state per dispatch; ``optax.sgd(lr)``: the paper).
      num_directions: :math:`q`, directions per step.
      smoothing: :math:`\mu > 0`.
      orthogonal: orthonormalize the directions (needs ``q <= d``).
      scale: ``"dimension"`` (:math:`d/q`, the paper) or ``"mean"`` (:math:`1/q`, the FZooS code's baseline).
    """
    q = check_int("num_directions", num_directions, 1)
    mu = check_real("smoothing", smoothing)
    if not mu > 0:
        raise ValueError(f"smoothing must be > 0, got {mu}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")

    def local_update(params, client_id, num_steps, key, context=()):
        del context
        x0, unravel = ravel_pytree(params)
        d = x0.shape[0]
        if orthogonal and q > d:
            raise ValueError(f"orthogonal directions need num_directions <= the dimension {d}, got {q}")
        coef = (d if scale == "dimension" else 1.0) / q
        kd = _key_data(key)
        f = lambda z: value_fn(unravel(z), client_id)  # noqa: E731

        def step(s, carry):
            x, opt_state = carry
            u = random_directions(kd, s, q, d, orthogonal).astype(x.dtype)
            fx = f(x)
            fu = jax.vmap(lambda ui: f(x + mu * ui))(u)
            g = coef * ((fu - fx) / mu) @ u
            updates, opt_state = optimizer.update(g, opt_state, x)
            return optax.apply_updates(x, updates), opt_state

        x, _ = jax.lax.fori_loop(0, num_steps, step, (x0, optimizer.init(x0)))
        return unravel(x), {"queries": (num_steps * (q + 1)).astype(jnp.int32)}

    return local_update
