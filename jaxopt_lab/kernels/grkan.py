"""Pallas kernels of the group-rational (GR-KAN) activation of KAT, forward and backward.

KAT (Yang & Wang, "Kolmogorov-Arnold Transformer", 2024) uses, in place of
the MLP's GELU, a rational function with learnable coefficients shared by each
of ``G`` channel groups (GR-KAN). For ``x`` of shape ``(..., D)``, channel ``c``
in group ``g = c // (D / G)``::

    y = P(x) / Q(x),   P(x) = sum_{k=0..5} a[g,k] x^k,
                       Q(x) = 1 + sum_{j=1..4} |b[g,j-1]| |x|^j      (KAT's "safe Pade")

and the backward, for an output cotangent ``dy``::

    dx      = dy (P'(x) Q(x) - P(x) Q'(x)) / Q(x)^2 = dy (P' - y Q') / Q
    da[g,k] = sum over the group's positions of  dy x^k / Q
    db[g,j] = sign(b[g,j]) * sum of  -dy P / Q^2 |x|^(j+1)

with ``P' = sum_k k a_k x^(k-1)``, ``Q' = sign(x) sum_j j |b_j| |x|^(j-1)``
and ``sign(0) = +1`` (JAX's derivative of ``|.|`` at 0, and KAT's kernels).

FlashKAT (Raffel & Chen, 2025) shows that KAT's training time is dominated by
this backward, because every element adds its ``da``/``db`` terms to the 80
shared coefficients with global atomic adds; its kernel reduces a tile per
program first and then does one atomic add per coefficient. Here there are no
atomics at all: each grid step reduces its own block in registers/VMEM
and writes the partial sums to its own slot of a ``(n_row_blocks, 16, D)``
buffer (rows ``0..5``: ``da`` terms, ``8..11``: ``db`` terms, per channel),
which XLA then sums over blocks and over each group's channels: no atomics,
so the result does not depend on the order in which blocks run (the GPU test
checks it is the same bit for bit from run to run).

Layout: ``x`` is flattened to ``(N, D)``; the grid is ``(column blocks, row
blocks)``. The per-group coefficients are expanded to a per-channel ``(16, D)``
table (``a`` in rows ``0..5``, ``|b|`` in rows ``8..11``) so a column block
need not line up with the groups (KAT-B's ``D = 3072`` has groups of 384
channels; a Triton block must be a power of two, a TPU block a multiple of 128
or the full width). Every element is computed in ``float32`` (``float64`` for
``float64`` inputs) and cast back; the coefficient sums accumulate in
``float32``.

Ragged shapes are not padded in HBM: rows (and columns, where the column
block does not divide ``D``) past the end are masked. The Triton path uses
masked loads and stores (Triton does not clip blocks that overhang the
array); the Mosaic TPU path zeroes the loaded values outside the array before
the reductions and lets Mosaic drop the out-of-bounds part of its stores.
Either path runs in interpret mode too (``interpret=True``), where Pallas pads
edge blocks (with NaNs, which the masking must, and does, keep out of the sums).

Use :func:`grkan` (``impl`` picks Pallas / interpret / reference, see
:mod:`jaxopt_lab.kernels.dispatch`); :func:`grkan_fwd_pallas` and
:func:`grkan_bwd_pallas` are the kernels themselves.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxopt_lab.kernels import _pallas_compat as compat
from jaxopt_lab.kernels.dispatch import check_impl, dispatch
from jaxopt_lab.kernels.grkan_reference import (
    NUM_A,
    NUM_B,
    check_grkan_args,
    compute_dtype,
    grkan_reference,
    grkan_reference_bwd,
    kat_sign,
)

# Rows of the per-channel coefficient table and of each block's partial sums:
# a_0..a_5 in rows 0..5, b_1..b_4 in rows 8..11, zeros elsewhere (16 rows: a
# power of two for Triton, a multiple of 8 sublanes for TPU).
TABLE_ROWS = 16
_B_ROW = 8

BACKENDS = ("triton", "tpu")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Block sizes of the GR-KAN kernels.

    Attributes:
      rows: rows of ``x`` per forward grid step.
      max_cols: widest column block; the block is the largest allowed width
        ``<= max_cols`` (see ``layout``).
      bwd_rows: rows per backward sub-tile (what is live in registers / VMEM).
      bwd_tiles: backward sub-tiles per grid step; one step's partial sums
        cover ``bwd_rows * bwd_tiles`` rows, so more tiles means a smaller
        partial-sum buffer (``16 * D`` floats per step).
      layout: ``"pow2"`` (Triton: every block dim a power of two) or ``"tpu"``
        (Mosaic: a row block a multiple of 32 and a column block a multiple of
        128 or the full width).
      num_warps: Triton warps per program (``None``: Triton's default).
    """

    rows: int = 64
    max_cols: int = 128
    bwd_rows: int = 32
    bwd_tiles: int = 8
    layout: str = "pow2"
    num_warps: int | None = 8

    def __post_init__(self):
        for name in ("rows", "max_cols", "bwd_rows", "bwd_tiles"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BlockConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.layout not in ("pow2", "tpu"):
            raise ValueError(f"BlockConfig.layout must be 'pow2' or 'tpu', got {self.layout!r}")


TRITON_CONFIG = BlockConfig()
TPU_CONFIG = BlockConfig(rows=256, max_cols=512, bwd_rows=128, bwd_tiles=4, layout="tpu", num_warps=None)

# Measured, not guessed: the fastest configuration `scripts/tune_kernels.py` found on an NVIDIA
# H200 (JAX 0.11.2, Triton lowering) for KAT-B's activations (64 x 197 tokens x 768 / 3072
# channels), per kernel, channel class and dtype. A partial search (a few seconds per class,
# 6-9 of its 18-36 configurations reached, timed one blocked call at a time): BENCHMARKS.md
# gives the figures. Other dtypes and backends use TRITON_CONFIG / TPU_CONFIG.
TRITON_TUNED: dict[tuple[str, str, str], BlockConfig] = {
    ("fwd", "d<=1024", "bfloat16"): BlockConfig(rows=32, max_cols=256, num_warps=4),
    ("fwd", "d<=1024", "float32"): BlockConfig(rows=32, max_cols=256, num_warps=4),
    ("fwd", "d>1024", "bfloat16"): BlockConfig(rows=64, max_cols=128, num_warps=4),
    ("fwd", "d>1024", "float32"): BlockConfig(rows=64, max_cols=128, num_warps=8),
    ("bwd", "d<=1024", "bfloat16"): BlockConfig(max_cols=64, bwd_rows=16, bwd_tiles=4, num_warps=4),
    ("bwd", "d<=1024", "float32"): BlockConfig(max_cols=256, bwd_rows=16, bwd_tiles=4, num_warps=4),
    ("bwd", "d>1024", "bfloat16"): BlockConfig(max_cols=128, bwd_rows=16, bwd_tiles=4, num_warps=4),
    ("bwd", "d>1024", "float32"): BlockConfig(max_cols=256, bwd_rows=16, bwd_tiles=4, num_warps=4),
}


def triton_config(kernel: str, d: int, dtype) -> BlockConfig:
    """The Triton block sizes for ``kernel`` (``"fwd"`` / ``"bwd"``) on ``d`` channels of ``dtype``."""
    cls = "d<=1024" if d <= 1024 else "d>1024"
    return TRITON_TUNED.get((kernel, cls, jnp.dtype(dtype).name), TRITON_CONFIG)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class _Plan:
    n: int  # rows of x
    d: int  # channels
    cols: int  # column block
    d_pad: int  # channels rounded up to a multiple of cols (coefficient table, partial sums)
    rows: int  # forward row block
    bwd_rows: int
    bwd_tiles: int
    backend: str
    interpret: bool
    num_warps: int | None

    @property
    def masked_io(self) -> bool:  # Triton does not clip edge blocks: masked loads and stores
        return self.backend == "triton"

    @property
    def col_blocks(self) -> int:
        return self.d_pad // self.cols


def _plan(n: int, d: int, backend: str, interpret: bool, config: BlockConfig | None) -> _Plan:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if config is None:
        config = TPU_CONFIG if backend == "tpu" else TRITON_CONFIG
    if backend == "triton" and config.layout != "pow2":
        raise ValueError("the Triton lowering needs power-of-two blocks: use BlockConfig(layout='pow2')")
    if backend == "tpu" and config.layout != "tpu":
        raise ValueError("the Mosaic TPU lowering needs (8, 128)-aligned blocks: use BlockConfig(layout='tpu')")
    if config.layout == "pow2":
        cols = min(_next_pow2(config.max_cols), _next_pow2(d))
        d_pad = _round_up(d, cols)

        def row_block(r):
            return min(_next_pow2(r), _next_pow2(n))
    else:
        cap = max(128, config.max_cols // 128 * 128)
        if d % 128 == 0:
            cols = max(c for c in range(128, cap + 1, 128) if d % c == 0)
        elif d <= 4 * cap:
            cols = d  # a block as wide as the array is always allowed
        else:
            cols = cap
        d_pad = _round_up(d, cols)

        def row_block(r):
            return min(_round_up(r, 32), _round_up(n, 32))
    bwd_rows = row_block(config.bwd_rows)
    return _Plan(
        n=n,
        d=d,
        cols=cols,
        d_pad=d_pad,
        rows=row_block(config.rows),
        bwd_rows=bwd_rows,
        bwd_tiles=max(1, min(config.bwd_tiles, -(-n // bwd_rows))),
        backend=backend,
        interpret=bool(interpret),
        num_warps=config.num_warps,
    )


def _compiler_params(plan: _Plan):
    if plan.interpret:
        return None
    if plan.backend == "triton":
        return compat.triton_compiler_params(num_warps=plan.num_warps)
    return compat.tpu_compiler_params(dimension_semantics=("parallel", "parallel"))


def _pallas_call(kernel, plan: _Plan, **kwargs):
    params = _compiler_params(plan)
    if params is not None:
        kwargs["compiler_params"] = params
    return pl.pallas_call(kernel, interpret=plan.interpret, **kwargs)


def coefficient_table(a: jax.Array, b: jax.Array, d: int, d_pad: int, dtype) -> jax.Array:
    """Per-channel ``(16, d_pad)`` table: ``a[g, k]`` in row ``k``, ``|b[g, j]|`` in row ``8 + j``."""
    groups = a.shape[0]
    per_group = jnp.zeros((TABLE_ROWS, groups), dtype)
    per_group = per_group.at[:NUM_A].set(a.astype(dtype).T)
    per_group = per_group.at[_B_ROW : _B_ROW + NUM_B].set(jnp.abs(b.astype(dtype)).T)
    table = jnp.repeat(per_group, d // groups, axis=1)
    return jnp.pad(table, ((0, 0), (0, d_pad - d)))


# ---------------------------------------------------------------- kernel bodies


def _valid(shape, row0, col0, plan: _Plan):
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (rows < plan.n) & (cols < plan.d)


def _load(ref, mask, plan: _Plan, dtype):
    """The block in ``dtype``, zero where ``mask`` is False (outside the array)."""
    if plan.masked_io:
        return compat.triton_load(ref, mask=mask, other=0).astype(dtype)
    return jnp.where(mask, ref[...].astype(dtype), 0)


def _store(ref, value, mask, plan: _Plan):
    if plan.masked_io:
        compat.triton_store(ref, value.astype(ref.dtype), mask=mask)
    else:  # Mosaic TPU (and interpret mode) drop what falls outside the array
        ref[...] = value.astype(ref.dtype)


def _coefficients(c_ref):
    """The table rows as ``(1, cols)`` arrays: ``[a0..a5]``, ``[|b1|..|b4|]``."""
    a = [c_ref[pl.ds(k, 1), :] for k in range(NUM_A)]
    b = [c_ref[pl.ds(_B_ROW + j, 1), :] for j in range(NUM_B)]
    return a, b


def _horner(coefs, x):
    acc = coefs[-1]
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc


def _rational(x, a, b):
    """``P(x)``, ``Q(x)``, ``|x|`` by Horner's rule (``Q`` in ``|x|``: ``|b_j x^j| = |b_j| |x|^j``)."""
    ax = jnp.abs(x)
    p = _horner(a, x)
    q = _horner([jnp.ones_like(b[0])] + b, ax)
    return p, q, ax


def _fwd_kernel(x_ref, c_ref, y_ref, *, plan: _Plan):
    row0 = pl.program_id(1) * plan.rows
    col0 = pl.program_id(0) * plan.cols
    dtype = c_ref.dtype
    mask = _valid((plan.rows, plan.cols), row0, col0, plan)
    x = _load(x_ref, mask, plan, dtype)
    a, b = _coefficients(c_ref)
    p, q, _ = _rational(x, a, b)
    _store(y_ref, p / q, mask, plan)


def _bwd_kernel(x_ref, g_ref, c_ref, dx_ref, part_ref, *, plan: _Plan):
    tile = plan.bwd_rows
    row0 = pl.program_id(1) * (tile * plan.bwd_tiles)
    col0 = pl.program_id(0) * plan.cols
    dtype = c_ref.dtype
    a, b = _coefficients(c_ref)
    da_coefs = [k * a[k] for k in range(1, NUM_A)]  # P'(x) = sum_k k a_k x^(k-1)
    dq_coefs = [(j + 1) * b[j] for j in range(NUM_B)]  # |Q'(x)| = sum_j j |b_j| |x|^(j-1)

    def step(t, sums):
        start = t * tile
        if not isinstance(start, int):
            start = pl.multiple_of(start, tile)
        rows = pl.ds(start, tile)
        mask = _valid((tile, plan.cols), row0 + start, col0, plan)
        x = _load(x_ref.at[rows, :], mask, plan, dtype)
        g = _load(g_ref.at[rows, :], mask, plan, dtype)  # masked lanes: x = g = 0, so no contribution
        p, q, ax = _rational(x, a, b)
        r = g / q
        y = p / q
        sgn = jnp.where(x < 0, -1.0, 1.0).astype(dtype)  # sign(0) = +1, as JAX's d|x|/dx and KAT
        dx = r * (_horner(da_coefs, x) - y * sgn * _horner(dq_coefs, ax))
        _store(dx_ref.at[rows, :], dx, mask, plan)
        # dy x^k / Q for k = 0..5 and -dy P / Q^2 |x|^j for j = 1..4, summed over rows.
        terms, xk = [r], r
        for _ in range(1, NUM_A):
            xk = xk * x
            terms.append(xk)
        s = -r * y
        for _ in range(NUM_B):
            s = s * ax
            terms.append(s)
        return tuple(acc + jnp.sum(v, axis=0, keepdims=True) for acc, v in zip(sums, terms))

    zeros = tuple(jnp.zeros((1, plan.cols), dtype) for _ in range(NUM_A + NUM_B))
    if plan.bwd_tiles == 1:
        sums = step(0, zeros)
    else:
        sums = jax.lax.fori_loop(0, plan.bwd_tiles, step, zeros)
    for k in range(NUM_A):
        part_ref[pl.ds(k, 1), :] = sums[k]
    for j in range(NUM_B):
        part_ref[pl.ds(_B_ROW + j, 1), :] = sums[NUM_A + j]
    part_ref[pl.ds(NUM_A, 2), :] = jnp.zeros((2, plan.cols), dtype)
    part_ref[pl.ds(_B_ROW + NUM_B, 4), :] = jnp.zeros((4, plan.cols), dtype)


# ---------------------------------------------------------------- wrappers


def grkan_fwd_pallas(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    groups: int = 8,
    backend: str = "triton",
    interpret: bool = False,
    config: BlockConfig | None = None,
) -> jax.Array:
    """GR-KAN forward ``y = P(x) / Q(x)`` as a Pallas kernel (no autodiff rule; see :func:`grkan`).

    Args:
      x, a, b, groups: as :func:`grkan`.
      backend: ``"triton"`` (GPU: power-of-two blocks, masked loads and stores)
        or ``"tpu"`` (Mosaic: (8, 128)-aligned blocks, edge blocks clipped).
      interpret: run that backend's kernel in Pallas interpret mode (any platform).
      config: block sizes (default: :func:`triton_config`'s measured choice for Triton,
        :data:`TPU_CONFIG` for ``"tpu"``).
    """
    check_grkan_args(x, a, b, groups)
    n, d = x.size // max(x.shape[-1], 1), x.shape[-1]
    if n == 0:
        return jnp.zeros_like(x)
    if config is None and backend == "triton":
        config = triton_config("fwd", d, x.dtype)
    plan = _plan(n, d, backend, interpret, config)
    dtype = compute_dtype(x, a, b)
    table = coefficient_table(a, b, d, plan.d_pad, dtype)
    grid = (plan.col_blocks, pl.cdiv(n, plan.rows))
    block = pl.BlockSpec((plan.rows, plan.cols), lambda j, i: (i, j))
    y = _pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        plan,
        grid=grid,
        in_specs=[block, pl.BlockSpec((TABLE_ROWS, plan.cols), lambda j, i: (0, j))],
        out_specs=block,
        out_shape=jax.ShapeDtypeStruct((n, d), x.dtype),
        name="grkan_fwd",
    )(x.reshape(n, d), table)
    return y.reshape(x.shape)


def grkan_bwd_pallas(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    dy: jax.Array,
    *,
    groups: int = 8,
    backend: str = "triton",
    interpret: bool = False,
    config: BlockConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GR-KAN backward as a Pallas kernel: ``(dx, da, db)`` for the cotangent ``dy``.

    One kernel computes ``dx`` and, per grid step, the partial sums of the
    coefficient gradients into a ``(n_row_blocks * 16, D)`` buffer (no
    atomics); XLA sums them over blocks and channel groups afterwards.

    Args:
      x, a, b, groups: as :func:`grkan`.
      dy: cotangent of the output, shape and dtype of ``x``.
      backend, interpret, config: as :func:`grkan_fwd_pallas`.

    Returns:
      ``dx`` (like ``x``), ``da`` (like ``a``, shape ``(G, 6)``), ``db`` (like ``b``, ``(G, 4)``).
    """
    check_grkan_args(x, a, b, groups)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    n, d = x.size // max(x.shape[-1], 1), x.shape[-1]
    if n == 0:
        return jnp.zeros_like(x), jnp.zeros_like(a), jnp.zeros_like(b)
    if config is None and backend == "triton":
        config = triton_config("bwd", d, x.dtype)
    plan = _plan(n, d, backend, interpret, config)
    dtype = compute_dtype(x, a, b)
    table = coefficient_table(a, b, d, plan.d_pad, dtype)
    step_rows = plan.bwd_rows * plan.bwd_tiles
    row_blocks = pl.cdiv(n, step_rows)
    block = pl.BlockSpec((step_rows, plan.cols), lambda j, i: (i, j))
    dx, partial = _pallas_call(
        functools.partial(_bwd_kernel, plan=plan),
        plan,
        grid=(plan.col_blocks, row_blocks),
        in_specs=[block, block, pl.BlockSpec((TABLE_ROWS, plan.cols), lambda j, i: (0, j))],
        out_specs=[block, pl.BlockSpec((TABLE_ROWS, plan.cols), lambda j, i: (i, j))],
        out_shape=[
            jax.ShapeDtypeStruct((n, d), x.dtype),
            jax.ShapeDtypeStruct((row_blocks * TABLE_ROWS, plan.d_pad), dtype),
        ],
        name="grkan_bwd",
    )(x.reshape(n, d), dy.reshape(n, d), table)
    # (n_row_blocks, 16, D) partial sums -> (16, G): over row blocks, then over each group's channels.
    sums = partial.reshape(row_blocks, TABLE_ROWS, plan.d_pad)[:, :, :d].sum(axis=0)
    sums = sums.reshape(TABLE_ROWS, groups, d // groups).sum(axis=-1)
    da = sums[:NUM_A].T
    db = sums[_B_ROW : _B_ROW + NUM_B].T * kat_sign(b.astype(dtype))
    return dx.reshape(x.shape), da.astype(a.dtype), db.astype(b.dtype)


# ---------------------------------------------------------------- public API


def _impls(groups: int, fn_ref, fn_pallas, fn_mosaic):
    """The implementations :func:`dispatch` chooses from, for one function."""
    return dict(
        reference=functools.partial(fn_ref, groups=groups),
        gpu=functools.partial(fn_pallas, groups=groups, backend="triton"),
        tpu=functools.partial(fn_pallas, groups=groups, backend="tpu"),
        interpret=functools.partial(fn_pallas, groups=groups, backend="triton", interpret=True),
        mosaic_gpu=functools.partial(fn_mosaic, groups=groups),
    )


def _mosaic(name):  # imported when used: grkan_mosaic imports this module
    def call(*args, **kwargs):
        from jaxopt_lab.kernels import grkan_mosaic

        return getattr(grkan_mosaic, name)(*args, **kwargs)

    return call


def grkan_bwd(
    x: jax.Array, a: jax.Array, b: jax.Array, dy: jax.Array, *, groups: int = 8, impl: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward of :func:`grkan` alone: ``(dx, da, db)`` for the cotangent ``dy``.

    ``impl="reference"`` is :func:`grkan_reference_bwd` (the closed-form
    derivatives in ``jnp``); the other choices are as in :func:`grkan`.
    """
    check_impl(impl)
    check_grkan_args(x, a, b, groups)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    return dispatch(impl, x, a, b, dy, **_impls(groups, grkan_reference_bwd, grkan_bwd_pallas, _mosaic("grkan_bwd_mosaic")))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grkan(x, a, b, groups, impl):
    return dispatch(impl, x, a, b, **_impls(groups, grkan_reference, grkan_fwd_pallas, _mosaic("grkan_fwd_mosaic")))


def _grkan_fwd(x, a, b, groups, impl):
    return _grkan(x, a, b, groups, impl), (x, a, b)


def _grkan_bwd(groups, impl, residuals, dy):
    x, a, b = residuals  # FlashKAT-style: recompute P and Q rather than store them
    return grkan_bwd(x, a, b, dy, groups=groups, impl=impl)


_grkan.defvjp(_grkan_fwd, _grkan_bwd)


def grkan(x: jax.Array, a: jax.Array, b: jax.Array, *, groups: int = 8, impl: str | None = None) -> jax.Array:
    """KAT's group-rational activation ``y = P(x) / Q(x)``, with a Pallas forward and backward.

    Channel ``c`` of ``x``'s last axis ``D`` belongs to group ``g = c // (D / G)``
    and maps to ``y = P(x) / Q(x)`` with ``P(x) = sum_{k=0..5} a[g,k] x^k`` and
    ``Q(x) = 1 + sum_{j=1..4} |b[g,j-1]| |x|^j`` (KAT's safe Pade form
    ``1 + |b_1 x| + |b_2 x^2| + ...``). Differentiable in ``x``, ``a`` and ``b``
    through a ``custom_vjp`` whose backward is the FlashKAT-style kernel
    :func:`grkan_bwd_pallas` (see this module's docstring for the equations).

    Args:
      x: input ``(..., D)``, any float dtype; computed in float32, returned in ``x.dtype``.
      a: numerator coefficients ``(groups, 6)``; ``a[g, k]`` multiplies ``x^k``.
      b: denominator coefficients ``(groups, 4)``; ``b[g, j]`` multiplies ``|x|^(j+1)``
        through ``|b[g, j]|``.
      groups: number of channel groups ``G``; ``D`` must be divisible by it.
      impl: ``None`` (auto: Pallas on GPU/TPU, reference elsewhere),
        ``"pallas"``, ``"interpret"``, ``"reference"`` or ``"mosaic_gpu"``
        (:mod:`jaxopt_lab.kernels.grkan_mosaic`, JAX >= 0.11); see
        :mod:`jaxopt_lab.kernels.dispatch`.

    Returns:
      ``y``, shape and dtype of ``x``.

    References:
      Yang & Wang, "Kolmogorov-Arnold Transformer", 2024 (GR-KAN);
      Raffel & Chen, "FlashKAT: Understanding and Addressing Performance
      Bottlenecks in the Kolmogorov-Arnold Transformer", 2025.
    """
    check_impl(impl)
    check_grkan_args(x, a, b, groups)
    if impl == "reference":  # plain jnp, differentiated by JAX
        return grkan_reference(x, a, b, groups=groups)
    return _grkan(x, a, b, int(groups), impl)
