"""Exact SVD projector (GaLore, Zhao et al. 2024, Sec. 4): P = U[:, :r] of G = U S Vᵀ.

Two exact ways to get U[:, :r] of an oriented gradient G (d × k):

* ``"svd"``: LAPACK's SVD of G (what the official code calls); it also
  computes V (d × k), which GaLore never uses;
* ``"gram"``: the eigenvectors of the d × d Gram matrix G Gᵀ = U S² Uᵀ,
  top ``r`` by eigenvalue: one matmul and a d × d symmetric eigensolver. For
  d ≤ k (the default side projects the smaller dimension, so d ≤ k always
  there) this is an order of magnitude cheaper on CPU. Squaring G squares
  its condition number, so a singular vector is computed to about
  ε·σ₁²/(σᵢ² − σᵢ₊₁²) instead of ε·σ₁/(σᵢ − σᵢ₊₁) (ε = 6e-8 in float32):
  the top-r subspace that GaLore keeps is unaffected (tested against the
  SVD), the tail of the spectrum (which GaLore discards) is what loses digits.

``"auto"`` (the default) uses ``"gram"`` when d ≤ k and ``"svd"`` otherwise.
By name (``projector=`` of the methods, e.g. in an experiment config):
``"svd"`` is ``"auto"``, ``"svd_gram"`` and ``"svd_lapack"`` force one way.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import Projector, basis_projector, matmul

METHODS = ("auto", "svd", "gram")


def canonical_signs(basis):
    """Flip each column so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign; fixing the sign makes successive
    refreshes (and different LAPACKs) agree, which matters because the
    moments are kept across refreshes.
    """
    rows = jnp.argmax(jnp.abs(basis), axis=0)
    signs = jnp.sign(basis[rows, jnp.arange(basis.shape[1])])
    return basis * jnp.where(signs == 0, 1, signs)


def top_eigenvectors(a, rank):
    """The ``rank`` eigenvectors of the symmetric matrix ``a`` with the largest eigenvalues, largest first."""
    _, vectors = jnp.linalg.eigh(a)  # ascending
    return vectors[:, ::-1][:, :rank]


def top_left_singular_vectors(grad, rank, method: str = "auto"):
    """U[:, :rank] of ``grad`` (d × k, float32) by ``method`` (see the module docstring), signs not fixed."""
    d, k = grad.shape
    if method == "gram" or (method == "auto" and d <= k):
        return top_eigenvectors(matmul(grad, grad.T), rank)
    u, _, _ = jnp.linalg.svd(grad, full_matrices=False)
    return u[:, :rank]


def svd_projector(method: str = "auto") -> Projector:
    """The top-``rank`` left singular vectors of the (float32) gradient, exactly.

    Args:
      method: ``"auto"`` (default), ``"svd"`` (LAPACK SVD) or ``"gram"``
        (eigenvectors of G Gᵀ); see the module docstring. Speed only: all
        three give the same subspace.
    """
    if method not in METHODS:
        raise ValueError(f"svd_projector method must be one of {METHODS}, got {method!r}")

    def compute(grad, rank, key):
        del key
        return canonical_signs(top_left_singular_vectors(grad.astype(jnp.float32), rank, method))

    return basis_projector({"auto": "svd", "gram": "svd_gram", "svd": "svd_lapack"}[method], compute)
