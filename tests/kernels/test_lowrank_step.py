"""The fused low-rank step: Pallas (interpret mode) against the reference, and
against the unfused GaLore / Fira transforms; lowering for CUDA and TPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.kernels import _pallas_compat as compat
from jaxopt_lab.kernels.lowrank_step import lowrank_apply, lowrank_project, lowrank_step
from jaxopt_lab.kernels.lowrank_step_reference import NO_PREVIOUS_NORM
from jaxopt_lab.lowrank import scale_by_fira, scale_by_galore
from jaxopt_lab.lowrank._adam import scale_by_adam_moments

RNG = np.random.default_rng(0)
# (d, k, r, transpose): block-aligned, ragged in every dimension, and transposed layouts
SHAPES = [(128, 64, 16, False), (70, 50, 5, False), (64, 96, 8, True), (33, 100, 7, True)]


def _inputs(d, k, r, transpose, dtype):
    g = jnp.asarray(RNG.standard_normal((k, d) if transpose else (d, k)), dtype)
    p = jnp.asarray(np.linalg.qr(RNG.standard_normal((d, r)))[0], jnp.float32)
    return g, p


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("d, k, r, transpose", SHAPES)
def test_passes_match_float64_numpy(d, k, r, transpose, dtype):
    g, p = _inputs(d, k, r, transpose, dtype)
    g64 = np.asarray(g.astype(jnp.float32), np.float64)
    go = g64.T if transpose else g64  # oriented (d, k)
    p64 = np.asarray(p, np.float64)
    low, g2 = lowrank_project(g, p, transpose=transpose, impl="interpret")
    np.testing.assert_allclose(np.asarray(low), p64.T @ go, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g2), (go**2).sum(0), rtol=1e-5)
    m = RNG.standard_normal((r, k))
    s = RNG.standard_normal(k)
    out = lowrank_apply(g, p, jnp.asarray(m, jnp.float32), jnp.asarray(s, jnp.float32), transpose=transpose,
                        impl="interpret")
    expected = p64 @ m + go * s[None, :]
    assert out.dtype == dtype and out.shape == g.shape
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32), np.float64), expected.T if transpose else expected,
                               rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("residual", [False, True], ids=["galore", "fira"])
@pytest.mark.parametrize("transpose", [False, True], ids=["left", "right"])
def test_fused_step_matches_the_unfused_transform(residual, transpose):
    # one matrix; the transform projects the smaller side: (24, 40) rows, (40, 24) columns
    shape = (40, 24) if transpose else (24, 40)
    b1, b2, eps, scale, rank = 0.9, 0.999, 1e-6, 0.5, 6
    make = scale_by_fira if residual else scale_by_galore
    kwargs = {"growth_limit": 1.01} if residual else {}
    tx = make(rank=rank, update_proj_gap=100, scale=scale, inner=scale_by_adam_moments(b1, b2, eps),
              label_fn={"w": True}, **kwargs)
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    mu = nu = jnp.zeros((rank, 40), jnp.float32)  # moments r × k, k = 40 either way
    previous = jnp.full([], NO_PREVIOUS_NORM, jnp.float32)
    step = jax.jit(functools.partial(lowrank_step, transpose=transpose, b1=b1, b2=b2, eps=eps, scale=scale,
                                     residual=residual, impl="interpret"))
    base = RNG.standard_normal(shape)
    for t in range(4):  # the growth limiter acts from the second step on
        g = jnp.asarray(base * (1 + 2 * t) + RNG.standard_normal(shape), jnp.float32)
        expected, state = tx.update({"w": g}, state)
        p = state.projectors.basis["w"]
        update, mu, nu, previous = step(g, p, mu, nu, previous)
        np.testing.assert_allclose(np.asarray(update), np.asarray(expected["w"]), rtol=2e-5, atol=2e-5)
    if residual:
        np.testing.assert_allclose(float(previous), float(state.extra.previous_norm["w"]), rtol=1e-4)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_accelerators(platform):
    d, k, r = 512, 384, 128
    p = jax.ShapeDtypeStruct((d, r), jnp.float32)
    mu = jax.ShapeDtypeStruct((r, k), jnp.float32)
    prev = jax.ShapeDtypeStruct((), jnp.float32)
    for transpose in (False, True):
        for dtype in (jnp.float32, jnp.bfloat16):
            g = jax.ShapeDtypeStruct((k, d) if transpose else (d, k), dtype)
            for residual in (False, True):
                fn = functools.partial(lowrank_step, transpose=transpose, residual=residual, impl="pallas")
                exported = compat.export(fn, platform, g, p, mu, mu, prev)
                text = exported.mlir_module()
                assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_pallas_matches_reference_on_gpu():
    for d, k, r, transpose in [(4096, 4096, 128, False), (1024, 4096, 128, True), (70, 50, 5, False)]:
        for dtype in (jnp.float32, jnp.bfloat16):
            g, p = _inputs(d, k, r, transpose, dtype)
            mu = nu = jnp.zeros((r, k), jnp.float32)
            prev = jnp.asarray(1.0, jnp.float32)
            fn = functools.partial(lowrank_step, transpose=transpose, residual=True)
            got = jax.jit(functools.partial(fn, impl="pallas"))(g, p, mu, nu, prev)
            ref = jax.jit(functools.partial(fn, impl="reference"))(g, p, mu, nu, prev)
            tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4  # float32 (HIGHEST) products on both sides
            np.testing.assert_allclose(np.asarray(got[0].astype(jnp.float32)), np.asarray(ref[0].astype(jnp.float32)),
                                       rtol=tol, atol=tol)
