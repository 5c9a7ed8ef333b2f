"""GR-KAN kernels (interpret mode on CPU) against the jnp reference and jax.grad of it, in float64.

Interpret mode compiles slowly on 2 cores, so each case is one jitted function
computing the forward and the backward kernel together, run once per module;
shapes are small and chosen to be ragged (rows and/or columns not multiples of
the block) with block configs small enough to give several row blocks, column
blocks and backward sub-tiles.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.kernels import (
    TPU_CONFIG,
    BlockConfig,
    grkan,
    grkan_bwd,
    grkan_bwd_pallas,
    grkan_fwd_pallas,
    grkan_reference,
    grkan_reference_bwd,
)
from jaxopt_lab.kernels._pallas_compat import enable_x64

grkan_module = importlib.import_module("jaxopt_lab.kernels.grkan")

# Tests are compile-bound on 2 cores: XLA:CPU without its expensive passes compiles about twice as fast.
fast_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
)

SMALL = BlockConfig(rows=16, max_cols=32, bwd_rows=8, bwd_tiles=2)
TPU_SMALL = BlockConfig(rows=32, max_cols=128, bwd_rows=32, bwd_tiles=2, layout="tpu")

# name: (shape of x, groups, dtype, backend, config); backend None: the public grkan(impl="interpret")
CASES = {
    # 99 rows: 7 forward blocks of 16, 7 backward steps of 2 sub-tiles of 8 rows (last ones ragged);
    # D = 40 (groups of 5): column blocks of 32, the second one ragged. Masked loads and stores.
    "triton-f32-ragged": ((3, 33, 40), 8, jnp.float32, "triton", SMALL),
    # the public function through its custom_vjp, default Triton config: one backward step whose
    # 4 sub-tiles of 32 rows run past row 100.
    "grkan-bf16": ((4, 25, 64), 8, jnp.bfloat16, None, None),
    # the measured Triton configs for D > 1024 in float32 (triton_config): forward blocks of
    # 128 columns, backward blocks of 256 (D = 1152 pads to 1280: the last block ragged).
    "triton-f32-wide-tuned": ((2, 9, 1152), 8, jnp.float32, "triton", None),
    # Mosaic TPU code path and layout: 2 column blocks of 128, ragged rows, 2 backward sub-tiles.
    # (Its full-width column block, for D not a multiple of 128, is checked by test_lowering.py.)
    "tpu-bf16-tiles": ((4, 33, 256), 8, jnp.bfloat16, "tpu", TPU_SMALL),
}


def make_inputs(shape, groups, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = (1.5 * jax.random.normal(k[0], shape)).astype(dtype)
    a = 0.5 * jax.random.normal(k[1], (groups, 6))
    b = 0.5 * jax.random.normal(k[2], (groups, 4))
    b = b.at[0, 1].set(0.0)  # sign(0) = +1 convention must match the reference's gradient
    dy = jax.random.normal(k[3], shape).astype(dtype)
    return x, a, b, dy


def to64(*arrays):
    return [np.asarray(jnp.asarray(v, jnp.float32), np.float64) for v in arrays]


@functools.partial(fast_jit, static_argnames="groups")
def _reference_and_vjp(x, a, b, dy, groups):
    y, vjp = jax.vjp(functools.partial(grkan_reference, groups=groups), x, a, b)
    return y, *vjp(dy)


def reference64(x, a, b, dy, groups):
    """The f64 reference and its gradients by jax.vjp (plain autodiff), as numpy."""
    with enable_x64():
        return [np.asarray(v) for v in _reference_and_vjp(*(jnp.asarray(v) for v in to64(x, a, b, dy)), groups)]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    shape, groups, dtype, backend, config = CASES[request.param]
    x, a, b, dy = make_inputs(shape, groups, dtype)
    kw = dict(groups=groups, backend=backend, interpret=True, config=config)

    @fast_jit
    def run(x, a, b, dy):
        if backend is None:
            y, vjp = jax.vjp(lambda x, a, b: grkan(x, a, b, groups=groups, impl="interpret"), x, a, b)
            return y, *vjp(dy)
        return grkan_fwd_pallas(x, a, b, **kw), *grkan_bwd_pallas(x, a, b, dy, **kw)

    got = run(x, a, b, dy)
    again = run(x, a, b, dy)
    return dict(dtype=dtype, inputs=(x, a, b, dy), got=got, again=again, want=reference64(x, a, b, dy, groups))


def test_kernel_matches_float64_reference_and_autodiff(case):
    (y, dx, da, db), (ry, rdx, rda, rdb) = case["got"], case["want"]
    x, a, b, _ = case["inputs"]
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape == dx.shape
    assert da.dtype == a.dtype and da.shape == a.shape and db.dtype == b.dtype and db.shape == b.shape
    # outputs are rounded to the input dtype; coefficient sums are accumulated in f32 either way
    tol = 1e-5 if case["dtype"] == jnp.float32 else 8e-3
    np.testing.assert_allclose(to64(y)[0], ry, rtol=tol, atol=tol * np.abs(ry).max())
    np.testing.assert_allclose(to64(dx)[0], rdx, rtol=tol, atol=tol * np.abs(rdx).max())
    np.testing.assert_allclose(to64(da)[0], rda, rtol=1e-4, atol=1e-5 * np.abs(rda).max())
    np.testing.assert_allclose(to64(db)[0], rdb, rtol=1e-4, atol=1e-5 * np.abs(rdb).max())


def test_kernel_is_deterministic(case):
    """Partial sums per block, reduced in a fixed order: the same bits on every run."""
    for u, v in zip(case["got"], case["again"]):
        assert np.array_equal(np.asarray(u), np.asarray(v))


def test_float64_inputs_are_computed_in_float64():
    x, a, b, dy = make_inputs((100, 64), 8, jnp.float32, seed=1)
    want = reference64(x, a, b, dy, 8)
    with enable_x64():
        x, a, b, dy = (jnp.asarray(v) for v in to64(x, a, b, dy))
        kw = dict(interpret=True, config=SMALL)
        y, *grads = fast_jit(lambda *v: (grkan_fwd_pallas(*v[:3], **kw), *grkan_bwd_pallas(*v, **kw)))(x, a, b, dy)
        assert y.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in grads)
        for g, w in zip((y, *grads), want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-11, atol=1e-12 * np.abs(w).max())


def test_auto_and_reference_impls_on_cpu_match_autodiff():
    """impl=None on CPU runs the reference forward and the closed-form backward in the custom_vjp."""
    x, a, b, dy = make_inputs((5, 64), 8, jnp.float32, seed=4)

    @fast_jit
    def both(x, a, b, dy):
        y, vjp = jax.vjp(lambda x, a, b: grkan(x, a, b), x, a, b)
        ry, rvjp = jax.vjp(lambda x, a, b: grkan(x, a, b, impl="reference"), x, a, b)
        return (y, *vjp(dy)), (ry, *rvjp(dy))

    got, want = both(x, a, b, dy)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())


# The reference checks below share one (100, 64) float64 shape, so its compiled vjp is reused.


def test_reference_bwd_matches_autodiff_of_reference():
    x, a, b, dy = make_inputs((100, 64), 8, jnp.float32, seed=5)
    x = x.at[0, :3].set(0.0)  # sign(0) = +1, as JAX's d|x|/dx
    want = reference64(x, a, b, dy, 8)[1:]
    with enable_x64():
        got = fast_jit(functools.partial(grkan_reference_bwd, groups=8))(*(jnp.asarray(v) for v in to64(x, a, b, dy)))
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-12, atol=1e-12 * np.abs(w).max())


def test_reference_against_numpy_polynomials():
    """An independent float64 evaluation of y = P(x)/Q(x) per group with np.polyval."""
    x, a, b, dy = make_inputs((100, 64), 8, jnp.float32, seed=6)
    got = reference64(x, a, b, dy, 8)[0]
    x64, a64, b64 = to64(x, a, b)
    want = np.empty_like(x64)
    for g in range(8):
        xs = x64[:, 8 * g : 8 * g + 8]
        num = np.polyval(a64[g, ::-1], xs)
        den = 1 + np.polyval(np.r_[np.abs(b64[g, ::-1]), 0.0], np.abs(xs))
        want[:, 8 * g : 8 * g + 8] = num / den
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_coefficient_gradient_of_zero_b_uses_sign_plus_one():
    """KAT's convention: d|b|/db = +1 at b = 0, so an identity-initialised denominator still trains."""
    x, a, b, dy = make_inputs((100, 64), 8, jnp.float32, seed=7)
    b = jnp.zeros_like(b)
    _, _, _, db = reference64(x, a, b, dy, 8)
    x64, a64, dy64 = (v.reshape(100, 8, 8) if v.ndim == 2 and v.shape[0] == 100 else v for v in to64(x, a, dy))
    p = sum(a64[None, :, k, None] * x64**k for k in range(6))  # Q = 1
    for j in range(1, 5):
        np.testing.assert_allclose(db[:, j - 1], np.sum(-dy64 * p * np.abs(x64) ** j, axis=(0, 2)), rtol=1e-12)
    assert np.all(np.abs(db) > 0)


def test_backward_kernel_has_no_atomics():
    """FlashKAT's point: per-block partial sums instead of global atomic adds (checked on the kernel's jaxpr)."""
    x, a, b, dy = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((40, 64), (8, 6), (8, 4), (40, 64)))
    # the Triton kernel as lowered on GPU (masked loads/stores), traced only
    jaxpr = jax.make_jaxpr(functools.partial(grkan_bwd_pallas, config=SMALL))(x, a, b, dy)
    kernels = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(kernels) == 1

    def primitives(jaxpr):  # every primitive, nested jaxprs (loop bodies) included
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", param)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from primitives(sub)

    names = set(primitives(kernels[0].params["jaxpr"]))
    assert {"masked_load", "masked_swap"} <= names  # found inside the loop over sub-tiles
    assert not any("atomic" in n for n in names), names


def test_block_plans_respect_backend_constraints():
    plan = grkan_module._plan
    triton = plan(128 * 197, 3072, "triton", False, None)
    assert triton.cols == 128 and triton.d_pad == 3072
    for size in (triton.rows, triton.cols, triton.bwd_rows):
        assert size & (size - 1) == 0  # powers of two
    tpu = plan(128 * 197, 3072, "tpu", False, None)
    assert tpu.cols % 128 == 0 and 3072 % tpu.cols == 0 and tpu.rows % 32 == 0 and tpu.bwd_rows % 32 == 0
    assert plan(100, 72, "tpu", False, None).cols == 72  # full width when D % 128 != 0
    ragged = plan(100, 40, "triton", False, SMALL)
    assert (ragged.cols, ragged.d_pad) == (32, 64)
    with pytest.raises(ValueError, match="power-of-two"):
        plan(100, 64, "triton", False, TPU_CONFIG)
    with pytest.raises(ValueError, match="backend"):
        plan(100, 64, "cuda", False, None)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: grkan(jnp.ones((4, 60)), jnp.ones((8, 6)), jnp.ones((8, 4))), r"D=60.*groups=8"),
        (lambda: grkan(jnp.ones((4, 64)), jnp.ones((8, 5)), jnp.ones((8, 4))), r"a must have shape \(groups, 6\)"),
        (lambda: grkan(jnp.ones((4, 64)), jnp.ones((8, 6)), jnp.ones((4, 4))), r"b must have shape"),
        (lambda: grkan(jnp.ones((4, 64)), jnp.ones((8, 6)), jnp.ones((8, 4)), impl="cuda"), r"impl must be one of"),
        (lambda: grkan(jnp.ones((4, 64), jnp.int32), jnp.ones((8, 6)), jnp.ones((8, 4))), r"x must be a floating"),
        (lambda: grkan(jnp.ones((4, 64)), jnp.ones((0, 6)), jnp.ones((0, 4)), groups=0), r"groups must be a positive"),
        (lambda: grkan_bwd(jnp.ones((4, 64)), jnp.ones((8, 6)), jnp.ones((8, 4)), jnp.ones((4, 8))), r"dy"),
        (lambda: BlockConfig(rows=0), r"rows"),
    ],
)
def test_errors_name_the_bad_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()
