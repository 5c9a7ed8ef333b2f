"""Pallas kernels of the fused low-rank step (GaLore / Fira), beside
:mod:`jaxopt_lab.kernels.lowrank_step_reference` (which states the math).

Unfused, a Fira step on a d × k matrix materializes R, P·N, P·R, G − αPR, the
scaled residual and the sum in HBM: about ten d × k passes. Here:

* :func:`lowrank_project` (pass 1) reads G once and writes only ``R = PᵀG``
  (r × k) and the column norms ``‖G_{:,j}‖²`` (k);
* the Adam moments, Fira's φ and the limiter are r × k arrays (XLA);
* :func:`lowrank_apply` (pass 2) computes ``U = P M + G·diag(s)`` tile by
  tile, reading G once more (Fira only; GaLore's pass 2 reads no G) and
  writing U once.

Grid: pass 1 runs one program per block of ``cols`` columns of the kept side
and loops over the projected side in chunks of ``chunk`` rows, accumulating
the r × cols product in float32; pass 2 runs one program per (chunk × cols)
output tile. A transposed matrix (projected side second) runs the mirrored
kernels on G as stored, so no transpose is ever materialized. Loads are
masked at ragged edges (Triton) or zeroed after the load (TPU and interpret
mode, whose edge blocks are clipped or padded). The rank is padded to a power
of two ≥ 16 (Triton's smallest dot) with zero columns of P and zero rows of M,
which change nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxopt_lab.kernels import _pallas_compat as compat
from jaxopt_lab.kernels.dispatch import check_impl, dispatch
from jaxopt_lab.kernels.lowrank_step_reference import apply_reference, moments_and_combine, project_reference


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Tile sizes: ``cols`` of the kept side per program, ``chunk`` of the projected side per step."""

    cols: int = 64
    chunk: int = 64
    num_warps: int | None = 4

    def __post_init__(self):
        for name in ("cols", "chunk"):
            v = getattr(self, name)
            if int(v) != v or v < 16 or v & (v - 1):
                raise ValueError(f"StepConfig.{name} must be a power of two >= 16, got {v!r}")


TRITON_STEP_CONFIG = StepConfig()
TPU_STEP_CONFIG = StepConfig(cols=128, chunk=128, num_warps=None)

# Measured by `scripts/tune_kernels.py` on an NVIDIA H200 (JAX 0.11.2, Triton lowering) at
# 4096 x 4096, rank 128, per pass and gradient dtype: the fastest of the 12-18 configurations
# reached (partial search, one blocked call at a time, TF32 products at the time; BENCHMARKS.md).
TRITON_STEP_TUNED: dict[tuple[str, str], StepConfig] = {
    ("project", "float32"): StepConfig(cols=32, chunk=128, num_warps=8),
    ("project", "bfloat16"): StepConfig(cols=32, chunk=128, num_warps=4),
    ("apply", "float32"): StepConfig(cols=64, chunk=128, num_warps=4),
    ("apply", "bfloat16"): StepConfig(cols=32, chunk=128, num_warps=8),
}


def _default_config(backend: str, kernel: str, dtype) -> StepConfig:
    if backend == "tpu":
        return TPU_STEP_CONFIG
    return TRITON_STEP_TUNED.get((kernel, jnp.dtype(dtype).name), TRITON_STEP_CONFIG)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rank_pad(r: int) -> int:
    return max(16, _pow2(r))


def _params(backend, interpret, config, axes):
    if interpret:
        return {}
    if backend == "triton":
        return {"compiler_params": compat.triton_compiler_params(num_warps=config.num_warps)}
    return {"compiler_params": compat.tpu_compiler_params(dimension_semantics=("parallel",) * axes)}


def _mask(shape, row0, col0, rows, cols):
    r = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    c = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (r < rows) & (c < cols)


def _load(ref, mask, masked_io):
    if masked_io:
        return compat.triton_load(ref, mask=mask, other=0).astype(jnp.float32)
    return jnp.where(mask, ref[...].astype(jnp.float32), 0.0)


def _store(ref, value, mask, masked_io):
    if masked_io:
        compat.triton_store(ref, value.astype(ref.dtype), mask=mask)
    else:
        ref[...] = value.astype(ref.dtype)


def _dot(a, b, contract_a, contract_b):
    # Full float32 (IEEE) products: Triton and XLA:GPU default to TF32 for float32 dots, which
    # moved R by ~1e-3 against the float64 reference on an H200 (the official GaLore/Fira
    # code multiplies in float32).
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


# ------------------------------------------------------------------ pass 1


def _project_kernel(g_ref, p_ref, low_ref, g2_ref, *, d, k, chunk, cols, transpose, masked_io):
    j0 = pl.program_id(0) * cols
    r = p_ref.shape[1]
    steps = pl.cdiv(d, chunk)

    def body(c, carry):
        acc, g2 = carry
        start = pl.multiple_of(c * chunk, chunk)
        pmask = _mask((chunk, r), start, 0, d, r)
        pc = _load(p_ref.at[pl.ds(start, chunk), :], pmask, masked_io)
        if transpose:  # G stored (k, d): a (cols × chunk) tile
            gmask = _mask((cols, chunk), j0, start, k, d)
            gc = _load(g_ref.at[:, pl.ds(start, chunk)], gmask, masked_io)
            return acc + _dot(gc, pc, 1, 0), g2 + jnp.sum(gc * gc, axis=1, keepdims=True)
        gmask = _mask((chunk, cols), start, j0, d, k)
        gc = _load(g_ref.at[pl.ds(start, chunk), :], gmask, masked_io)
        return acc + _dot(pc, gc, 0, 0), g2 + jnp.sum(gc * gc, axis=0, keepdims=True)

    if transpose:
        init = (jnp.zeros((cols, r), jnp.float32), jnp.zeros((cols, 1), jnp.float32))
    else:
        init = (jnp.zeros((r, cols), jnp.float32), jnp.zeros((1, cols), jnp.float32))
    acc, g2 = jax.lax.fori_loop(0, steps, body, init)
    low_ref[...] = acc
    g2_ref[...] = g2


def lowrank_project_pallas(g, p, *, transpose: bool, backend: str = "triton", interpret: bool = False,
                           config: StepConfig | None = None):
    """Pass 1 as a Pallas kernel: ``(R (r × k), ‖G_{:,j}‖² (k,))``; see :func:`lowrank_project`."""
    config = config or _default_config(backend, "project", g.dtype)
    d, r = p.shape
    k = g.shape[0] if transpose else g.shape[1]
    rp = _rank_pad(r)
    p_pad = jnp.pad(p.astype(jnp.float32), ((0, 0), (0, rp - r)))
    cols = min(config.cols, max(16, _pow2(k)))
    chunk = min(config.chunk, max(16, _pow2(d)))
    dp = pl.cdiv(d, chunk) * chunk
    nk = pl.cdiv(k, cols)
    kernel = functools.partial(_project_kernel, d=d, k=k, chunk=chunk, cols=cols, transpose=transpose,
                               masked_io=backend == "triton" and not interpret)
    if transpose:
        g_spec = pl.BlockSpec((cols, dp), lambda j: (j, 0))
        out_specs = [pl.BlockSpec((cols, rp), lambda j: (j, 0)), pl.BlockSpec((cols, 1), lambda j: (j, 0))]
        out_shape = [jax.ShapeDtypeStruct((nk * cols, rp), jnp.float32), jax.ShapeDtypeStruct((nk * cols, 1), jnp.float32)]
    else:
        g_spec = pl.BlockSpec((dp, cols), lambda j: (0, j))
        out_specs = [pl.BlockSpec((rp, cols), lambda j: (0, j)), pl.BlockSpec((1, cols), lambda j: (0, j))]
        out_shape = [jax.ShapeDtypeStruct((rp, nk * cols), jnp.float32), jax.ShapeDtypeStruct((1, nk * cols), jnp.float32)]
    low, g2 = pl.pallas_call(
        kernel, grid=(nk,), in_specs=[g_spec, pl.BlockSpec((dp, rp), lambda j: (0, 0))], out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name="lowrank_project", **_params(backend, interpret, config, 1),
    )(g, p_pad)
    if transpose:
        return low[:k, :r].T, g2[:k, 0]
    return low[:r, :k], g2[0, :k]


# ------------------------------------------------------------------ pass 2


def _apply_kernel(*refs, d, k, chunk, cols, transpose, with_g, masked_io):
    if with_g:
        p_ref, m_ref, s_ref, g_ref, out_ref = refs
    else:
        p_ref, m_ref, out_ref = refs
    i0 = pl.program_id(0) * chunk  # along the projected side
    j0 = pl.program_id(1) * cols  # along the kept side
    r = p_ref.shape[1]
    pc = _load(p_ref, _mask((chunk, r), i0, 0, d, r), masked_io)
    if transpose:  # m is (k, r) here, the output tile (cols × chunk)
        mc = _load(m_ref, _mask((cols, r), j0, 0, k, r), masked_io)
        out = _dot(mc, pc, 1, 1)
        mask = _mask((cols, chunk), j0, i0, k, d)
        if with_g:
            s = _load(s_ref, _mask((cols, 1), j0, 0, k, 1), masked_io)
            out = out + s * _load(g_ref, mask, masked_io)
    else:
        mc = _load(m_ref, _mask((r, cols), 0, j0, r, k), masked_io)
        out = _dot(pc, mc, 1, 0)
        mask = _mask((chunk, cols), i0, j0, d, k)
        if with_g:
            s = _load(s_ref, _mask((1, cols), 0, j0, 1, k), masked_io)
            out = out + s * _load(g_ref, mask, masked_io)
    _store(out_ref, out, mask, masked_io)


def lowrank_apply_pallas(g, p, m, col_scale, *, transpose: bool, out_dtype=None, backend: str = "triton",
                         interpret: bool = False, config: StepConfig | None = None):
    """Pass 2 as a Pallas kernel: ``U = P M + G·diag(s)``; see :func:`lowrank_apply`."""
    config = config or _default_config(backend, "apply", jnp.float32 if g is None else g.dtype)
    d, r = p.shape
    k = m.shape[1]
    rp = _rank_pad(r)
    p_pad = jnp.pad(p.astype(jnp.float32), ((0, 0), (0, rp - r)))
    m_pad = jnp.pad(m.astype(jnp.float32), ((0, rp - r), (0, 0)))
    cols = min(config.cols, max(16, _pow2(k)))
    chunk = min(config.chunk, max(16, _pow2(d)))
    with_g = g is not None
    out_dtype = out_dtype or (g.dtype if with_g else jnp.float32)
    grid = (pl.cdiv(d, chunk), pl.cdiv(k, cols))
    p_spec = pl.BlockSpec((chunk, rp), lambda i, j: (i, 0))
    if transpose:
        operands = [p_pad, m_pad.T]
        specs = [p_spec, pl.BlockSpec((cols, rp), lambda i, j: (j, 0))]
        if with_g:
            operands += [col_scale.astype(jnp.float32)[:, None], g]
            specs += [pl.BlockSpec((cols, 1), lambda i, j: (j, 0)), pl.BlockSpec((cols, chunk), lambda i, j: (j, i))]
        out_spec = pl.BlockSpec((cols, chunk), lambda i, j: (j, i))
        out_shape = jax.ShapeDtypeStruct((k, d), out_dtype)
    else:
        operands = [p_pad, m_pad]
        specs = [p_spec, pl.BlockSpec((rp, cols), lambda i, j: (0, j))]
        if with_g:
            operands += [col_scale.astype(jnp.float32)[None, :], g]
            specs += [pl.BlockSpec((1, cols), lambda i, j: (0, j)), pl.BlockSpec((chunk, cols), lambda i, j: (i, j))]
        out_spec = pl.BlockSpec((chunk, cols), lambda i, j: (i, j))
        out_shape = jax.ShapeDtypeStruct((d, k), out_dtype)
    kernel = functools.partial(_apply_kernel, d=d, k=k, chunk=chunk, cols=cols, transpose=transpose, with_g=with_g,
                               masked_io=backend == "triton" and not interpret)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=specs, out_specs=out_spec, out_shape=out_shape, interpret=interpret,
        name="lowrank_apply", **_params(backend, interpret, config, 2),
    )(*operands)


# ------------------------------------------------------------------ public API


def _check(g, p, transpose):
    if g.ndim != 2 or p.ndim != 2:
        raise ValueError(f"g and p must be matrices, got shapes {tuple(g.shape)} and {tuple(p.shape)}")
    d = g.shape[1] if transpose else g.shape[0]
    if p.shape[0] != d:
        side = "second" if transpose else "first"
        raise ValueError(f"p {tuple(p.shape)} must have as many rows as g's {side} dimension ({d}); g is {tuple(g.shape)}")


def lowrank_project(g, p, *, transpose: bool = False, impl: str | None = None):
    """``R = PᵀG`` (r × k, float32) and ``‖G_{:,j}‖²`` (k,), reading G once.

    Args:
      g: the gradient, (d, k); or (k, d) with ``transpose=True`` (the projected
        side is its second dimension), read in that layout.
      p: the projection, (d, r).
      impl: ``None`` (Pallas on GPU/TPU, reference elsewhere), ``"pallas"``,
        ``"interpret"`` or ``"reference"``.
    """
    check_impl(impl)
    _check(g, p, transpose)
    return dispatch(
        impl, g, p,
        reference=functools.partial(project_reference, transpose=transpose),
        gpu=functools.partial(lowrank_project_pallas, transpose=transpose, backend="triton"),
        tpu=functools.partial(lowrank_project_pallas, transpose=transpose, backend="tpu"),
        interpret=functools.partial(lowrank_project_pallas, transpose=transpose, interpret=True),
    )


def lowrank_apply(g, p, m, col_scale=None, *, transpose: bool = False, out_dtype=None, impl: str | None = None):
    """``U = P M + G·diag(s)`` in G's layout, reading G once and writing U once.

    ``g`` and ``col_scale`` (k,) may be None (GaLore: ``U = P M``, in
    ``out_dtype``, float32 by default); ``m`` is (r, k).
    """
    check_impl(impl)
    if g is not None:
        _check(g, p, transpose)
    if (g is None) != (col_scale is None):
        raise ValueError("g and col_scale go together: give both (Fira) or neither (GaLore)")
    args = (p, m) if g is None else (p, m, col_scale, g)

    def wrap(fn, **kw):
        if g is None:
            return lambda p_, m_: fn(None, p_, m_, None, transpose=transpose, out_dtype=out_dtype, **kw)
        return lambda p_, m_, s_, g_: fn(g_, p_, m_, s_, transpose=transpose, out_dtype=out_dtype, **kw)

    return dispatch(
        impl, *args,
        reference=wrap(apply_reference),
        gpu=wrap(lowrank_apply_pallas, backend="triton"),
        tpu=wrap(lowrank_apply_pallas, backend="tpu"),
        interpret=wrap(lowrank_apply_pallas, interpret=True),
    )


def lowrank_step(g, p, mu, nu, previous_norm, *, transpose: bool = False, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-6, scale: float = 0.25, residual: bool = False, growth_limit: float = 1.01,
                 impl: str | None = None):
    """One fused GaLore (``residual=False``) or Fira (``residual=True``) step for one matrix.

    Returns ``(update, mu, nu, previous_norm)``: the update in G's layout and
    dtype (before bias correction and learning rate, as the official code
    splits Adam), the new moments (r × k) and Fira's limiter norm (pass
    ``lowrank_step_reference.NO_PREVIOUS_NORM`` before the first step). See
    :mod:`jaxopt_lab.kernels.lowrank_step_reference` for the equations.
    """
    low, g2 = lowrank_project(g, p, transpose=transpose, impl=impl)
    m, s, mu, nu, previous_norm = moments_and_combine(
        low, g2, p, mu, nu, previous_norm, b1=b1, b2=b2, eps=eps, scale=scale, residual=residual,
        growth_limit=growth_limit)
    if residual:
        update = lowrank_apply(g, p, m, s, transpose=transpose, impl=impl)
    else:
        update = lowrank_apply(None, p, m, None, transpose=transpose, out_dtype=g.dtype, impl=impl)
    return update, mu, nu, previous_norm
