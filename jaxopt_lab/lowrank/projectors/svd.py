"""Exact SVD projector (GaLore, Zhao et al. 2024, Sec. 4): P = U[:, :r] of G = U S Vᵀ."""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import Projector, basis_projector


def canonical_signs(basis):
    """Flip each column so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign; fixing the sign makes successive
    refreshes (and different LAPACKs) agree, which matters because the
    moments are kept across refreshes.
    """
    rows = jnp.argmax(jnp.abs(basis), axis=0)
    signs = jnp.sign(basis[rows, jnp.arange(basis.shape[1])])
    return basis * jnp.where(signs == 0, 1, signs)


def svd_projector() -> Projector:
    """The top-``rank`` left singular vectors of the (float32) gradient, by exact SVD."""

    def compute(grad, rank, key):
        del key
        u, _, _ = jnp.linalg.svd(grad.astype(jnp.float32), full_matrices=False)
        return canonical_signs(u[:, :rank])

    return basis_projector("svd", compute)
