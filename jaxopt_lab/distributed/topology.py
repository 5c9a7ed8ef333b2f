r"""Communication topologies for decentralized (gossip) training over W workers.

A topology says how each worker averages its parameters with its neighbours in
one gossip round:

.. math:: x_i \leftarrow \sum_j M_{ij}\, x_j ,

with :math:`M` a doubly stochastic :math:`W \times W` mixing matrix (rows and
columns sum to one, so the average over workers is preserved). It is stored in
the form the gossip transforms apply with ``jax.lax.ppermute``: a list of
:class:`MixingTerm`\ s, each a permutation ``source`` (worker ``i`` receives the
parameters of worker ``source[i]``) and a weight, so that

.. math:: M = \sum_{\text{terms}} \text{weight} \cdot P_{\text{source}}, \qquad
          (P_{\text{source}})_{i, \text{source}[i]} = 1 .

A sum of permutation matrices with weights summing to one is doubly stochastic
by construction. The identity permutation is the worker's own weight and costs
no message; each other term is one ``ppermute``, i.e. one message of the full
parameters sent by every worker.

A topology may be time varying: ``phases[t % period]`` is used at gossip round
``t`` (the one-peer exponential graph cycles through ``log2 W`` phases).

Weights: all graphs here are regular (every worker has the same degree
:math:`d`), for which the Metropolis–Hastings weights :math:`1 / (1 + \max(d_i,
d_j))` are the uniform weights :math:`1/(d+1)` for every neighbour and for the
worker itself. Neighbours that coincide (a ring of 2, a torus side of 2) are
counted once.

Constructors: :func:`ring`, :func:`torus2d`, :func:`exponential` (one-peer,
time varying; or static), :func:`complete`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np


class MixingTerm(NamedTuple):
    """One term of a mixing matrix: worker ``i`` adds ``weight · x[source[i]]``."""

    source: tuple[int, ...]
    weight: float


def _check_num_workers(num_workers, minimum: int = 2) -> int:
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < minimum:
        raise ValueError(f"num_workers must be an int >= {minimum}, got {num_workers!r}")
    return int(num_workers)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A (possibly time-varying) gossip topology over ``num_workers`` workers.

    Build one with :func:`ring`, :func:`torus2d`, :func:`exponential` or
    :func:`complete`, or directly from mixing terms (validated: every
    ``source`` a permutation of ``range(num_workers)``, no two terms of a phase
    with the same permutation, weights > 0 summing to 1 in every phase).

    Attributes:
      name: a readable name, e.g. ``"ring(8)"``.
      num_workers: W.
      phases: one tuple of :class:`MixingTerm` per phase; gossip round ``t`` uses
        ``phases[t % len(phases)]``.
    """

    name: str
    num_workers: int
    phases: tuple[tuple[MixingTerm, ...], ...]

    def __post_init__(self):
        w = _check_num_workers(self.num_workers)
        if not self.phases:
            raise ValueError(f"{self.name}: phases must not be empty")
        phases = []
        for p, terms in enumerate(self.phases):
            terms = tuple(MixingTerm(tuple(int(s) for s in t[0]), float(t[1])) for t in terms)
            seen = set()
            for term in terms:
                if sorted(term.source) != list(range(w)):
                    raise ValueError(f"{self.name}: phase {p} has a source that is not a permutation of range({w}): {term.source}")
                if term.source in seen:
                    raise ValueError(f"{self.name}: phase {p} repeats the permutation {term.source}; merge the weights")
                seen.add(term.source)
                if not term.weight > 0:
                    raise ValueError(f"{self.name}: phase {p} has a weight that is not > 0: {term.weight!r}")
            total = sum(t.weight for t in terms)
            if abs(total - 1.0) > 1e-9:
                raise ValueError(f"{self.name}: the weights of phase {p} sum to {total!r}, not 1")
            phases.append(terms)
        object.__setattr__(self, "num_workers", w)
        object.__setattr__(self, "phases", tuple(phases))

    @property
    def period(self) -> int:
        """Number of phases (1 for a static topology)."""
        return len(self.phases)

    def terms(self, step: int = 0) -> tuple[MixingTerm, ...]:
        """The mixing terms used at gossip round ``step``."""
        return self.phases[int(step) % self.period]

    def messages(self, step: int = 0) -> int:
        """Messages each worker sends at gossip round ``step`` (terms other than itself)."""
        identity = tuple(range(self.num_workers))
        return sum(t.source != identity for t in self.terms(step))

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        """The dense float64 ``W × W`` mixing matrix of gossip round ``step``: ``x ← M @ x``."""
        w = self.num_workers
        m = np.zeros((w, w))
        for source, weight in self.terms(step):
            m[np.arange(w), source] += weight
        return m

    def period_matrix(self) -> np.ndarray:
        """``M_{τ-1} ⋯ M_1 M_0``: the mixing of one full period (τ = ``period``)."""
        out = np.eye(self.num_workers)
        for t in range(self.period):
            out = self.mixing_matrix(t) @ out
        return out

    @property
    def is_symmetric(self) -> bool:
        """Whether every phase's mixing matrix is symmetric."""
        return all(np.array_equal(m, m.T) for m in (self.mixing_matrix(t) for t in range(self.period)))

    def spectral_gap(self) -> float:
        r"""``1 − |λ₂|``: one minus the second largest eigenvalue magnitude of the mixing matrix.

        For a time-varying topology (``period > 1``) this is the gap of
        :meth:`period_matrix`, the product over one full period — a per-period,
        not per-round, quantity. For the one-peer exponential graph with W a
        power of two that product is exactly :math:`\mathbf{1}\mathbf{1}^\top/W`
        (exact averaging after ``log2 W`` rounds), so its gap is 1, the same as
        the complete graph's.

        All matrices built here are normal (circulant, or Kronecker products of
        circulants), so ``|λ₂|`` is also the contraction factor
        :math:`\lVert M - \mathbf{1}\mathbf{1}^\top / W \rVert_2` of the
        consensus distance.
        """
        m = self.mixing_matrix(0) if self.period == 1 else self.period_matrix()
        mags = np.sort(np.abs(np.linalg.eigvals(m)))[::-1]
        return float(1.0 - mags[1])


def _uniform(name: str, num_workers: int, sources) -> Topology:
    """Uniform weights 1/(d+1) over the worker itself and its distinct neighbour permutations."""
    identity = tuple(range(num_workers))
    distinct = []
    for s in sources:
        s = tuple(int(v) for v in s)
        if s != identity and s not in distinct:
            distinct.append(s)
    weight = 1.0 / (len(distinct) + 1)
    terms = (MixingTerm(identity, weight),) + tuple(MixingTerm(s, weight) for s in distinct)
    return Topology(name, num_workers, (terms,))


def _shift(num_workers: int, offset: int) -> tuple[int, ...]:
    """Worker ``i`` receives from worker ``(i + offset) mod W``."""
    return tuple((i + offset) % num_workers for i in range(num_workers))


def ring(num_workers: int) -> Topology:
    r"""The ring: worker ``i`` averages with ``i ± 1 (mod W)``, weights 1/3 each.

    Two messages per round (one to each neighbour). Spectral gap
    :math:`1 - (1 + 2\cos(2\pi/W))/3` for W ≥ 3. With W = 2 the two neighbours
    are the same worker, so the ring is the single edge with weights 1/2 (one
    message), like ``complete(2)``; ``ring(3)`` equals ``complete(3)``.
    """
    w = _check_num_workers(num_workers)
    return _uniform(f"ring({w})", w, [_shift(w, 1), _shift(w, -1)])


def _torus_shape(num_workers: int) -> tuple[int, int]:
    rows = max(r for r in range(1, math.isqrt(num_workers) + 1) if num_workers % r == 0)
    return rows, num_workers // rows


def torus2d(num_workers: int, shape: tuple[int, int] | None = None) -> Topology:
    r"""The 2-D torus: a ``rows × cols`` grid with wrap-around, 4 neighbours, weights 1/5.

    Worker ``i = a·cols + b`` (row-major) averages with ``(a ± 1 mod rows, b)``
    and ``(a, b ± 1 mod cols)``. By default the grid is as square as possible:
    ``rows`` is the largest divisor of W not above √W. A side of 2 makes its two
    neighbours coincide (degree 3, weights 1/4; the 2 × 2 torus is ``ring(4)``).

    The eigenvalues are :math:`(1 + 2\cos(2\pi p/\text{rows}) + 2\cos(2\pi q/\text{cols}))/5`
    (both sides ≥ 3). Four messages per round (fewer with a side of 2).

    Raises:
      ValueError: if W has no factorization ``rows × cols`` with both sides ≥ 2
        (W prime, or W < 4): a 1 × W "torus" would silently be a ring, so use
        :func:`ring` for it explicitly. Also if ``shape`` does not multiply to W
        or has a side < 2.
    """
    w = _check_num_workers(num_workers)
    if shape is None:
        rows, cols = _torus_shape(w)
        if rows < 2:
            raise ValueError(
                f"torus2d needs num_workers = rows * cols with rows, cols >= 2; num_workers={w} "
                f"has no such factorization (prime or < 4): use ring({w})"
            )
    else:
        rows, cols = (int(s) for s in shape)
        if rows * cols != w or rows < 2 or cols < 2:
            raise ValueError(f"shape must be (rows, cols) with rows * cols = num_workers={w} and both >= 2, got {shape!r}")

    def source(da: int, db: int) -> tuple[int, ...]:
        return tuple(((i // cols + da) % rows) * cols + (i % cols + db) % cols for i in range(w))

    return _uniform(f"torus2d({rows}x{cols})", w, [source(1, 0), source(-1, 0), source(0, 1), source(0, -1)])


def exponential(num_workers: int, one_peer: bool = True) -> Topology:
    r"""The exponential graph (Ying et al., NeurIPS 2021, https://arxiv.org/abs/2110.13363).

    W must be a power of two, τ = log2 W.

    Directions are those of the authors' code, Bluefog (``bluefog/common/topology_util.py``:
    ``ExponentialTwoGraph`` has the edges i → i + 2^k, and
    ``GetDynamicOnePeerSendRecvRanks`` makes worker i send to i + 2^k and
    receive from i − 2^k at round k): worker i receives from i − 2^k.

    * ``one_peer=True`` (default), the time-varying one-peer exponential graph:
      at gossip round t worker i averages with the single peer at offset
      :math:`-2^{t \bmod \tau}`, :math:`x_i \leftarrow (x_i + x_{(i - 2^{t \bmod \tau}) \bmod W})/2`.
      One message per round; after τ consecutive rounds every worker holds the
      exact average (the period product is :math:`\mathbf{1}\mathbf{1}^\top/W`).
      The per-round matrices are doubly stochastic but not symmetric (except at
      offset W/2).
    * ``one_peer=False``, the static exponential graph: worker i averages with
      the peers at offsets :math:`-2^0, \dots, -2^{\tau - 1}`, weights
      :math:`1/(\tau+1)`; τ messages per round.

    Raises:
      ValueError: if W is not a power of two (or < 2).
    """
    w = _check_num_workers(num_workers)
    if w & (w - 1):
        raise ValueError(f"exponential needs num_workers to be a power of two, got {w}")
    tau = w.bit_length() - 1
    if not one_peer:
        return _uniform(f"exponential({w}, static)", w, [_shift(w, -(2**k)) for k in range(tau)])
    identity = tuple(range(w))
    phases = tuple((MixingTerm(identity, 0.5), MixingTerm(_shift(w, -(2**k)), 0.5)) for k in range(tau))
    return Topology(f"exponential({w})", w, phases)


def complete(num_workers: int) -> Topology:
    """The complete graph: every worker averages all W workers, weights 1/W (exact averaging).

    Each worker sends W − 1 messages per round (an all-reduce would be cheaper;
    this is the reference point of the gossip methods, equal to data-parallel
    averaging).
    """
    w = _check_num_workers(num_workers)
    return _uniform(f"complete({w})", w, [_shift(w, k) for k in range(1, w)])


TOPOLOGIES = {"ring": ring, "torus2d": torus2d, "exponential": exponential, "complete": complete}


def topology_for(topology: "Topology | str", num_workers: int) -> Topology:
    """``topology`` itself, or the named topology (``TOPOLOGIES``) over ``num_workers`` workers."""
    if isinstance(topology, Topology):
        return topology
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be a Topology or one of {sorted(TOPOLOGIES)}, got {topology!r}")
    return TOPOLOGIES[topology](num_workers)
