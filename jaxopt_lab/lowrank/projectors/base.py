"""The projector protocol shared by every low-rank method.

A projector works on an *oriented* gradient ``G`` of shape ``(d, k)``: ``d``
is the dimension being projected (the low-rank transforms transpose a matrix
so that the projected side comes first). It is three pure functions:

* ``init(G, rank, key) -> state``: a fresh projection from the current
  gradient (the "refresh"; e.g. the top-``rank`` left singular vectors);
* ``project(state, G, rank) -> R``: ``R = Pᵀ G`` of shape ``(rank, k)``;
* ``project_back(state, N, d) -> P N`` of shape ``(d, k)``.

``rank`` and ``d`` are passed (static ints) because a projector that
regenerates ``P`` instead of storing it needs its shape.

``state`` is a pytree of arrays (a NamedTuple), so it jits, lives in an optax
state and checkpoints with orbax. ``P`` itself need not be stored: the DCT
projector keeps only column indices and the random projector only a key.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` with float32 products in full precision on every backend.

    XLA:GPU (and TPU) multiply float32 in TF32 / bf16 passes by default; the
    official GaLore, Fira and Q-GaLore code multiplies in float32 (PyTorch
    keeps TF32 off for matmuls by default), and on an H200 the TF32 default
    moved a projection by 1e-3 relative. On CPU this is the same product.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def transposed(x: Array) -> Array:
    """``x.T`` materialized (an optimization barrier keeps XLA from folding it into a dot).

    Speed only. ``Pᵀ G`` written as ``P.T @ G`` is folded by XLA into one dot
    that contracts the first axis of both operands; XLA:CPU ran that form
    1.5× slower than ``(Pᵀ) @ G`` with ``Pᵀ`` materialized, and 4× slower when
    ``G`` is itself a transposed view (a tall matrix projected on its columns)
    (d = 1024, k = 4096, r = 128). The basis is small (d × r), so copying
    ``Pᵀ`` costs nothing next to the d × k gradient, and ``project`` runs at
    the speed of a plain matmul whichever way ``G`` is laid out.
    """
    return jax.lax.optimization_barrier(x.T)


def project_onto(basis: Array, grad: Array) -> Array:
    """``basisᵀ @ grad`` (r × k) in the fast dot form (see :func:`transposed`)."""
    return matmul(transposed(basis.astype(grad.dtype)), grad)


class Projector(NamedTuple):
    """A projection ``P`` (d × r) refreshed from a gradient; see the module docstring.

    Attributes:
      name: short name, used in reports (``"svd"``, ``"dct"``, ...).
      init: ``(G, rank, key) -> state``.
      project: ``(state, G, rank) -> Pᵀ G``.
      project_back: ``(state, N, d) -> P N``.
      stores_basis: whether ``state`` holds ``P`` as a float matrix (only such
        a projector can be stored in int4).
      leading_vector: ``(state, d, rank) -> (d,)``, the first column of ``P``
        (the leading singular vector for SVD projectors), used by lazy refresh.
      rank_above_dim: whether a rank above the projected dimension d is kept
        as given (a random Gaussian P of d × r is defined for any r, and the
        official APOLLO draws it at the rank asked for); otherwise an int
        rank above min(m, n) projects at full rank (a basis has at most d
        columns).
    """

    name: str
    init: Callable[[Array, int, Array], Any]
    project: Callable[[Any, Array, int], Array]
    project_back: Callable[[Any, Array, int], Array]
    stores_basis: bool
    leading_vector: Callable[[Any, int, int], Array]
    rank_above_dim: bool = False


class BasisState(NamedTuple):
    """A projector state that stores ``P`` itself: ``basis`` of shape (d, r)."""

    basis: Array


def basis_projector(name: str, compute_basis: Callable[[Array, int, Array], Array]) -> Projector:
    """A projector whose state is the matrix ``P = compute_basis(G, rank, key)``."""

    def init(grad, rank, key):
        return BasisState(compute_basis(grad, rank, key).astype(grad.dtype))

    def project(state, grad, rank):
        del rank
        return project_onto(state.basis, grad)

    def project_back(state, low, d):
        del d
        return matmul(state.basis.astype(low.dtype), low)

    return Projector(name, init, project, project_back, True, lambda s, d, r: s.basis[:, 0])
