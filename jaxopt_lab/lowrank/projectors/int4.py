"""int4 group-quantized storage of a projector's basis (Q-GaLore, Zhang et al. 2024).

The basis P (d × r) is flattened (row by row, or Pᵀ row by row with
``vector_major``) and cut into groups of
``group_size`` values (256 by default, as Q-GaLore); each group keeps a
float32 scale ``s``, a zero point ``z`` and its values as 4-bit codes
``q ∈ [0, 15]``, two per byte, dequantized as ``s · (q − z)``.

* **asymmetric** (the default, as the official ``q_galore_projector.py``):
  ``s = max(max x − min x, 1e-5) / 15``, ``z = clip(−round(min x / s), 0, 15)``,
  ``q = clip(round(x / s) + z, 0, 15)``. All 16 codes span the group's own
  range [min, max]; a group whose values do not straddle 0 loses its far end
  to the clip (z is clipped to [0, 15]), as in the official code.
* **symmetric** (``symmetric=True``): ``s = max|x| / 7``, ``z = 8``,
  ``q = round(x / s) + 8 ∈ [1, 15]``: zero is always exact and the error is
  at most s/2 per entry, but only 15 of the 16 codes are used and the step is
  up to twice the asymmetric one.

State bytes: d·r/2 (codes) + 5·⌈d·r/group_size⌉ (a float32 scale and a uint8
zero point per group) + 4·d (the basis's first column, unquantized, which
Q-GaLore's lazy refresh compares; the official code keeps it too) instead of
4·d·r. Where d·r is not a multiple of ``group_size`` the last group is shorter
(its range is that of its own values; the official code requires a multiple).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import BasisState, Projector


class Int4State(NamedTuple):
    """An int4-quantized array (and, for a basis, its first column unquantized).

    Attributes:
      packed: (⌈n/2⌉,) uint8, two 4-bit codes q ∈ [0, 15] per byte (low nibble first).
      scales: (n_groups,) float32, the step s of each group.
      zeros: (n_groups,) uint8, the zero point z of each group (8 for symmetric storage).
      leading: (d,) float32, the first column of a 2-D input before quantization
        (empty for other inputs): the official Q-GaLore compares these for its lazy refresh.
    """

    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array
    leading: jax.Array


def quantize_int4(x: jax.Array, group_size: int = 256, symmetric: bool = False) -> Int4State:
    """Per-group int4 quantization of ``x`` (any shape), packed two per byte; see the module docstring."""
    x = x.astype(jnp.float32)
    flat = x.reshape(-1)
    n = flat.shape[0]
    n_groups = -(-n // group_size)
    # the last group is padded with its own last value, so that its range is that of its values
    groups = jnp.pad(flat, (0, n_groups * group_size - n), mode="edge").reshape(n_groups, group_size)
    if symmetric:
        scales = jnp.max(jnp.abs(groups), axis=1) / 7.0
        zeros = jnp.full((n_groups,), 8.0, jnp.float32)
        codes = jnp.round(groups / jnp.where(scales == 0, 1.0, scales)[:, None]) + 8.0
    else:
        scales = jnp.maximum(jnp.max(groups, axis=1) - jnp.min(groups, axis=1), 1e-5) / 15.0
        zeros = jnp.clip(-jnp.round(jnp.min(groups, axis=1) / scales), 0.0, 15.0)
        codes = jnp.clip(jnp.round(groups / scales[:, None]) + zeros[:, None], 0.0, 15.0)
    nibbles = codes.astype(jnp.uint8).reshape(-1)[:n]
    if n % 2:
        nibbles = jnp.pad(nibbles, (0, 1))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    leading = x[:, 0] if x.ndim == 2 else jnp.zeros((0,), jnp.float32)
    return Int4State(packed, scales, zeros.astype(jnp.uint8), leading)


def dequantize_int4(state: Int4State, shape: tuple[int, ...], group_size: int = 256, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_int4`, ``s · (q − z)`` (up to the rounding error)."""
    n = 1
    for s in shape:
        n *= s
    lo = state.packed & 0xF
    hi = state.packed >> 4
    codes = jnp.stack([lo, hi], axis=1).reshape(-1)[:n].astype(jnp.float32)
    zeros = jnp.repeat(state.zeros.astype(jnp.float32), group_size)[:n]
    scales = jnp.repeat(state.scales, group_size)[:n]
    return (scales * (codes - zeros)).reshape(shape).astype(dtype)


def int4_projector(projector: Projector, group_size: int = 256, symmetric: bool = False,
                   vector_major: bool = False) -> Projector:
    """``projector`` with its basis stored in int4 (per-group scales and zero points), dequantized on use.

    Only a projector that stores its basis can be wrapped (SVD, randomized
    SVD): the DCT projector stores indices and the random one a key, which
    are already smaller than any int4 matrix.

    Args:
      projector: the projector whose basis is stored.
      group_size: values per quantization group (an even int; official 256).
      symmetric: False (default): asymmetric groups with a zero point, as the
        official Q-GaLore code; True: symmetric groups (``s = max|x| / 7``),
        which keep 0 exact and bound every entry's error by s/2 (see the
        module docstring).
      vector_major: False (default): P (d × r) is flattened row by row, as the
        official code stores the basis of a wide matrix (U[:, :r]); True: Pᵀ
        (r × d) is, so that the groups run along each basis vector, as the
        official code stores the basis of a tall matrix (Vh[:r]).
    """
    if not isinstance(projector, Projector):
        raise TypeError(f"int4_projector wraps a Projector, got {type(projector).__name__}")
    if not projector.stores_basis:
        raise ValueError(f"the {projector.name!r} projector stores no basis matrix; int4 storage applies to svd/randomized_svd")
    if int(group_size) != group_size or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    for flag, value in (("symmetric", symmetric), ("vector_major", vector_major)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool, got {value!r}")

    def init(grad, rank, key):
        p = projector.init(grad, rank, key).basis
        if not vector_major:
            return quantize_int4(p, group_size, symmetric)
        return quantize_int4(p.T, group_size, symmetric)._replace(leading=p[:, 0].astype(jnp.float32))

    def basis(state, d, rank, dtype):
        if vector_major:
            return dequantize_int4(state, (rank, d), group_size, dtype).T
        return dequantize_int4(state, (d, rank), group_size, dtype)

    def project(state, grad, rank):
        return projector.project(BasisState(basis(state, grad.shape[0], rank, grad.dtype)), grad, rank)

    def project_back(state, low, d):
        return projector.project_back(BasisState(basis(state, d, low.shape[0], low.dtype)), low, d)

    def leading_vector(state, d, rank):
        del d, rank
        return state.leading  # before quantization, as the official lazy refresh

    name = f"int4{'_sym' if symmetric else ''}_{projector.name}"
    return Projector(name, init, project, project_back, False, leading_vector)
