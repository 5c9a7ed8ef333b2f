r"""DFedSAM: decentralized federated learning with local SAM steps, then gossip.

Shi, Shen, Wei, Sun, Yuan, Wang & Tao, "Improving the Model Consistency of
Decentralized Federated Learning" (ICML 2023), https://arxiv.org/abs/2302.04083.
Also DFedSAM-MGS (multiple gossip steps, ``gossip_steps = Q > 1``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.accounting import CommBytes, zero_comm
from jaxopt_lab.distributed.gossip import check_topology_arg, consensus_distance, mix, mix_bytes, resolve_topology
from jaxopt_lab.distributed.topology import Topology

AxisName = Any


class DFedSAMState(NamedTuple):
    inner_state: optax.OptState
    step: jax.Array  # int32: communication rounds done (calls of update)
    consensus: jax.Array  # float32: consensus distance of the parameters the last round produced
    bytes_sent: CommBytes  # payload and wire bytes (jaxopt_lab.distributed.accounting)


def _global_norm(tree) -> jax.Array:
    """Euclidean norm over all leaves, accumulated in float32 (or wider)."""
    leaves = [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def dfedsam(
    inner: optax.GradientTransformation,
    topology: Topology | str,
    rho: float = 0.05,
    local_steps: int = 1,
    gossip_steps: int = 1,
    axis_name: AxisName = "workers",
    eps: float = 1e-12,
    track_consensus: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""DFedSAM (Shi et al. 2023) for one worker of a named axis: K local SAM steps, then gossip.

    One call of ``update`` is one communication round :math:`t`. Worker
    :math:`i` starts from :math:`y^{0} = x_i` and takes :math:`K` =
    ``local_steps`` SAM steps on its own loss :math:`f_i`:

    .. math::
        g = \nabla f_i(y^{k}), \qquad
        \tilde y = y^{k} + \rho\, \frac{g}{\lVert g \rVert + \epsilon}, \qquad
        y^{k+1} = y^{k} + \mathrm{Inner}\bigl(\nabla f_i(\tilde y)\bigr),

    (``Inner`` = ``optax.sgd(η)`` gives the paper's :math:`y^{k+1} = y^k - \eta
    \nabla f_i(\tilde y)`; ``‖·‖`` is the global norm over all leaves), then
    :math:`Q` = ``gossip_steps`` gossip rounds (Q > 1 is DFedSAM-MGS):

    .. math:: x_i \leftarrow \bigl(M^{(tQ + Q - 1)} \cdots M^{(tQ)}\, Y\bigr)_i ,

    where :math:`M^{(s)}` is ``topology.mixing_matrix(s)`` (time-varying
    topologies advance one phase per gossip round).

    Gradients: ``update(grads, state, params, grad_fn=grad_fn)``.

    * ``grads`` is :math:`\nabla f_i(x_i)` on the minibatch of local step 0,
      the gradient the training loop computes anyway; it is the first ascent
      gradient.
    * ``grad_fn(params, k) -> grads`` (the habit of ``optax.contrib.sam``'s
      opaque mode) evaluates :math:`\nabla f_i` at any point on the minibatch
      of local step ``k`` (an int32 array in ``0..K-1``; ignore it to use one
      batch). Both gradients of a SAM step use the same ``k``, as in the paper.
      It is called ``2K − 1`` times per round (``K − 1`` when ``rho == 0``, where
      the perturbation vanishes and the ascent gradient is the SAM gradient),
      and may be omitted when ``rho == 0`` and ``K == 1``.

    With ``rho=0``, ``K=1``, ``Q=1`` this is :func:`~jaxopt_lab.distributed.gossip.gossip`
    with ``order="atc"`` (tested). The inner optimizer's state is kept per
    worker across rounds and not mixed. The paper's local optimizer is plain
    SGD, which has no state, and no official code is public; FedML-style
    reimplementations build a fresh (momentum) SGD each round, which is
    ``inner=optax.sgd(η)`` plus restarting the buffer: with a stateful inner,
    this transform's momentum instead carries over between rounds. The local
    steps run in a ``lax.fori_loop``.

    Communication: per round, Q gossip rounds of ``topology.messages(s) *
    tree_bytes(params)`` bytes each, counted in ``state.bytes_sent`` (payload =
    wire: point-to-point messages). The
    ``consensus`` field is as in ``gossip`` (its two all-reduces are a
    diagnostic, not counted; ``track_consensus=False`` skips it).

    Args:
      inner: the local optimizer applied to the SAM gradient (the paper: SGD).
      topology: the gossip topology, over as many workers as the axis has.
      rho: SAM perturbation radius ρ ≥ 0.
      local_steps: K ≥ 1, local SAM steps per round.
      gossip_steps: Q ≥ 1, gossip rounds per communication round.
      axis_name: the worker axis (a single name).
      eps: ε ≥ 0 added to the gradient norm (guards a zero gradient).
      track_consensus: whether to compute the consensus distance each round.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` and takes the extra argument ``grad_fn``.
    """
    check_topology_arg(topology)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not rho >= 0:
        raise ValueError(f"rho must be a number >= 0, got {rho!r}")
    if not _is_int(local_steps) or local_steps < 1:
        raise ValueError(f"local_steps must be an int >= 1, got {local_steps!r}")
    if not _is_int(gossip_steps) or gossip_steps < 1:
        raise ValueError(f"gossip_steps must be an int >= 1, got {gossip_steps!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    rho, eps = float(rho), float(eps)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return DFedSAMState(
            inner_state=inner.init(params),
            step=jnp.zeros((), jnp.int32),
            consensus=jnp.zeros((), jnp.float32),
            bytes_sent=zero_comm(),
        )

    def update_fn(
        grads,
        state,
        params=None,
        *,
        grad_fn: Callable[[optax.Params, jax.Array], optax.Updates] | None = None,
        **extra_args,
    ):
        if params is None:
            raise ValueError("dfedsam needs params: call update(grads, state, params, grad_fn=grad_fn)")
        topo = resolve_topology(topology, axis_name)
        if grad_fn is None and (rho > 0 or local_steps > 1):
            raise ValueError(
                f"dfedsam with rho={rho!r}, local_steps={local_steps!r} needs grad_fn: "
                f"call update(grads, state, params, grad_fn=grad_fn) with grad_fn(params, k) -> grads"
            )

        def sam_step(k, y, g, inner_state):
            if rho > 0:
                scale = rho / (_global_norm(g) + eps)
                perturbed = jax.tree.map(lambda p, d: (p + scale * d).astype(p.dtype), y, g)
                g = grad_fn(perturbed, k)
            u, inner_state = inner.update(g, inner_state, y, **extra_args)
            return optax.apply_updates(y, u), inner_state

        y, inner_state = sam_step(jnp.zeros((), jnp.int32), params, grads, state.inner_state)
        if local_steps > 1:

            def body(k, carry):
                y, inner_state = carry
                return sam_step(k, y, grad_fn(y, k), inner_state)

            y, inner_state = jax.lax.fori_loop(1, local_steps, body, (y, inner_state))

        sent = state.bytes_sent
        for q in range(gossip_steps):
            round_ = state.step * gossip_steps + q
            y = mix(y, topo, round_, axis_name)
            sent = mix_bytes(sent, topo, round_, params)
        consensus = consensus_distance(y, axis_name).astype(jnp.float32) if track_consensus else state.consensus
        out = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), y, params)
        return out, DFedSAMState(inner_state, state.step + 1, consensus, sent)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
