"""8-bit Adam: bitsandbytes' block-wise quantized moments (Dettmers et al., 2022,
"8-bit Optimizers via Block-wise Quantization", https://arxiv.org/abs/2110.02861).

The Adam step of :func:`optax.scale_by_adam` whose moments are *stored* in
8 bits, as bitsandbytes' ``Adam8bit`` / ``AdamW8bit`` (the optimizer the
official Q-GaLore subclasses) stores them with ``block_wise=True``:

* a moment tensor is flattened and cut into blocks of ``block_size`` values;
  each block stores one float32 ``absmax`` and one uint8 code per value, an
  index into a 256-entry *dynamic map* (:func:`create_dynamic_map`: a
  dynamic exponent and a shrinking fraction, so small values keep relative
  precision). The first moment m uses the signed map, the second moment v
  the unsigned one;
* every step runs bitsandbytes' kernel ``kOptimizerStatic8bit2StateBlockwise``
  (``csrc/kernels.cu``): dequantize ``m = map₁[c₁]·absmax₁``,
  ``v = map₂[c₂]·absmax₂``; update in float32
  ``m ← β₁ m + (1 − β₁) g``, ``v ← β₂ v + (1 − β₂) g²``; take the step from
  these float32 moments,

      u = m̂ / (√v̂ + ε),   m̂ = m / (1 − β₁ᵗ),   v̂ = v / (1 − β₂ᵗ)

  (the kernel's ``−lr √(1 − β₂ᵗ)/(1 − β₁ᵗ) · m / (√v + ε √(1 − β₂ᵗ))``, i.e.
  optax's Adam); then store: each block's new ``absmax = max |·|`` and each
  value's code is the nearest entry of the map to ``value / absmax`` by the
  kernel's binary search ``quantize_2D`` (:func:`quantize_codes`, its tie
  rule included), with the kernel's sign fix for m: a code whose map entry
  has the other sign than m (a tiny m rounded to 0) moves one entry towards
  m's sign, so that m never changes sign in storage;
* a tensor with fewer than ``min_8bit_size`` values keeps float32 moments
  (bitsandbytes' ``min_8bit_size``, 4096) and is exactly
  :func:`optax.scale_by_adam` (float32 moments also for bfloat16 params, as
  bitsandbytes' 32-bit state); so does a complex tensor (bitsandbytes has
  no complex state).

Also as the kernel: a non-finite gradient value sets its m and v to 0 and
its update to 0 (one NaN would otherwise spread through its block's absmax
to every value of the block); the entries that pad the last block are
updated as the kernel's (codes 128 and 0, gradient 0) and count in its
absmax. The state is ``ScaleByAdam8bitState(count, mu, nu, mu_absmax,
nu_absmax)``: ``mu``/``nu`` laid out like the params, holding per leaf the
float32 moment or its uint8 codes (the param's shape); ``mu_absmax``/
``nu_absmax`` the ``(n_blocks,)`` float32 absmax of a quantized leaf,
``optax.MaskedNode()`` at a float one. A quantized moment takes
``n + 4 ⌈n / block_size⌉`` bytes against ``4 n``.

The quantized leaves take the kernel's float32 constants: β rounded to
float32 and ``1 − β`` formed in float32 (``1 − fl32(0.999) = 0.00099999``,
1.3e-5 less of g² in v than optax's ``fl32(1 − 0.999)``, consistent with the
bias correction ``1 − βᵗ``, which both take with the float32 β). The float32 arithmetic is bitsandbytes' up to float32 rounding: the CUDA
kernel's ``__fdividef``/``__powf`` and fused multiply-adds round differently
from XLA's, so a value within a float32 rounding of a midpoint between two
map entries may be stored with the neighbouring code.

``block_size`` defaults to 2048, bitsandbytes' block of the 8-bit
optimizers up to 0.43 (the official Q-GaLore's ``environment.yml`` pins
bitsandbytes 0.43.1); bitsandbytes ≥ 0.44 uses 256 (``block_size=256``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.transforms import _validation as check

BLOCK_SIZE = 2048  # bitsandbytes <= 0.43 (Optimizer2State.init_state, BLOCKSIZE_2STATE); 256 from 0.44
MIN_8BIT_SIZE = 4096  # bitsandbytes' Optimizer2State default


def _linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit.

    Its CPU kernel: the float32 step ``(end − start) / (steps − 1)``, then
    ``start + step·i`` for the first half and ``end − step·(steps − 1 − i)``
    for the second, each a fused multiply-add (one rounding; emulated in
    float64, where the product is exact).
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    low = (np.float64(start32) + step * i).astype(np.float32)
    high = (np.float64(end32) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, low, high)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic quantization map (``bitsandbytes.functional.create_dynamic_map``), float32, sorted.

    For exponent ``i = 0 .. max_exponent_bits − 1`` the midpoints of an even
    grid over [0.1, 1] (2^i + 1 points signed, 2^(i+1) + 1 unsigned), scaled
    by ``10^(i − max_exponent_bits + 1)`` (and their negatives if signed),
    plus 0 and 1: 256 values in [−1, 1] (signed: 127 negatives, 0, 127
    positives, 1) or [0, 1] (unsigned). The float32 grid is computed as
    ``torch.linspace`` does, so the map equals bitsandbytes' bit for bit.
    """
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                          else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = _linspace_float32(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        data += (np.float32(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (np.float32(-(10 ** (-(max_exponent_bits - 1) + i))) * means).tolist()
    if additional_items > 0:
        boundaries = _linspace_float32(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        data += (np.float32(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (np.float32(-(10 ** (-(max_exponent_bits - 1) + i))) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"the dynamic map has {len(data)} values, not 2**total_bits = {2**total_bits}")
    return np.sort(np.asarray(data, np.float32))


SIGNED_MAP = create_dynamic_map(signed=True)  # bitsandbytes' name2qmap["dynamic"]: the first moment
UNSIGNED_MAP = create_dynamic_map(signed=False)  # name2qmap["udynamic"]: the second moment
_PAD_CODE_M, _PAD_CODE_V = 128, 0  # the kernel loads a partial block's missing codes as these


def quantize_codes(x: jax.Array, code: jax.Array, signed: bool) -> jax.Array:
    """The code of each (normalized) value of ``x``: bitsandbytes' ``quantize_2D`` binary search, vectorized.

    Seven halvings from index 127 bracket ``x`` between two map entries
    (``x > val`` moves up), then the nearer of the two is taken, comparing
    with their float32 midpoint: above the last entry a tie goes down, below
    it up (both to the even index). The search starts from the bounds −1
    (signed) or 0 and 1. Returns uint8 codes. ``code`` must be sorted, 256
    values.
    """
    x = jnp.asarray(x, jnp.float32)
    code = jnp.asarray(code, jnp.float32)
    pivot = jnp.full(x.shape, 127, jnp.int32)
    lower_pivot = jnp.zeros(x.shape, jnp.int32)
    upper_pivot = jnp.full(x.shape, 255, jnp.int32)
    lower = jnp.full(x.shape, -1.0 if signed else 0.0, jnp.float32)
    upper = jnp.ones(x.shape, jnp.float32)
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lower_pivot = jnp.where(up, pivot, lower_pivot)
        lower = jnp.where(up, val, lower)
        upper_pivot = jnp.where(up, upper_pivot, pivot)
        upper = jnp.where(up, upper, val)
        pivot = jnp.where(up, pivot + i, pivot - i)
        val = code[pivot]
    up = x > val
    out = jnp.where(up, jnp.where(x > (upper + val) * 0.5, upper_pivot, pivot),
                    jnp.where(x < (lower + val) * 0.5, lower_pivot, pivot))
    return out.astype(jnp.uint8)


def _blocks(x: jax.Array, block_size: int, pad_value=0) -> jax.Array:
    flat = x.reshape(-1)
    n_blocks = -(-flat.shape[0] // block_size)
    return jnp.pad(flat, (0, n_blocks * block_size - flat.shape[0]), constant_values=pad_value).reshape(n_blocks, block_size)


def quantize_blockwise(x: jax.Array, code: jax.Array = SIGNED_MAP, block_size: int = BLOCK_SIZE,
                       signed: bool = True) -> tuple[jax.Array, jax.Array]:
    """Block-wise dynamic quantization (``bitsandbytes.functional.quantize_blockwise``): ``(codes, absmax)``.

    ``x`` is flattened into blocks of ``block_size`` (the last one partial);
    ``absmax`` is each block's ``max |x|`` (float32, ``(n_blocks,)``), and
    each value's uint8 code (in ``x``'s shape) is :func:`quantize_codes` of
    ``x / absmax``. A block of zeros keeps absmax 0 (its codes dequantize to
    0 whatever they are).
    """
    x = jnp.asarray(x, jnp.float32)
    blocks = _blocks(x, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    codes = quantize_codes(blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None], code, signed)
    return codes.reshape(-1)[: x.size].reshape(x.shape), absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, code: jax.Array = SIGNED_MAP,
                         block_size: int = BLOCK_SIZE) -> jax.Array:
    """``code[codes] · absmax`` per block (``bitsandbytes.functional.dequantize_blockwise``), float32."""
    values = _blocks(jnp.asarray(code, jnp.float32)[codes.astype(jnp.int32)], block_size)
    return (values * absmax[:, None]).reshape(-1)[: codes.size].reshape(codes.shape)


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    Attributes:
      count: the number of steps taken (int32).
      mu: like the params: per leaf the float32 first moment, or its uint8
        codes in the signed dynamic map (the leaf's shape).
      nu: likewise the second moment (codes in the unsigned map).
      mu_absmax: like the params: the ``(n_blocks,)`` float32 block absmax of
        a quantized first moment, ``optax.MaskedNode()`` at a float leaf.
      nu_absmax: likewise for the second moment.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    mu_absmax: Any
    nu_absmax: Any


def _static_int(name, value, minimum):
    if isinstance(value, jax.Array):  # e.g. injected by optax.inject_hyperparams without static_args
        raise check.not_static(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _real(x):
    """A hyperparameter as a real number (``optax.inject_hyperparams`` makes it complex64 for complex params)."""
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.iscomplexobj(x):
        return jnp.real(x)
    return x


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """Adam's direction with bitsandbytes' block-wise 8-bit moments; see the module docstring.

    ``u = m̂ / (√v̂ + ε)`` as :func:`optax.scale_by_adam`, the moments of
    every real tensor of at least ``min_8bit_size`` values stored as uint8
    codes of bitsandbytes' dynamic maps with one float32 absmax per block of
    ``block_size`` values; smaller (and complex) tensors keep float32
    (complex64) moments and are exactly :func:`optax.scale_by_adam`.

    Args:
      b1, b2: the moments' decay rates.
      eps: added to √v̂ (beside the bias-corrected √v̂, as bitsandbytes and optax).
      block_size: values per quantization block (default 2048, bitsandbytes
        ≤ 0.43 as pinned by the official Q-GaLore; 256 for bitsandbytes ≥ 0.44).
      min_8bit_size: tensors with fewer values keep float32 moments
        (bitsandbytes' default 4096).

    Under ``optax.inject_hyperparams`` list ``block_size`` and
    ``min_8bit_size`` in ``static_args``.
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)
    _static_int("block_size", block_size, 1)
    _static_int("min_8bit_size", min_8bit_size, 1)
    code_m, code_v = jnp.asarray(SIGNED_MAP), jnp.asarray(UNSIGNED_MAP)
    # the float32 leaves: optax.scale_by_adam (real hyperparameters: the moment v of a complex leaf is real)
    adam = optax.scale_by_adam(_real(b1), _real(b2), _real(eps))

    def quantized(p) -> bool:
        return jnp.issubdtype(p.dtype, jnp.floating) and p.size >= min_8bit_size

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        mu, nu, mu_absmax, nu_absmax = [], [], [], []
        for p in leaves:
            if quantized(p):  # bitsandbytes' init: codes 0 and absmax 0 (every moment dequantizes to 0)
                n_blocks = -(-p.size // block_size)
                mu.append(jnp.zeros(p.shape, jnp.uint8))
                nu.append(jnp.zeros(p.shape, jnp.uint8))
                mu_absmax.append(jnp.zeros((n_blocks,), jnp.float32))
                nu_absmax.append(jnp.zeros((n_blocks,), jnp.float32))
            else:
                dtype = jnp.complex64 if jnp.issubdtype(p.dtype, jnp.complexfloating) else jnp.float32
                mu.append(jnp.zeros(p.shape, dtype))
                nu.append(jnp.zeros(p.shape, jnp.float32))
                mu_absmax.append(optax.MaskedNode())
                nu_absmax.append(optax.MaskedNode())
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), unflat(mu), unflat(nu), unflat(mu_absmax),
                                    unflat(nu_absmax))

    def direction(m, v, count_inc, b1, b2):  # optax.scale_by_adam's (eps_root = 0)
        m_hat = optax.tree.bias_correction(m, b1, count_inc)
        v_hat = optax.tree.bias_correction(v, b2, count_inc)
        return m_hat / (jnp.sqrt(v_hat + 0.0) + _real(eps))

    def quantized_leaf(g, cm, cv, am, av, count_inc):
        # the kernel's float32 constants: beta = fl32(b), 1 - beta formed in float32
        rb1, rb2 = (jnp.asarray(_real(b), jnp.float32) for b in (b1, b2))
        gb = _blocks(g.astype(jnp.float32), block_size)
        finite = jnp.isfinite(gb)
        gb = jnp.where(finite, gb, 0.0)
        m = code_m[_blocks(cm, block_size, _PAD_CODE_M).astype(jnp.int32)] * am[:, None]
        v = code_v[_blocks(cv, block_size, _PAD_CODE_V).astype(jnp.int32)] * av[:, None]
        m = jnp.where(finite, m * rb1 + (1 - rb1) * gb, 0.0)
        v = jnp.where(finite, v * rb2 + (1 - rb2) * gb * gb, 0.0)
        u = jnp.where(finite, direction(m, v, count_inc, rb1, rb2), 0.0)
        new_am, new_av = jnp.max(jnp.abs(m), axis=1), jnp.max(v, axis=1)  # v >= 0
        c1 = quantize_codes(m / new_am[:, None], code_m, signed=True).astype(jnp.int32)
        c2 = quantize_codes(v / new_av[:, None], code_v, signed=False)
        flip = jnp.signbit(code_m[c1]) != jnp.signbit(m)  # the kernel's sign fix (uint8 wrap-around)
        c1 = jnp.where(flip, jnp.where(m > 0, c1 + 1, c1 - 1), c1) & 255
        unblock = lambda x: x.reshape(-1)[: g.size].reshape(g.shape)  # noqa: E731
        return unblock(u), unblock(c1.astype(jnp.uint8)), unblock(c2), new_am, new_av

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        count_inc = optax.safe_increment(state.count)
        mu, nu, mu_absmax, nu_absmax = (treedef.flatten_up_to(x)
                                        for x in (state.mu, state.nu, state.mu_absmax, state.nu_absmax))
        is_float = [isinstance(a, optax.MaskedNode) for a in mu_absmax]
        # the float leaves: optax.scale_by_adam itself (None at the quantized ones), on float32 gradients
        float_grads = [(g.astype(jnp.float32) if jnp.isrealobj(g) else g) if f else None for g, f in zip(leaves, is_float)]
        keep = lambda xs: [x if f else None for x, f in zip(xs, is_float)]  # noqa: E731
        float_out, float_state = adam.update(float_grads, optax.ScaleByAdamState(state.count, keep(mu), keep(nu)))
        out = []
        for i, g in enumerate(leaves):
            if is_float[i]:
                u, mu[i], nu[i] = float_out[i], float_state.mu[i], float_state.nu[i]
            else:
                u, mu[i], nu[i], mu_absmax[i], nu_absmax[i] = quantized_leaf(g, mu[i], nu[i], mu_absmax[i],
                                                                             nu_absmax[i], count_inc)
            out.append(u.astype(g.dtype))
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(out), ScaleByAdam8bitState(count_inc, unflat(mu), unflat(nu), unflat(mu_absmax),
                                                 unflat(nu_absmax))

    return optax.GradientTransformation(init_fn, update_fn)
