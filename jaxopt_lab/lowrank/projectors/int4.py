"""int4 group-quantized storage of a projector's basis (Q-GaLore, Zhang et al. 2024).

The basis P (d × r) is flattened and cut into groups of ``group_size``
values (256 by default, as Q-GaLore); each group keeps one float32 scale
``s = max|x| / 7`` and its values as 4-bit signed integers
``q = round(x / s) ∈ [-7, 7]``, two per byte. Dequantized, ``s · q`` differs
from ``x`` by at most ``s / 2`` per entry (round to nearest). State bytes: d·r/2
+ 4·⌈d·r/group_size⌉ instead of 4·d·r.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.lowrank.projectors.base import BasisState, Projector


class Int4State(NamedTuple):
    packed: jax.Array  # (ceil(d*r/2),) uint8: two 4-bit values per byte
    scales: jax.Array  # (n_groups,) float32


def quantize_int4(x: jax.Array, group_size: int = 256) -> Int4State:
    """Symmetric per-group int4 quantization of ``x`` (any shape), packed two per byte."""
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    n_groups = -(-n // group_size)
    padded = jnp.pad(flat, (0, n_groups * group_size - n)).reshape(n_groups, group_size)
    scales = jnp.max(jnp.abs(padded), axis=1) / 7.0
    q = jnp.round(padded / jnp.where(scales == 0, 1.0, scales)[:, None]).astype(jnp.int8)
    nibbles = (q.reshape(-1)[: n + (n % 2)] & 0xF).astype(jnp.uint8)
    if nibbles.shape[0] % 2:
        nibbles = jnp.pad(nibbles, (0, 1))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return Int4State(packed, scales)


def dequantize_int4(state: Int4State, shape: tuple[int, ...], group_size: int = 256, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_int4` (up to the rounding error s/2)."""
    n = 1
    for s in shape:
        n *= s
    lo = (state.packed & 0xF).astype(jnp.int8)
    hi = (state.packed >> 4).astype(jnp.int8)
    nibbles = jnp.stack([lo, hi], axis=1).reshape(-1)[:n]
    values = jnp.where(nibbles > 7, nibbles - 16, nibbles).astype(jnp.float32)
    scales = jnp.repeat(state.scales, group_size)[:n]
    return (values * scales).reshape(shape).astype(dtype)


def int4_projector(projector: Projector, group_size: int = 256) -> Projector:
    """``projector`` with its basis stored in int4 (per-group scales), dequantized on use.

    Only a projector that stores its basis can be wrapped (SVD, randomized
    SVD): the DCT projector stores indices and the random one a key, which
    are already smaller than any int4 matrix.
    """
    if not isinstance(projector, Projector):
        raise TypeError(f"int4_projector wraps a Projector, got {type(projector).__name__}")
    if not projector.stores_basis:
        raise ValueError(f"the {projector.name!r} projector stores no basis matrix; int4 storage applies to svd/randomized_svd")
    if int(group_size) != group_size or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")

    def init(grad, rank, key):
        return quantize_int4(projector.init(grad, rank, key).basis, group_size)

    def basis(state, d, rank, dtype):
        return dequantize_int4(state, (d, rank), group_size, dtype)

    def project(state, grad, rank):
        return projector.project(BasisState(basis(state, grad.shape[0], rank, grad.dtype)), grad, rank)

    def project_back(state, low, d):
        return projector.project_back(BasisState(basis(state, d, low.shape[0], low.dtype)), low, d)

    def leading_vector(state, d, rank):
        return basis(state, d, rank, jnp.float32)[:, 0]

    return Projector(f"int4_{projector.name}", init, project, project_back, False, leading_vector)
