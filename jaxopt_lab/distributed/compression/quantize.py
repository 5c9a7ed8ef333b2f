"""Quantization of each tensor to bf16, int8, int4, fp8 (E4M3) or the 4-bit E3M0 of Streaming DiLoCo.

Streaming DiLoCo: Douillard et al., "Streaming DiLoCo with overlapping
communication: Towards a Distributed Free Lunch" (2025),
https://arxiv.org/abs/2501.18512 (outer gradients sent in 4-bit E3M0 floats,
accumulated in float32). Stochastic rounding: Gupta et al., "Deep Learning
with Limited Numerical Precision" (ICML 2015).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.distributed.compression.base import Compressor, as_nbytes, leaf_keys

FORMATS = ("bf16", "int8", "int4", "fp8_e4m3", "e3m0")

# Largest code magnitude of each scaled format: the scale maps the tensor's (block's) absmax onto it.
QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "e3m0": 1.0}
# Payload bits per element.
BITS = {"bf16": 16, "int8": 8, "int4": 4, "fp8_e4m3": 8, "e3m0": 4}
# E3M0 magnitudes relative to the scale: 0 and 2**e for e = E3M0_MIN_EXPONENT, ..., 0.
E3M0_MIN_EXPONENT = -6


class QuantizeState(NamedTuple):
    """Quantizers keep no state."""


def e3m0_grid() -> np.ndarray:
    """The 15 E3M0 values for scale 1, ascending: ±2**e (e = -6..0) and 0."""
    pos = 2.0 ** np.arange(E3M0_MIN_EXPONENT, 1)
    return np.concatenate([-pos[::-1], [0.0], pos])


def payload_bytes(fmt: str, n: int, block_size: int | None = None) -> int:
    """Bytes of one quantized tensor of ``n`` elements: packed codes plus fp32 scale(s)."""
    if n == 0:
        return 0
    codes = math.ceil(n * BITS[fmt] / 8)
    if fmt == "bf16":
        return codes
    return codes + 4 * (1 if block_size is None else math.ceil(n / block_size))


def _pick(lo, hi, a, key, stochastic):
    """``lo`` or ``hi`` for ``lo <= a <= hi``: the nearest (ties to ``lo``) or, stochastically, ``hi``
    with probability ``(a - lo) / (hi - lo)`` (so the expectation is ``a``)."""
    if stochastic:
        gap = hi - lo
        p = jnp.where(gap > 0, (a - lo) / jnp.where(gap > 0, gap, 1.0), 0.0)
        return jnp.where(jax.random.uniform(key, a.shape) < p, hi, lo)
    return jnp.where(a - lo > hi - a, hi, lo)


def _round_int(y, key, stochastic):
    if not stochastic:
        return jnp.round(y)  # half to even
    lo = jnp.floor(y)
    return _pick(lo, lo + 1.0, y, key, True)


def _round_fp8(y, key, stochastic):
    a = jnp.abs(y)
    near = a.astype(jnp.float8_e4m3fn)  # round to nearest even; a <= 448 = largest finite
    if not stochastic:
        return jnp.sign(y) * near.astype(jnp.float32)
    r = near.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(near, jnp.uint8)  # monotone in the value for a >= 0
    lo_bits = jnp.where(r > a, bits - 1, bits)
    hi_bits = jnp.where(r < a, bits + 1, bits)
    to_f32 = lambda b: jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn).astype(jnp.float32)  # noqa: E731
    return jnp.sign(y) * _pick(to_f32(lo_bits), to_f32(hi_bits), a, key, True)


def _round_e3m0(y, key, stochastic):
    a = jnp.abs(y)  # in [0, 1]
    smallest = 2.0**E3M0_MIN_EXPONENT
    normal = a >= smallest
    _, k = jnp.frexp(a)  # a = m 2**k, m in [1/2, 1): floor(log2 a) = k - 1 (exact)
    lo = jnp.where(normal, jnp.ldexp(jnp.ones_like(a), k - 1), 0.0)
    hi = jnp.where(normal, jnp.minimum(2.0 * lo, 1.0), smallest)
    return jnp.sign(y) * _pick(lo, hi, a, key, stochastic)


def _round_bf16(x, key, stochastic):
    x = x.astype(jnp.float32)
    if not stochastic:
        return x.astype(jnp.bfloat16).astype(jnp.float32)
    # add 16 random low bits to the float32 pattern, then truncate to bf16: rounds the
    # magnitude up with probability (|x| - lo) / (hi - lo), so E[result] = x (finite x)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    bits = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


_ROUND = {"int8": _round_int, "int4": _round_int, "fp8_e4m3": _round_fp8, "e3m0": _round_e3m0}


def quantize(fmt: str, stochastic_rounding: bool = False, block_size: int | None = None) -> Compressor:
    r"""Quantize every tensor to ``fmt`` (one payload per tensor); stateless.

    Scaled formats (``int8``, ``int4``, ``fp8_e4m3``, ``e3m0``): the tensor is
    flattened and, with ``block_size``, cut into consecutive blocks of that many
    elements (the last one padded with zeros); each block (or the whole tensor)
    gets one float32 scale :math:`s = \max|x| / q_{\max}`, and each element is
    sent as the code :math:`q = R(x / s)` and decoded as :math:`q\,s`:

    * ``int8``: :math:`q \in \{-127..127\}` (symmetric, :math:`q_{\max}=127`);
    * ``int4``: :math:`q \in \{-7..7\}` (:math:`q_{\max}=7`), two codes a byte;
    * ``fp8_e4m3``: :math:`q` a ``float8_e4m3fn`` value (:math:`q_{\max}=448`, its
      largest finite value; subnormals included);
    * ``e3m0`` (Streaming DiLoCo's 4-bit float): 1 sign bit, 3 exponent bits, 0
      mantissa bits. As in IEEE formats, the all-zero exponent code with no
      mantissa is ±0 and the 7 other codes are powers of two, so the decoded
      values are :math:`\{0\} \cup \{\pm s\,2^{e} : e = -6, \dots, 0\}` with
      :math:`s = \max|x|` (:math:`q_{\max}=1`): the largest magnitude is sent
      exactly, magnitudes up to :math:`s\,2^{-7}` go to 0 (nearest rounding).
      The paper names the format without giving its exponent bias or scaling;
      the per-tensor (per-block) absmax scale here is this package's choice.

    ``bf16``: a cast to bfloat16 (8 exponent bits, so no scale).

    Rounding :math:`R`: to nearest (``int*``: half to even; ``fp8_e4m3``: the
    cast's nearest-even; ``e3m0``: nearest in value between the two
    neighbouring grid points, ties toward zero), or, with
    ``stochastic_rounding``, up to the upper neighbour with probability
    :math:`(x - lo)/(hi - lo)`, which makes the decoded value unbiased,
    :math:`\mathbb E[\hat x] = x` (no element is ever clipped: the scale maps
    the absmax onto the largest code). bf16 stochastic rounding adds 16 random
    low bits to the float32 pattern and truncates (finite inputs).

    Bytes of a tensor of :math:`n` elements: :math:`\lceil n\,b/8 \rceil` for
    the codes (:math:`b` = 16, 8, 4, 8, 4 bits) plus 4 per scale.

    Values are computed in float32; the decoded tensor has the input's dtype.

    Args:
      fmt: one of ``"bf16"``, ``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ``"e3m0"``.
      stochastic_rounding: unbiased stochastic rounding (uses the ``key``).
      block_size: elements per scale (None: one scale per tensor); not for bf16.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    if block_size is not None:
        if fmt == "bf16":
            raise ValueError(f"block_size must be None for fmt='bf16' (it has no scale), got {block_size!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be None or an int >= 1, got {block_size!r}")

    def quantize_leaf(x, key):
        n = x.size
        if n == 0:
            return x
        if fmt == "bf16":
            return _round_bf16(x, key, stochastic_rounding).reshape(x.shape).astype(x.dtype)
        flat = x.ravel().astype(jnp.float32)
        if block_size is None:
            blocks = flat[None, :]
        else:
            nb = -(-n // block_size)
            blocks = jnp.pad(flat, (0, nb * block_size - n)).reshape(nb, block_size)
        scale = jnp.max(jnp.abs(blocks), axis=1, keepdims=True) / QMAX[fmt]
        safe = jnp.where(scale > 0, scale, 1.0)
        # |x| / s <= qmax up to float32 rounding of the division; keep that fuzz off the grid's end
        y = jnp.clip(blocks / safe, -QMAX[fmt], QMAX[fmt])
        q = _ROUND[fmt](y, key, stochastic_rounding)
        return (q * scale).ravel()[:n].reshape(x.shape).astype(x.dtype)

    def init_fn(tree):
        del tree
        return QuantizeState()

    def compress_fn(tree, state, key, step):
        del step
        leaves, treedef = jax.tree.flatten(tree)
        keys = leaf_keys(key, len(leaves))
        decoded = [quantize_leaf(x, k) for x, k in zip(leaves, keys)]
        nbytes = sum(payload_bytes(fmt, x.size, block_size) for x in leaves)
        return jax.tree.unflatten(treedef, decoded), state, as_nbytes(nbytes)

    return Compressor(init_fn, compress_fn)
