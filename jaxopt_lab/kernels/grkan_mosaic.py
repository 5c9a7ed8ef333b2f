"""GR-KAN forward and backward on Pallas's Mosaic GPU backend (JAX >= 0.11), beside the Triton kernels.

JAX 0.11 deprecates Pallas's Triton lowering; Mosaic GPU is its successor.
The functions and equations are :mod:`jaxopt_lab.kernels.grkan`'s; the
layout differs:

* a kernel is a grid of ``(D / 128 column blocks) x SPLITS`` thread blocks
  (``plgpu.kernel``); each walks its share of the row blocks with
  ``plgpu.emit_pipeline``, so the TMA copies of block ``t + 1`` overlap the
  arithmetic on block ``t``;
* ragged rows are left to the TMA engine (out-of-bounds loads read zeros,
  out-of-bounds stores are dropped), so no masks: a zero ``x`` with a zero
  ``dy`` adds nothing to the coefficient sums;
* the backward carries its 10 per-channel column sums in registers through
  the pipeline and writes them once per thread block into a
  ``(SPLITS * 16, D)`` buffer, summed by XLA afterwards (no atomics, as the
  Triton kernel);
* register layouts are given (WGMMA for the tiles, its column reduction for
  the coefficient rows and the sums): Mosaic's layout inference otherwise
  runs out of search budget on the backward.

Limits: ``D`` must be a multiple of 128 (KAT's 768, 1536, 3072 are); the
blocks are read from shared memory without a swizzle transform, which costs
bank conflicts (measured on an H200, BENCHMARKS.md: the forward takes 1.1-2.3x
the Triton kernel's time, the backward 4-6x). So :func:`jaxopt_lab.kernels.grkan`
keeps the Triton kernels as its GPU default while JAX ships them;
``impl="mosaic_gpu"`` selects these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxopt_lab.kernels import _pallas_compat as compat
from jaxopt_lab.kernels.grkan import _B_ROW, TABLE_ROWS, _horner, coefficient_table
from jaxopt_lab.kernels.grkan_reference import NUM_A, NUM_B, check_grkan_args, kat_sign

ROWS = 64  # rows per pipeline step (a WGMMA-layout tile is a multiple of 64 rows)
COLS = 128  # channels per thread block
SPLITS = 8  # thread blocks along the rows, per column block


def _check(x, groups):
    d = x.shape[-1]
    if d % COLS:
        raise ValueError(f"the Mosaic GPU GR-KAN kernels need D (x's last axis) to be a multiple of {COLS}, got {d}")
    if not compat.mosaic_gpu_available():
        raise NotImplementedError(f"this JAX ({jax.__version__}) has no usable Pallas Mosaic GPU backend (needs >= 0.11)")


def _layouts():
    plgpu = compat.plmgpu
    return plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(0)


def _tile_math(x_ref, c_ref):
    """``x`` (float32, WGMMA layout) and the coefficient rows broadcast to the tile."""
    plgpu = compat.plmgpu
    tile, col = _layouts()

    def row(k):
        return plgpu.layout_cast(jnp.broadcast_to(plgpu.load(c_ref.at[k], layout=col)[None, :], (ROWS, COLS)), tile)

    x = plgpu.load(x_ref, layout=tile).astype(jnp.float32)
    return x, [row(k) for k in range(NUM_A)], [row(_B_ROW + j) for j in range(NUM_B)]


def _fwd_body(_, x_ref, c_ref, y_ref):
    x, a, b = _tile_math(x_ref, c_ref)
    p = _horner(a, x)
    q = _horner([jnp.ones_like(b[0])] + b, jnp.abs(x))
    y_ref[...] = (p / q).astype(y_ref.dtype)


def _bwd_body(_, x_ref, g_ref, c_ref, dx_ref, sums):
    plgpu = compat.plmgpu
    tile, col = _layouts()
    w = lambda v: plgpu.layout_cast(v, tile)  # noqa: E731
    x, a, b = _tile_math(x_ref, c_ref)
    g = plgpu.load(g_ref, layout=tile).astype(jnp.float32)
    ax = jnp.abs(x)
    p = w(_horner(a, x))
    q = w(_horner([jnp.ones_like(b[0])] + b, ax))
    r, y = w(g / q), w(p / q)
    sgn = jnp.where(x < 0, -1.0, 1.0)  # sign(0) = +1, as the Triton kernel and KAT
    dp = w(_horner([k * a[k] for k in range(1, NUM_A)], x))
    dq = w(_horner([(j + 1) * b[j] for j in range(NUM_B)], ax))
    dx_ref[...] = w(r * (dp - y * sgn * dq)).astype(dx_ref.dtype)
    terms, xk = [r], r
    for _ in range(1, NUM_A):
        xk = w(xk * x)
        terms.append(xk)
    s = w(-r * y)
    for _ in range(NUM_B):
        s = w(s * ax)
        terms.append(s)
    return tuple(acc + plgpu.layout_cast(jnp.sum(v, axis=0), col) for acc, v in zip(sums, terms))


def _grid(n):
    row_blocks = pl.cdiv(n, ROWS)
    splits = min(SPLITS, row_blocks)
    return splits, pl.cdiv(row_blocks, splits)


def grkan_fwd_mosaic(x: jax.Array, a: jax.Array, b: jax.Array, *, groups: int = 8) -> jax.Array:
    """GR-KAN forward ``y = P(x) / Q(x)`` on Mosaic GPU (see :func:`jaxopt_lab.kernels.grkan`)."""
    check_grkan_args(x, a, b, groups)
    _check(x, groups)
    plgpu = compat.plmgpu
    n, d = x.size // x.shape[-1], x.shape[-1]
    if n == 0:
        return jnp.zeros_like(x)
    table = coefficient_table(a, b, d, d, jnp.float32)
    splits, steps = _grid(n)

    @plgpu.kernel(out_type=jax.ShapeDtypeStruct((n, d), x.dtype), grid=(d // COLS, splits), grid_names=("c", "s"))
    def kernel(x_gmem, c_gmem, y_gmem):
        j, s = jax.lax.axis_index("c"), jax.lax.axis_index("s")
        block = plgpu.BlockSpec((ROWS, COLS), lambda t: (s * steps + t, j))
        plgpu.emit_pipeline(
            _fwd_body, grid=(steps,), in_specs=[block, plgpu.BlockSpec((TABLE_ROWS, COLS), lambda t: (0, j))],
            out_specs=[block], max_concurrent_steps=2,
        )(x_gmem, c_gmem, y_gmem)

    return kernel(x.reshape(n, d), table).reshape(x.shape)


def grkan_bwd_mosaic(x: jax.Array, a: jax.Array, b: jax.Array, dy: jax.Array, *, groups: int = 8):
    """GR-KAN backward ``(dx, da, db)`` on Mosaic GPU (see :func:`jaxopt_lab.kernels.grkan_bwd_pallas`)."""
    check_grkan_args(x, a, b, groups)
    _check(x, groups)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    plgpu = compat.plmgpu
    _, col = _layouts()
    n, d = x.size // x.shape[-1], x.shape[-1]
    if n == 0:
        return jnp.zeros_like(x), jnp.zeros_like(a), jnp.zeros_like(b)
    table = coefficient_table(a, b, d, d, jnp.float32)
    splits, steps = _grid(n)
    out_type = (jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((splits * TABLE_ROWS, d), jnp.float32))

    @plgpu.kernel(out_type=out_type, grid=(d // COLS, splits), grid_names=("c", "s"),
                  scratch_types=[plgpu.SMEM((TABLE_ROWS, COLS), jnp.float32)])
    def kernel(x_gmem, g_gmem, c_gmem, dx_gmem, part_gmem, sums_smem):
        j, s = jax.lax.axis_index("c"), jax.lax.axis_index("s")
        block = plgpu.BlockSpec((ROWS, COLS), lambda t: (s * steps + t, j))
        zeros = tuple(plgpu.layout_cast(jnp.zeros((COLS,), jnp.float32), col) for _ in range(NUM_A + NUM_B))
        sums = plgpu.emit_pipeline(
            _bwd_body, grid=(steps,),
            in_specs=[block, block, plgpu.BlockSpec((TABLE_ROWS, COLS), lambda t: (0, j))],
            out_specs=[block], max_concurrent_steps=2, init_carry=zeros,
        )(x_gmem, g_gmem, c_gmem, dx_gmem)
        sums_smem[...] = jnp.zeros((TABLE_ROWS, COLS), jnp.float32)
        for k in range(NUM_A):
            sums_smem[k, :] = sums[k]
        for k in range(NUM_B):
            sums_smem[_B_ROW + k, :] = sums[NUM_A + k]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sums_smem, part_gmem.at[pl.ds(s * TABLE_ROWS, TABLE_ROWS), pl.ds(j * COLS, COLS)])
        plgpu.wait_smem_to_gmem(0)

    dx, partial = kernel(x.reshape(n, d), dy.reshape(n, d), table)
    sums = partial.reshape(splits, TABLE_ROWS, d).sum(axis=0)
    sums = sums.reshape(TABLE_ROWS, groups, d // groups).sum(axis=-1)
    da = sums[:NUM_A].T
    db = sums[_B_ROW : _B_ROW + NUM_B].T * kat_sign(b.astype(jnp.float32))
    return dx.reshape(x.shape), da.astype(a.dtype), db.astype(b.dtype)
