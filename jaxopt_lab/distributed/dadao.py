r"""DADAO: decoupled, accelerated, decentralized, asynchronous optimization (Nabli & Oyallon, ICML 2023).

Nabli & Oyallon, "DADAO: Decoupled Accelerated Decentralized Asynchronous
Optimization" (ICML 2023), https://arxiv.org/abs/2208.00779; official code
https://github.com/AdelNabli/DADAO (``optimizers.py``, ``DADAO_optimizer``),
whose constants and event rules are reproduced here.

Minimize :math:`\sum_i f_i(x)` (:math:`f_i` :math:`\mu`-strongly convex,
:math:`L`-smooth) over a graph of :math:`n` nodes. Two independent Poisson
processes drive the events: gradient events (rate :math:`\lambda_g = n`
over the graph, a uniform node :math:`i`) and communication events (rate
:math:`\lambda_c = \sqrt{2\chi_1\chi_2}`, a uniform edge :math:`(i, j)`), with
:math:`\chi_1 = 1/\lambda_2^+(\mathcal L/|E|)` and :math:`\chi_2 = \max_{(i,j)}
\tfrac12 (e_i - e_j)^\top (\mathcal L/|E|)^+ (e_i - e_j)` of the graph
Laplacian :math:`\mathcal L` (:func:`graph_constants`). Each node holds six
vectors :math:`(x, \tilde x, y, \tilde y, z, \tilde z)`, all zero but
:math:`x`. Between its events a node's variables follow the linear ODE
:math:`\dot P = M P` (``ode_matrix``), applied exactly as
:math:`P \leftarrow e^{M \Delta t} P` at the node's next event. With
:math:`\nu = \mu/2`:

* gradient event at node :math:`i`, with
  :math:`r = \nabla f_i(x_i) - \nu x_i - \tilde y_i`:
  :math:`x_i \mathrel{-}= \gamma r`, :math:`\tilde x_i \mathrel{-}= \tilde\gamma r`,
  :math:`\tilde y_i \mathrel{+}= (\delta + \tilde\delta) r`;
* communication event on edge :math:`(i, j)`, with
  :math:`m = (y_i + z_i) - (y_j + z_j)`:
  :math:`z_i \mathrel{-}= \beta m`, :math:`\tilde z_i \mathrel{-}= \tilde\beta m`,
  and the same at :math:`j` with :math:`-m`.

Constants (official code): :math:`\alpha = \tfrac14\sqrt{\nu/L}`,
:math:`\tilde\alpha = \tfrac18\sqrt{\nu/L}`, :math:`\eta = \tilde\eta =
\tfrac18\sqrt{\nu/L}`, :math:`\theta = \tfrac12\sqrt{L/\nu}`, :math:`\beta =
\tfrac12`, :math:`\tilde\beta = 2\chi_1^*\sqrt{L/\nu}`, :math:`\delta =
\tfrac14\sqrt{\nu/L}`, :math:`\tilde\delta = 1`, :math:`\gamma = 1/(4L)`,
:math:`\tilde\gamma = 1/(4\sqrt{L\nu})`, with :math:`\chi_1^* = \chi_1 /
\lambda_c`.

Graphs: the undirected union of the edges of every phase of a
:class:`~jaxopt_lab.distributed.topology.Topology` (ring, torus, exponential),
used as one static graph (the paper's time-varying graphs are not used here).
The run is a ``lax.scan`` over a pre-drawn event sequence (:func:`dadao_events`),
the asynchronous event simulation of the paper's code; per event it records
the mean squared distance of the nodes' :math:`x_i` to a given :math:`x^\star`.
Communication bytes: each communication event exchanges one vector each way
(:math:`y + z`, :math:`2 d` values), counted by the caller from the events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.distributed.topology import Topology, topology_for


class DADAOState(NamedTuple):
    """Per node (leading axis n): the six variables and the time of the node's last event."""

    x: jax.Array
    x_tilde: jax.Array
    y: jax.Array
    y_tilde: jax.Array
    z: jax.Array
    z_tilde: jax.Array
    t_last: jax.Array


class Events(NamedTuple):
    """A pre-drawn event sequence: time, whether a gradient event, node i (grad) or edge (i, j) (comm; j = -1 for grad)."""

    times: np.ndarray
    is_grad: np.ndarray
    i: np.ndarray
    j: np.ndarray


def graph_edges(topology: Topology | str, num_nodes: int | None = None) -> list[tuple[int, int]]:
    """Undirected edges (i < j) of the union of every phase of ``topology``."""
    if isinstance(topology, str):
        if num_nodes is None:
            raise ValueError(f"num_nodes is needed with a topology name, got topology={topology!r}")
        topology = topology_for(topology, num_nodes)
    edges = set()
    for p in range(topology.period):
        m = topology.mixing_matrix(p)
        for i, j in zip(*np.nonzero(m)):
            if i != j:
                edges.add((min(i, j), max(i, j)))
    return sorted((int(a), int(b)) for a, b in edges)


def graph_constants(num_nodes: int, edges) -> tuple[float, float, float]:
    r"""``(chi_1, chi_2, lamb_mix)`` of the official code for uniform edge sampling:
    :math:`\chi_1 = 1/\lambda_2(\mathcal L/|E|)`, :math:`\chi_2` the largest edge resistance
    :math:`\tfrac12 (e_i-e_j)^\top (\mathcal L/|E|)^+ (e_i-e_j)`, :math:`\lambda_c = \sqrt{2\chi_1\chi_2}`."""
    lap = np.zeros((num_nodes, num_nodes))
    for i, j in edges:
        lap[i, i] += 1
        lap[j, j] += 1
        lap[i, j] -= 1
        lap[j, i] -= 1
    lap /= len(edges)
    eig = np.linalg.eigvalsh(lap)
    if eig[1] <= 1e-12:
        raise ValueError(f"the graph with edges {edges} is not connected")
    chi_1 = 1.0 / eig[1]
    pinv = np.linalg.pinv(lap)
    chi_2 = max(0.5 * (pinv[i, i] + pinv[j, j] - 2 * pinv[i, j]) for i, j in edges)
    return float(chi_1), float(chi_2), float(np.sqrt(2 * chi_1 * chi_2))


def dadao_events(num_nodes: int, edges, t_max: float, lamb_grad: float | None = None,
                 lamb_mix: float | None = None, seed: int = 0) -> Events:
    """The two Poisson processes of the paper merged: rate ``lamb_grad + lamb_mix`` (defaults: n and
    :func:`graph_constants`' rate), each event a gradient event with probability ``lamb_grad / total``
    at a uniform node, else a communication event on a uniform edge. Seeded (numpy)."""
    if not t_max > 0:
        raise ValueError(f"t_max must be > 0, got {t_max!r}")
    edges = np.asarray(edges, int)
    if edges.ndim != 2 or edges.shape[1] != 2 or len(edges) == 0:
        raise ValueError(f"edges must be a non-empty list of pairs, got shape {edges.shape}")
    lamb_grad = float(num_nodes) if lamb_grad is None else float(lamb_grad)
    lamb_mix = graph_constants(num_nodes, edges)[2] if lamb_mix is None else float(lamb_mix)
    if lamb_grad <= 0 or lamb_mix <= 0:
        raise ValueError(f"rates must be > 0, got lamb_grad={lamb_grad}, lamb_mix={lamb_mix}")
    rng = np.random.default_rng(seed)
    total = lamb_grad + lamb_mix
    count = int(t_max * total * 1.2 + 50)
    times = np.cumsum(rng.exponential(1.0 / total, count))
    times = times[times < t_max]
    k = len(times)
    is_grad = rng.random(k) < lamb_grad / total
    node = rng.integers(0, num_nodes, k)
    edge = edges[rng.integers(0, len(edges), k)]
    i = np.where(is_grad, node, edge[:, 0])
    j = np.where(is_grad, -1, edge[:, 1])
    return Events(times, is_grad, i.astype(np.int32), j.astype(np.int32))


def dadao_constants(mu: float, L: float, chi_1_star: float) -> dict:
    """The official code's constants and 6x6 ODE matrix (module docstring)."""
    if not (0 < mu <= L):
        raise ValueError(f"need 0 < mu <= L, got mu={mu!r}, L={L!r}")
    if not chi_1_star > 0:
        raise ValueError(f"chi_1_star must be > 0, got {chi_1_star!r}")
    nu = mu / 2
    alpha, alpha_t = 0.25 * np.sqrt(nu / L), 0.125 * np.sqrt(nu / L)
    eta = eta_t = 0.125 * np.sqrt(nu / L)
    theta = 0.5 * np.sqrt(L / nu)
    m = np.zeros((6, 6))
    m[0, 0], m[0, 1], m[1, 0], m[1, 1] = -eta, eta, eta_t, -eta_t
    m[2, 2], m[2, 3] = -alpha, alpha
    m[3, 1], m[3, 2], m[3, 4] = -theta * nu, -theta, -theta
    m[4, 4], m[4, 5], m[5, 4], m[5, 5] = -alpha, alpha, alpha_t, -alpha_t
    return dict(nu=nu, beta=0.5, beta_tilde=2 * chi_1_star * np.sqrt(L / nu), delta=0.25 * np.sqrt(nu / L),
                delta_tilde=1.0, gamma=1 / (4 * L), gamma_tilde=1 / (4 * np.sqrt(L * nu)), ode_matrix=m)


def dadao_init(x0: jax.Array) -> DADAOState:
    """x = ``x0`` (shape (n, d)), the other five variables 0, last event times 0."""
    x0 = jnp.asarray(x0)
    z = jnp.zeros_like(x0)
    return DADAOState(x0, z, z, z, z, z, jnp.zeros((x0.shape[0],), x0.dtype))


def run_dadao(
    grad_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    events: Events,
    mu: float,
    L: float,
    chi_1_star: float,
    x_star: jax.Array | None = None,
) -> tuple[DADAOState, jax.Array]:
    """Play ``events`` in order (``lax.scan``). ``grad_fn(i, x_i)`` is node i's gradient (i a traced int32).

    Returns the final state and, per event, the mean over nodes of ``||x_i - x_star||^2`` (zeros if no x_star).
    """
    c = dadao_constants(mu, L, chi_1_star)
    dtype = jnp.asarray(x0).dtype
    mat = jnp.asarray(c["ode_matrix"], dtype)
    xs = jnp.zeros((jnp.asarray(x0).shape[1],), dtype) if x_star is None else jnp.asarray(x_star, dtype)

    def flow(p6, dt):  # p6: (6, d)
        return jax.scipy.linalg.expm(mat * dt) @ p6

    def step(st, ev):
        t, g, i, j = ev
        P = jnp.stack(st[:6])  # (6, n, d)

        def grad_event(P, tl):
            pi = flow(P[:, i], t - tl[i])
            r = grad_fn(i, pi[0]) - c["nu"] * pi[0] - pi[3]
            pi = pi.at[0].add(-c["gamma"] * r).at[1].add(-c["gamma_tilde"] * r)
            pi = pi.at[3].add((c["delta"] + c["delta_tilde"]) * r)
            return P.at[:, i].set(pi), tl.at[i].set(t)

        def comm_event(P, tl):
            jj = jnp.maximum(j, 0)
            pi, pj = flow(P[:, i], t - tl[i]), flow(P[:, jj], t - tl[jj])
            m = (pi[2] + pi[4]) - (pj[2] + pj[4])
            pi = pi.at[4].add(-c["beta"] * m).at[5].add(-c["beta_tilde"] * m)
            pj = pj.at[4].add(c["beta"] * m).at[5].add(c["beta_tilde"] * m)
            return P.at[:, i].set(pi).at[:, jj].set(pj), tl.at[i].set(t).at[jj].set(t)

        P, tl = jax.lax.cond(g, grad_event, comm_event, P, st.t_last)
        new = DADAOState(*P, tl)
        err = jnp.mean(jnp.sum((new.x - xs) ** 2, axis=1))
        return new, err

    ev = (jnp.asarray(events.times, dtype), jnp.asarray(events.is_grad), jnp.asarray(events.i), jnp.asarray(events.j))
    return jax.lax.scan(step, dadao_init(jnp.asarray(x0, dtype)), ev)
