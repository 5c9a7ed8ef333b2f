"""DCT projector: SVD-free low-rank projection (Modoranu et al. 2025, "SVD-Free
Low-Rank Adaptive Gradient Optimization for Large Language Models").

One fixed orthogonal basis for all layers, the DCT-II matrix
``D[i, j] = sqrt(2/d) · c_j · cos(π (2i + 1) j / (2d))`` with ``c_0 = 1/√2``,
``c_j = 1`` otherwise. A refresh computes ``Dᵀ G`` (one matmul) and keeps the
``r`` columns of ``D`` whose projections have the largest norms
``‖(Dᵀ G)_j‖``. Only their indices are stored; the columns are regenerated
from the indices (d·r cosines) when projecting.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import Projector, matmul, project_onto


class DCTState(NamedTuple):
    indices: jax.Array  # (r,) int32 column indices of the DCT-II matrix


def dct_columns(d: int, columns: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Columns ``columns`` of the orthonormal d × d DCT-II matrix, shape (d, len(columns))."""
    i = jnp.arange(d, dtype=jnp.float32)[:, None]
    j = columns.astype(jnp.float32)[None, :]
    c = jnp.where(j == 0, jnp.sqrt(0.5), 1.0)
    return (jnp.sqrt(2.0 / d) * c * jnp.cos(jnp.pi * (2 * i + 1) * j / (2 * d))).astype(dtype)


def dct_matrix(d: int, dtype=jnp.float32) -> jax.Array:
    """The orthonormal d × d DCT-II matrix (columns are the basis vectors)."""
    return dct_columns(d, jnp.arange(d), dtype)


def dct_projector() -> Projector:
    """Top-``rank`` DCT-II columns by ‖(Dᵀ G)_j‖, stored as indices."""

    def init(grad, rank, key):
        del key
        d = grad.shape[0]
        scores = jnp.linalg.norm(matmul(dct_matrix(d).T, grad.astype(jnp.float32)), axis=1)
        _, idx = jax.lax.top_k(scores, rank)
        return DCTState(idx.astype(jnp.int32))

    def project(state, grad, rank):
        del rank
        return project_onto(dct_columns(grad.shape[0], state.indices, grad.dtype), grad)

    def project_back(state, low, d):
        return matmul(dct_columns(d, state.indices, low.dtype), low)

    def leading_vector(state, d, rank):
        return dct_columns(d, state.indices[:1])[:, 0]

    return Projector("dct", init, project, project_back, False, leading_vector)
