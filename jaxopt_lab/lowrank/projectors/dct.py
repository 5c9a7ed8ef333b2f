"""DCT projector: SVD-free low-rank projection (Modoranu et al. 2025, "SVD-Free
Low-Rank Adaptive Gradient Optimization for Large Language Models", later
"FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of
Large Language Models"; official code ``IST-DASLab/ISTA-DASLab-Optimizers``,
``fft_low_rank/fft_projector.py`` and ``dct_adamw.py``).

One fixed orthogonal d × d matrix Q for all layers (d the projected side). A
refresh computes the similarity ``S = Qᵀ G`` (one matmul) and keeps the ``r``
columns of Q whose similarities have the largest **ℓ1** norms ``‖S_j‖₁``
(the official ``ell_norm=1``). Only their indices are stored; the columns are
regenerated from the indices (d·r cosines) when projecting.

Q, by ``basis``, with the orthonormal DCT-II matrix
``D[i, j] = sqrt(2/d) · c_j · cos(π (2i + 1) j / (2d))`` (``c_0 = 1/√2``,
``c_j = 1`` otherwise; column j the cosine of frequency j):

* ``"dct3"`` (default): ``Q = Dᵀ``, the official default (``sim_type="matmul"``:
  ``Q = dct3_matrix(d)``, "DCT-3"); column b of Q is row b of D,
  ``Q[a, b] = sqrt(2/d) · c_a · cos(π a (2b + 1) / (2d))``;
* ``"dct2"`` (opt-in): ``Q = D``, the official ``sim_type="makhoul"`` basis
  (the DCT-II of G's rows, which the official code computes by FFT).

The official ``torch.topk(..., sorted=False)`` leaves the order of the kept
indices to the backend; here they are sorted by decreasing score (the order
pairs the low-rank moments' rows with basis vectors across refreshes).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import Projector, matmul, project_onto

BASES = ("dct3", "dct2")


class DCTState(NamedTuple):
    indices: jax.Array  # (r,) int32 column indices of Q


def dct_columns(d: int, columns: jax.Array, dtype=jnp.float32, basis: str = "dct2") -> jax.Array:
    """Columns ``columns`` of Q (d × d), shape (d, len(columns)): of the orthonormal DCT-II matrix D
    (``basis="dct2"``) or of Dᵀ (``"dct3"``, the official default)."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    pos = jnp.arange(d, dtype=jnp.float32)[:, None]
    col = columns.astype(jnp.float32)[None, :]
    if basis == "dct2":  # D[i, j]: i the position, j (the column) the frequency
        i, j = pos, col
    else:  # Dᵀ[a, b] = D[b, a]: b (the column) the position, a the frequency
        i, j = col, pos
    c = jnp.where(j == 0, jnp.sqrt(0.5), 1.0)
    return (jnp.sqrt(2.0 / d) * c * jnp.cos(jnp.pi * (2 * i + 1) * j / (2 * d))).astype(dtype)


def dct_matrix(d: int, dtype=jnp.float32, basis: str = "dct2") -> jax.Array:
    """Q (d × d): the orthonormal DCT-II matrix D (columns the basis vectors), or Dᵀ for ``"dct3"``."""
    return dct_columns(d, jnp.arange(d), dtype, basis)


def dct_projector(basis: str = "dct3") -> Projector:
    """Top-``rank`` columns of the DCT matrix Q by ``‖(Qᵀ G)_j‖₁``, stored as indices; see the module docstring.

    Args:
      basis: ``"dct3"`` (default, the official ``sim_type="matmul"``: Q = Dᵀ) or
        ``"dct2"`` (the official ``sim_type="makhoul"``: Q = D, the DCT-II).
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")

    def init(grad, rank, key):
        del key
        d = grad.shape[0]
        scores = jnp.sum(jnp.abs(matmul(dct_matrix(d, basis=basis).T, grad.astype(jnp.float32))), axis=1)
        _, idx = jax.lax.top_k(scores, rank)
        return DCTState(idx.astype(jnp.int32))

    def project(state, grad, rank):
        del rank
        return project_onto(dct_columns(grad.shape[0], state.indices, grad.dtype, basis), grad)

    def project_back(state, low, d):
        return matmul(dct_columns(d, state.indices, low.dtype, basis), low)

    def leading_vector(state, d, rank):
        return dct_columns(d, state.indices[:1], basis=basis)[:, 0]

    return Projector("dct", init, project, project_back, False, leading_vector)
