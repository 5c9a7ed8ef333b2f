r"""Gradient coding (Tandon et al.): tolerate any s stragglers among n workers with an exact full gradient.

Tandon, Lei, Dimakis & Karampatziakis, "Gradient Coding: Avoiding Stragglers
in Distributed Learning" (ICML 2017), https://arxiv.org/abs/1612.03301;
reference code https://github.com/rashisht1/gradient_coding.

The data is cut into :math:`k = n` partitions with gradients
:math:`g_1, \dots, g_n`. Worker :math:`i` computes the gradients of the
:math:`s + 1` partitions in the support of row :math:`i` of the encoding
matrix :math:`B \in \mathbb R^{n \times n}` and sends one vector,
:math:`\sum_j B_{ij} g_j` (load :math:`(s+1)/n` of a full gradient; bytes one
gradient). For any set :math:`F` of at least :math:`n - s` workers that
return, there is a decoding vector :math:`a` supported on :math:`F` with
:math:`a^\top B = \mathbf 1^\top`, so :math:`\sum_{i \in F} a_i (B g)_i =
\sum_j g_j`, the full gradient, exactly.

Codes:

* fractional repetition (:func:`fractional_repetition_code`, needs
  :math:`(s+1) \mid n`): the workers form :math:`n/(s+1)` groups of
  :math:`s+1`; every worker of group :math:`g` sends the plain sum of the
  group's :math:`s+1` partitions. Decoding: one returned worker per group
  (each group keeps one, since at most :math:`s` straggle), coefficient 1.
* cyclic repetition (:func:`cyclic_repetition_code`, any :math:`s < n`; the
  paper's Algorithm 2): row :math:`i` is supported on partitions
  :math:`i, i+1, \dots, i+s \pmod n`; with a random :math:`H \in \mathbb
  R^{s \times n}` whose rows sum to zero, :math:`B_{i, i} = 1` and the other
  :math:`s` entries solve :math:`H B_i^\top = 0`. Every row lies in the
  :math:`(n-s)`-dimensional null space of :math:`H`, which contains
  :math:`\mathbf 1`, and any :math:`n - s` rows span it (with probability one),
  so :math:`\mathbf 1` is in their span: :math:`a` solves
  :math:`B_F^\top a_F = \mathbf 1` (least squares; decodable when the
  residual vanishes).

On the worker axis: :func:`encode` is worker :math:`i`'s combination of the
partition gradients, :func:`coded_psum` the master's decode as a ``psum`` of
:math:`a_i \cdot` (worker :math:`i`'s message), with :math:`a_i = 0` for the
stragglers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CODES = ("fractional", "cyclic")


class GradientCode(NamedTuple):
    """An (n, s) gradient code: encoding matrix ``B`` (float64, n x n), straggler tolerance ``s``, its kind."""

    B: np.ndarray
    s: int
    kind: str

    @property
    def n(self) -> int:
        return self.B.shape[0]

    @property
    def load(self) -> float:
        """Fraction of a full gradient each worker computes: ``(s + 1) / n``."""
        return (self.s + 1) / self.n


def _check_ns(n, s):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (workers) must be an int >= 1, got {n!r}")
    if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < n:
        raise ValueError(f"s (stragglers) must be an int in [0, n) = [0, {n}), got {s!r}")


def fractional_repetition_code(n: int, s: int) -> GradientCode:
    """Tandon et al.'s fractional repetition code; needs ``(s + 1)`` to divide ``n``."""
    _check_ns(n, s)
    if n % (s + 1):
        raise ValueError(f"fractional repetition needs s + 1 to divide n, got n={n}, s={s}")
    B = np.zeros((n, n))
    for i in range(n):
        g = i // (s + 1)
        B[i, g * (s + 1):(g + 1) * (s + 1)] = 1.0
    return GradientCode(B, s, "fractional")


def cyclic_repetition_code(n: int, s: int, seed: int = 0) -> GradientCode:
    """Tandon et al.'s cyclic repetition code (Algorithm 2), ``H`` drawn from ``numpy.random.default_rng(seed)``."""
    _check_ns(n, s)
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((s, n))
    H[:, n - 1] = -H[:, : n - 1].sum(axis=1)
    B = np.zeros((n, n))
    for i in range(n):
        j = np.arange(i, i + s + 1) % n
        B[i, j[0]] = 1.0
        if s:
            B[i, j[1:]] = np.linalg.solve(H[:, j[1:]], -H[:, j[0]])
    return GradientCode(B, s, "cyclic")


def gradient_code(kind: str, n: int, s: int, seed: int = 0) -> GradientCode:
    """``"fractional"`` or ``"cyclic"`` (n, s) code."""
    if kind not in CODES:
        raise ValueError(f"kind must be one of {CODES}, got {kind!r}")
    return fractional_repetition_code(n, s) if kind == "fractional" else cyclic_repetition_code(n, s, seed)


def _alive_mask(code: GradientCode, alive) -> np.ndarray:
    alive = np.asarray(alive, bool)
    if alive.shape != (code.n,):
        raise ValueError(f"alive must be a boolean mask of shape ({code.n},), got shape {alive.shape}")
    return alive


def decoding_vector(code: GradientCode, alive, tol: float = 1e-9) -> np.ndarray | None:
    r"""The decoding vector :math:`a` (float64, zero off ``alive``) with :math:`a^\top B = \mathbf 1^\top`, or None.

    ``alive``: boolean mask of the workers that returned. None when the
    returned rows do not span :math:`\mathbf 1` (more than ``s`` stragglers,
    in an unlucky pattern).
    """
    alive = _alive_mask(code, alive)
    a = np.zeros(code.n)
    if code.kind == "fractional":
        groups = code.n // (code.s + 1)
        for g in range(groups):
            members = np.flatnonzero(alive[g * (code.s + 1):(g + 1) * (code.s + 1)])
            if members.size == 0:
                return None
            a[g * (code.s + 1) + members[0]] = 1.0
        return a
    idx = np.flatnonzero(alive)
    if idx.size == 0:
        return None
    sol, *_ = np.linalg.lstsq(code.B[idx].T, np.ones(code.n), rcond=None)
    if np.max(np.abs(code.B[idx].T @ sol - 1.0)) > tol * max(1.0, np.abs(sol).max()) * code.n:
        return None
    a[idx] = sol
    return a


def is_decodable(code: GradientCode, alive) -> bool:
    """Whether the workers in ``alive`` determine the full gradient."""
    return decoding_vector(code, alive) is not None


def encode(code_row: Any, partition_grads: Any) -> Any:
    r"""Worker :math:`i`'s message :math:`\sum_j B_{ij} g_j`.

    ``code_row``: row :math:`i` of ``B`` (shape (n,)); ``partition_grads``: a
    tree whose leaves have a leading axis of the n partitions (only the
    support of the row needs real values: the others are multiplied by 0).
    """
    row = jnp.asarray(code_row)
    return jax.tree.map(lambda g: jnp.tensordot(row.astype(g.dtype), g, axes=1), partition_grads)


def coded_psum(message: Any, coefficient: jax.Array, axis_name: Any = "workers") -> Any:
    r"""The master's decode over the worker axis: :math:`\sum_i a_i\, m_i` (a ``psum``).

    ``coefficient`` is this worker's :math:`a_i` from :func:`decoding_vector`
    (0 for a straggler, whose message is never read). Returns the full gradient
    :math:`\sum_j g_j` on every worker.
    """
    return jax.lax.psum(jax.tree.map(lambda m: coefficient.astype(m.dtype) * m, message), axis_name)
