"""Random Gaussian projector (APOLLO-style; Zhu et al. 2024, "APOLLO: SGD-like
Memory, AdamW-level Performance").

P has i.i.d. N(0, 1/r) entries, so E[P Pᵀ] = I: projecting back is unbiased.
Only a key is stored: P is regenerated from it whenever it is used, and a
refresh draws a new key. As in the official APOLLO (``random_projector.py``),
the rank is not capped at the projected dimension: P is d × r for any r.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import Projector, matmul, project_onto


class RandomState(NamedTuple):
    key: jax.Array  # (2,) uint32 raw key data


def random_matrix(state: RandomState, d: int, rank: int, dtype=jnp.float32) -> jax.Array:
    """P (d × rank) with N(0, 1/rank) entries drawn from ``state.key``."""
    key = jax.random.wrap_key_data(state.key, impl="threefry2x32")
    return (jax.random.normal(key, (d, rank), jnp.float32) / jnp.sqrt(rank)).astype(dtype)


def random_projector() -> Projector:
    """A seeded Gaussian P (d × r), regenerated from its key rather than stored."""

    def init(grad, rank, key):
        del grad, rank
        return RandomState(jax.random.key_data(key).astype(jnp.uint32))

    def project(state, grad, rank):
        return project_onto(random_matrix(state, grad.shape[0], rank, grad.dtype), grad)

    def project_back(state, low, d):
        return matmul(random_matrix(state, d, low.shape[0], low.dtype), low)

    def leading_vector(state, d, rank):
        raise ValueError("a random projection has no leading singular vector (lazy refresh needs an SVD projector)")

    return Projector("random", init, project, project_back, False, leading_vector, rank_above_dim=True)
