"""Reference (pure ``jnp``) of the fused low-rank step: GaLore's and Fira's
per-matrix update, split into the two passes over the gradient that the
Pallas kernels in :mod:`jaxopt_lab.kernels.lowrank_step` implement.

Notation (oriented: the projected side first): G (d × k), P (d × r),
moments m, v (r × k), α the scale, β₁, β₂, ε Adam's (the official split:
no bias correction here, it is applied with the learning rate).

The step, pass by pass::

    Pass 1 (reads G):     R = PᵀG,   g2_j = ‖G_{:,j}‖²
    small (r × k, XLA):   m ← β₁m + (1−β₁)R,  v ← β₂v + (1−β₂)R²,  N = m/(√v+ε)
      GaLore:             M = αN, s = 0
      Fira:               φ_j = ‖N_{:,j}‖/(‖R_{:,j}‖+1e-8)
                          ‖S‖² = Σ_j φ_j² (g2_j − 2α‖R_j‖² + α² R_jᵀ(PᵀP)R_j)   (S = (G − αPR)·diag φ)
                          c = 1/limiter,  limiter = max(‖S‖/(‖S_prev‖+1e-8), γ)/γ  (1 on the first step)
                          M = αN − cα φ⊙R,  s = cφ
    Pass 2 (reads G once more for Fira, writes the update once):
                          U = P M + G·diag(s)  =  αPN + c·S

``‖S‖`` comes from pass 1's column norms by the identity above (exact for any
P), so the update is written once, by pass 2. A "transposed" matrix (the
projected side is its second dimension) is handled in place: G is read as
stored, (k × d), and the update is written in that layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# float32 products in full precision on every backend (XLA:GPU's default for float32 is TF32).
_mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _t(x: jax.Array) -> jax.Array:
    """``x.T`` materialized, for a small operand: XLA folds a transpose into the dot otherwise, and
    XLA:CPU runs the folded forms (contracting a leading axis) 1.5-4x slower (see lowrank.projectors.base)."""
    return jax.lax.optimization_barrier(x.T)


def project_reference(g: jax.Array, p: jax.Array, *, transpose: bool) -> tuple[jax.Array, jax.Array]:
    """Pass 1: ``R = PᵀG`` (r × k, float32) and the squared column norms ``‖G_{:,j}‖²`` (k,).

    ``g`` is (d, k), or (k, d) when ``transpose``; ``p`` is (d, r).
    """
    g32 = g.astype(jnp.float32)
    p32 = p.astype(jnp.float32)
    if transpose:
        return _mm(_t(p32), g32.T), jnp.sum(g32 * g32, axis=1)  # 5x faster on XLA:CPU than (G P)ᵀ
    return _mm(_t(p32), g32), jnp.sum(g32 * g32, axis=0)


def apply_reference(g, p: jax.Array, m: jax.Array, col_scale, *, transpose: bool, out_dtype=None) -> jax.Array:
    """Pass 2: ``U = P M + G·diag(s)`` in G's layout (``g`` and ``col_scale`` may be None: ``U = P M``)."""
    p32 = p.astype(jnp.float32)
    if transpose:  # (P M)ᵀ = Mᵀ Pᵀ, computed in G's stored (k × d) layout
        out = _mm(_t(m.astype(jnp.float32)), _t(p32))
    else:
        out = _mm(p32, m.astype(jnp.float32))
    if g is not None:
        scale = col_scale[:, None] if transpose else col_scale[None, :]
        out = out + scale * g.astype(jnp.float32)
    return out.astype(out_dtype or (g.dtype if g is not None else jnp.float32))


# ``previous_norm`` before the first step: "none yet" (a norm is >= 0, and 0 is a real previous norm).
NO_PREVIOUS_NORM = -1.0


def norm_growth_limiter(norm, previous_norm, growth_limit):
    """Fira's norm-growth limiter: the divisor ``max(‖S‖/(‖S_prev‖ + 1e-8), γ)/γ`` (1 on the first step).

    Dividing S by it caps the growth of ‖S‖ at γ per step; the caller stores
    ``norm / limiter`` as the next ``previous_norm``. Before the first step
    ``previous_norm`` is :data:`NO_PREVIOUS_NORM` (< 0). As the official Fira
    and APOLLO code (``"scaling_grad" in state``: any stored norm, 0 included),
    a first step whose norm is 0 (e.g. an exactly zero gradient) stores 0, and
    the next step is limited against it: ``‖S‖`` becomes ``γ·1e-8`` and grows
    by at most γ per step from there.
    """
    return jnp.where(previous_norm >= 0, jnp.maximum(norm / (previous_norm + 1e-8), growth_limit) / growth_limit, 1.0)


# Below this fraction of ‖G·diag φ‖², ‖S‖² from the identity loses digits to cancellation (its relative error
# is about 2e-8 / fraction: 2e-6 here, 2e-2 at 1e-6); fira_combine then takes ``exact_norm`` if given one.
IDENTITY_MIN_FRACTION = 1e-2


def fira_combine(low, n, g2, p, previous_norm, *, scale, growth_limit, exact_norm=None):
    """Fira's (M, s) for pass 2 and the new limiter norm, from R, the direction N and ``‖G_{:,j}‖²``.

    ``‖S‖`` comes from the identity in the module docstring, which subtracts
    nearly equal numbers when the residual is a small part of G (a gradient of
    rank close to r). ``exact_norm(phi)``, if given, computes ``‖(G − αPR)·diag φ‖``
    from the residual itself (a third matmul); it runs, under ``lax.cond``,
    only when the residual holds less than :data:`IDENTITY_MIN_FRACTION` of
    ``‖G·diag φ‖²``, so the norm stays within float32 rounding of the direct one.
    """
    phi = jnp.linalg.norm(n, axis=0) / (jnp.linalg.norm(low, axis=0) + 1e-8)
    p32 = p.astype(jnp.float32)
    rr = jnp.sum(low * low, axis=0)
    rpr = jnp.sum(low * _mm(_mm(p32.T, p32), low), axis=0)
    residual_sq = jnp.maximum(g2 - 2 * scale * rr + scale**2 * rpr, 0.0)
    norm_sq = jnp.sum(phi * phi * residual_sq)
    if exact_norm is None:
        norm = jnp.sqrt(norm_sq)
    else:
        well_conditioned = norm_sq >= IDENTITY_MIN_FRACTION * jnp.sum(phi * phi * g2)
        norm = jax.lax.cond(well_conditioned, lambda: jnp.sqrt(norm_sq), lambda: exact_norm(phi).astype(norm_sq.dtype))
    limiter = norm_growth_limiter(norm, previous_norm, growth_limit)
    c = 1.0 / limiter
    return scale * n - (c * scale) * phi[None, :] * low, c * phi, norm / limiter


def moments_and_combine(low, g2, p, mu, nu, previous_norm, *, b1, b2, eps, scale, residual, growth_limit):
    """The small r × k part between the passes: Adam moments, then (M, s) and the new limiter norm."""
    mu = b1 * mu + (1 - b1) * low
    nu = b2 * nu + (1 - b2) * low * low
    n = mu / (jnp.sqrt(nu) + eps)
    if not residual:
        return scale * n, None, mu, nu, previous_norm
    m, s, previous_norm = fira_combine(low, n, g2, p, previous_norm, scale=scale, growth_limit=growth_limit)
    return m, s, mu, nu, previous_norm


def lowrank_step_reference(g, p, mu, nu, previous_norm, *, transpose, b1, b2, eps, scale, residual, growth_limit):
    """The whole step with the reference passes; returns ``(update, mu, nu, previous_norm)``."""
    low, g2 = project_reference(g, p, transpose=transpose)
    m, s, mu, nu, previous_norm = moments_and_combine(
        low, g2, p, mu, nu, previous_norm, b1=b1, b2=b2, eps=eps, scale=scale, residual=residual,
        growth_limit=growth_limit)
    update = apply_reference(g if residual else None, p, m, s, transpose=transpose, out_dtype=g.dtype)
    return update, mu, nu, previous_norm
