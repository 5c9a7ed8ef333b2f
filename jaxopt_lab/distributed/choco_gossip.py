"""CHOCO-SGD: gossip with compressed messages and error-free public copies.

Koloskova, Stich & Jaggi, "Decentralized Stochastic Optimization and Gossip
Algorithms with Compressed Communication" (ICML 2019), https://arxiv.org/abs/1902.00340.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.accounting import CommBytes, add_message_bytes, zero_comm
from jaxopt_lab.distributed.gossip import check_topology_arg, mix, resolve_topology
from jaxopt_lab.distributed.topology import Topology

AxisName = Any


class ChocoGossipState(NamedTuple):
    inner_state: optax.OptState
    public: optax.Params  # x̂_i: this worker's public copy, known to its neighbours
    mixed_public: optax.Params  # s_i = Σ_j W_ij x̂_j, kept up to date from the messages
    compressor_state: Any
    step: jax.Array
    key: jax.Array
    bytes_sent: CommBytes  # payload and wire bytes (jaxopt_lab.distributed.accounting)


def choco_gossip(
    inner: optax.GradientTransformation,
    topology: Topology | str,
    compressor: Any,
    consensus_lr: float = 1.0,
    consensus_first: bool = True,
    seed: int = 0,
    axis_name: AxisName = "workers",
) -> optax.GradientTransformation:
    r"""CHOCO-SGD for one worker of a named axis, over a static topology, in the authors' code's order.

    Each worker keeps a public copy :math:`\hat x_i` of its parameters (all
    start at 0) and, instead of a copy of every neighbour's, their weighted sum
    :math:`s_i = \sum_j W_{ij} \hat x_j` (the update is linear in the messages).
    One step, as the official code does it (epfml/ChocoSGD:
    ``convex_code/logistic.py``, ``fit``, the ``"choco"`` branch, and
    ``dl_code/pcode/optim/parallel_choco.py``: ``update_params_from_neighbor``
    before ``compressor.pipeline``; also Algorithm 1 of Koloskova, Lin, Stich &
    Jaggi, ICLR 2020): the gossip correction uses the public copies as they
    were, then the corrected parameters are compressed against them:

    .. math::
        x_i^{t+\frac12} &= x_i^t + \mathrm{Inner}(g_i^t) \\
        x_i^{t+1} &= x_i^{t+\frac12} + \gamma\,(s_i - \hat x_i) \\
        q_i &= C\bigl(x_i^{t+1} - \hat x_i\bigr) \quad \text{(sent to the neighbours)} \\
        \hat x_i &\leftarrow \hat x_i + q_i, \qquad s_i \leftarrow s_i + \textstyle\sum_j W_{ij}\, q_j

    With an exact compressor, γ = 1 and identical starting parameters this is
    combine-then-adapt gossip, ``gossip(order="cta")`` (tested).

    ``consensus_first=False`` is Algorithm 2 of the ICML 2019 paper as printed
    (the order its analysis is written in): compress
    :math:`x_i^{t+\frac12} - \hat x_i`, update :math:`\hat x, s`, then
    :math:`x_i^{t+1} = x_i^{t+\frac12} + \gamma\,(s_i - \hat x_i)` with the new
    copies; with an exact compressor and γ = 1 that is adapt-then-combine gossip.

    C is the ``compressor``, a memoryless one (top-k without error feedback,
    quantization, ... of ``jaxopt_lab.distributed.compression``: the paper's Q;
    the public copy already holds the remainder, so a compressor with error
    feedback is refused) and γ = ``consensus_lr`` (a required, tuned value in
    the official code; 1 here).
    Bytes: the compressor's payload once per neighbour message (payload = wire:
    point-to-point messages).

    Args:
      inner: the local optimizer.
      topology: a static :class:`Topology` or its name ("ring", "torus2d", "complete").
      compressor: a compressor with ``init`` / ``compress``.
      consensus_lr: γ in (0, 1].
      consensus_first: the official code's order (default); False: the ICML 2019 Algorithm 2 order.
      seed: seed of the stochastic-rounding key.
      axis_name: the worker axis (a single name).
    """
    check_topology_arg(topology)
    if not hasattr(compressor, "compress"):
        raise ValueError(f"compressor must be a jaxopt_lab.distributed.compression compressor, got {compressor!r}")
    probe = {"matrix": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    if jax.tree.leaves(jax.eval_shape(compressor.init, probe)):
        raise ValueError(
            "choco_gossip needs a memoryless compressor (x_hat already carries what was not sent; error "
            f"feedback on top feeds it back twice and diverges), got one that keeps state: {compressor!r}; "
            "use e.g. top_k(k, error_feedback=False) or quantize(...)"
        )
    if not isinstance(consensus_first, bool):
        raise ValueError(f"consensus_first must be a bool, got {consensus_first!r}")
    if not 0.0 < consensus_lr <= 1.0:
        raise ValueError(f"consensus_lr must be in (0, 1], got {consensus_lr!r}")

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ChocoGossipState(
            inner_state=inner.init(params),
            public=zeros,
            mixed_public=zeros,
            compressor_state=compressor.init(params),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key_data(jax.random.key(seed)),
            bytes_sent=zero_comm(),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("choco_gossip needs params: call update(grads, state, params)")
        topo = resolve_topology(topology, axis_name)
        if topo.period != 1:
            raise ValueError(f"choco_gossip needs a static topology, got the time-varying {topo.name}")
        local_updates, inner_state = inner.update(updates, state.inner_state, params)
        half = optax.apply_updates(params, local_updates)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        gossip_step = lambda x, s, p: jax.tree.map(  # noqa: E731
            lambda x, s, p: (x + consensus_lr * (s - p)).astype(x.dtype), x, s, p)
        sent_from = gossip_step(half, state.mixed_public, state.public) if consensus_first else half
        diff = jax.tree.map(lambda h, p: h - p, sent_from, state.public)
        q, comp_state, nbytes = compressor.compress(diff, state.compressor_state, key, state.step)
        public = jax.tree.map(lambda p, d: p + d, state.public, q)
        mixed_public = jax.tree.map(lambda s, m: s + m, state.mixed_public, mix(q, topo, 0, axis_name))
        sent = add_message_bytes(state.bytes_sent, nbytes, times=topo.messages(0))
        new = sent_from if consensus_first else gossip_step(half, mixed_public, public)
        out = jax.tree.map(lambda n, p: n - p, new, params)
        return out, ChocoGossipState(inner_state, public, mixed_public, comp_state, state.step + 1, state.key, sent)

    return optax.GradientTransformation(init_fn, update_fn)
