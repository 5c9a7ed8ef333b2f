"""Randomized SVD projector (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

Y = (G Gᵀ)^q G Ω with Ω ~ N(0, 1) of shape (k, r + p), orthonormalized by QR
after every product; then B = Qᵀ G, B = Ũ S Vᵀ and P = (Q Ũ)[:, :r]. Costs
O(d k (r + p)) per power iteration instead of the O(d k min(d, k)) of an
exact SVD. Ũ is computed as the eigenvectors of the small (r + p) × (r + p)
matrix B Bᵀ = Ũ S² Ũᵀ rather than by an SVD of B, which would also compute
the (r + p) × k matrix V and costs more than the rest of the refresh on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import Projector, basis_projector, matmul, project_onto
from jaxopt_lab.lowrank.projectors.svd import canonical_signs, top_eigenvectors


def randomized_svd_projector(oversample: int = 8, power_iterations: int = 2) -> Projector:
    """Top-``rank`` left singular vectors by a randomized range finder.

    Args:
      oversample: extra sketch columns ``p`` (the sketch has ``r + p``).
      power_iterations: ``q``, subspace iterations sharpening the spectrum.
    """
    if int(oversample) != oversample or oversample < 0:
        raise ValueError(f"oversample must be an int >= 0, got {oversample!r}")
    if int(power_iterations) != power_iterations or power_iterations < 0:
        raise ValueError(f"power_iterations must be an int >= 0, got {power_iterations!r}")

    def compute(grad, rank, key):
        g = grad.astype(jnp.float32)
        d, k = g.shape
        width = min(rank + oversample, d, k)
        omega = jax.random.normal(key, (k, width), jnp.float32)
        q, _ = jnp.linalg.qr(matmul(g, omega))
        for _ in range(power_iterations):
            z, _ = jnp.linalg.qr(project_onto(q, g).T)  # Gᵀ Q
            q, _ = jnp.linalg.qr(matmul(g, z))
        b = project_onto(q, g)  # B = Qᵀ G, (r + p) × k
        u_small = top_eigenvectors(matmul(b, b.T), width)
        return canonical_signs(matmul(q, u_small)[:, :rank])

    return basis_projector("randomized_svd", compute)
