"""Pure-``jnp`` reference of the group-rational (GR-KAN) activation and its backward.

KAT (Yang & Wang, "Kolmogorov-Arnold Transformer", 2024) replaces the MLP
activation of a transformer with a learnable rational function shared by each
of ``G`` groups of channels ("group-rational KAN", GR-KAN). FlashKAT (Raffel &
Chen, 2025) finds that its backward pass, not its FLOPs, is what makes KAT
slow: the gradients of the few shared coefficients are accumulated with
global atomics. :mod:`jaxopt_lab.kernels.grkan` is the Pallas kernel; this
module is the plain-``jnp`` function it is tested against.

For an input ``x`` of shape ``(..., D)`` split into ``G`` groups of ``D / G``
contiguous channels, channel ``c`` of group ``g`` maps to::

    y = P(x) / Q(x)
    P(x) = a[g,0] + a[g,1] x + a[g,2] x^2 + a[g,3] x^3 + a[g,4] x^4 + a[g,5] x^5
    Q(x) = 1 + |b[g,0] x| + |b[g,1] x^2| + |b[g,2] x^3| + |b[g,3] x^4|
         = 1 + sum_j |b[g,j-1]| |x|^j                       (j = 1..4)

KAT's "safe Pade" denominator: ``Q >= 1``, so ``y`` has no poles.

Its derivatives (``Q'`` is ``dQ/dx``)::

    dy/dx      = (P'(x) Q(x) - P(x) Q'(x)) / Q(x)^2
    P'(x)      = sum_k k a[g,k] x^(k-1)
    Q'(x)      = sign(x) sum_j j |b[g,j-1]| |x|^(j-1)
    dy/da[g,k] = x^k / Q(x)
    dy/db[g,j] = -P(x) / Q(x)^2 * sign(b[g,j]) |x|^(j+1)

``sign(0)`` is taken as ``+1``, for ``x`` and for ``b``: it is JAX's
derivative of ``|.|`` at 0, and KAT's kernels do the same (KAT's
``"identity"`` initialisation has ``b = 0``; with ``sign(0) = 0`` the
denominator of such a unit would never train). :func:`kat_abs` is ``|b|`` with
that subgradient stated explicitly, so ``jax.grad`` of :func:`grkan_reference`
agrees with the formulas above everywhere, zeros included.

Computation is in ``float32`` (``float64`` for ``float64`` inputs) whatever the
input dtype; the output has the dtype of ``x``.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

NUM_A = 6  # numerator coefficients a_0..a_5 (degree 5)
NUM_B = 4  # denominator coefficients b_1..b_4 (degree 4)


def check_grkan_args(x: jax.Array, a: jax.Array, b: jax.Array, groups: int) -> None:
    """Clear errors for bad GR-KAN inputs, before any compute."""
    try:
        groups = operator.index(groups)
    except TypeError:
        raise ValueError(f"groups must be a positive int, got {groups!r}") from None
    if groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have at least one axis (..., D), got shape {jnp.shape(x)}")
    d = x.shape[-1]
    if d % groups != 0:
        raise ValueError(
            f"the last axis of x (D={d}) must be divisible by groups={groups}, got x of shape {tuple(x.shape)}"
        )
    for name, arr, n in (("x", x, None), ("a", a, NUM_A), ("b", b, NUM_B)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating array, got dtype {arr.dtype}")
        if n is not None and tuple(arr.shape) != (groups, n):
            raise ValueError(f"{name} must have shape (groups, {n}) = ({groups}, {n}), got {tuple(arr.shape)}")


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """float32, or float64 when an input is float64."""
    dtype = jnp.float32
    for arr in arrays:
        dtype = jnp.promote_types(dtype, arr.dtype)
    return jnp.dtype(dtype)


@jax.custom_jvp
def kat_abs(b: jax.Array) -> jax.Array:
    """``|b|`` whose derivative at ``0`` is ``+1`` (KAT's ``sign(b)``; JAX's own choice too, made explicit)."""
    return jnp.abs(b)


@kat_abs.defjvp
def _kat_abs_jvp(primals, tangents):
    (b,), (t,) = primals, tangents
    return jnp.abs(b), jnp.where(b < 0, -t, t)


def kat_sign(b: jax.Array) -> jax.Array:
    """``sign(b)`` with ``sign(0) = +1``: the derivative of :func:`kat_abs`."""
    return jnp.where(b < 0, -1, 1).astype(b.dtype)


def _grouped(x: jax.Array, groups: int, dtype) -> jax.Array:
    return x.astype(dtype).reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def grkan_reference(x: jax.Array, a: jax.Array, b: jax.Array, *, groups: int = 8) -> jax.Array:
    """GR-KAN activation ``y = P(x) / Q(x)`` per channel group, in plain ``jnp``.

    Written term by term from KAT's definition (explicit powers, not Horner's
    rule as in the kernel), so it is an independent check of the kernel.

    Args:
      x: input of shape ``(..., D)``, ``D`` divisible by ``groups``.
      a: numerator coefficients, shape ``(groups, 6)``: ``a[g, k]`` multiplies ``x^k``.
      b: denominator coefficients, shape ``(groups, 4)``: ``|b[g, j-1] x^j|``, j=1..4.
      groups: number of channel groups ``G``; group ``g`` is channels
        ``[g D/G, (g+1) D/G)``.

    Returns:
      ``y`` with the shape and dtype of ``x``.
    """
    check_grkan_args(x, a, b, groups)
    dtype = compute_dtype(x, a, b)
    xg = _grouped(x, groups, dtype)  # (..., G, D/G)
    a_ = a.astype(dtype)[..., None]  # (G, 6, 1): broadcasts against (..., G, D/G)
    b_ = b.astype(dtype)[..., None]
    num = sum(a_[:, k] * xg**k for k in range(NUM_A))
    den = 1 + sum(kat_abs(b_[:, j - 1]) * jnp.abs(xg**j) for j in range(1, NUM_B + 1))
    return (num / den).reshape(x.shape).astype(x.dtype)


def grkan_reference_bwd(
    x: jax.Array, a: jax.Array, b: jax.Array, dy: jax.Array, *, groups: int = 8
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward of :func:`grkan_reference` from the closed-form derivatives, in ``jnp``.

    This is what XLA makes of the hand-derived backward (the baseline of the
    kernel's backward in ``scripts/bench_kernels.py``); ``jax.vjp`` of
    :func:`grkan_reference` is the other baseline, plain autodiff.

    Returns:
      ``(dx, da, db)``: ``dx`` like ``x``; ``da`` ``(G, 6)`` and ``db`` ``(G, 4)``
      like ``a`` and ``b``, summed over all positions of their group.
    """
    check_grkan_args(x, a, b, groups)
    dtype = compute_dtype(x, a, b)
    xg = _grouped(x, groups, dtype)
    g = _grouped(dy, groups, dtype)
    a_ = a.astype(dtype)[..., None]
    babs = jnp.abs(b.astype(dtype))[..., None]
    ax = jnp.abs(xg)
    xpow = [jnp.ones_like(xg)] + [xg**k for k in range(1, NUM_A)]
    apow = [jnp.ones_like(ax)] + [ax**j for j in range(1, NUM_B + 1)]
    p = sum(a_[:, k] * xpow[k] for k in range(NUM_A))
    q = 1 + sum(babs[:, j - 1] * apow[j] for j in range(1, NUM_B + 1))
    dp = sum(k * a_[:, k] * xpow[k - 1] for k in range(1, NUM_A))
    dq = kat_sign(xg) * sum(j * babs[:, j - 1] * apow[j - 1] for j in range(1, NUM_B + 1))
    dx = g * (dp * q - p * dq) / q**2
    batch_axes = tuple(range(xg.ndim - 2)) + (xg.ndim - 1,)  # all but the group axis
    da = jnp.stack([jnp.sum(g * xpow[k] / q, axis=batch_axes) for k in range(NUM_A)], axis=-1)
    dbm = -g * p / q**2
    db = jnp.stack([jnp.sum(dbm * apow[j], axis=batch_axes) for j in range(1, NUM_B + 1)], axis=-1)
    db = db * kat_sign(b.astype(dtype))
    return dx.reshape(x.shape).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)
