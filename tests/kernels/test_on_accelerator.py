"""The compiled Pallas kernels on a real GPU (Triton) or TPU (Mosaic) against the reference.

Skipped on CPU-only machines; meant for the GPU machine:
``python -m pytest tests/kernels/test_on_accelerator.py -q``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.kernels import grkan, grkan_bwd, grkan_reference

pytestmark = pytest.mark.skipif(
    jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU (the Pallas kernels run compiled there)"
)

# KAT-S-like hidden activation (ragged: 197 tokens), and a small ragged one with D not a power of two
SHAPES = [((16, 197, 1536), jnp.bfloat16), ((16, 197, 1536), jnp.float32), ((37, 72), jnp.float32)]


def inputs(shape, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = (1.5 * jax.random.normal(k[0], shape)).astype(dtype)
    a = 0.5 * jax.random.normal(k[1], (8, 6))
    b = 0.5 * jax.random.normal(k[2], (8, 4))
    dy = jax.random.normal(k[3], shape).astype(dtype)
    return x, a, b, dy


@functools.partial(jax.jit, static_argnames="impl")
def forward_and_grads(x, a, b, dy, impl):
    y, vjp = jax.vjp(lambda x, a, b: grkan(x, a, b, impl=impl), x, a, b)
    return y, *vjp(dy)


@pytest.mark.parametrize("shape, dtype", SHAPES)
def test_pallas_matches_reference_on_device(shape, dtype):
    x, a, b, dy = inputs(shape, dtype)
    got = forward_and_grads(x, a, b, dy, "pallas")
    want = forward_and_grads(x.astype(jnp.float32), a, b, dy.astype(jnp.float32), "reference")
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for name, g, w in zip(("y", "dx", "da", "db"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        coef = name in ("da", "db")  # sums over ~10^6 terms: compare relative to their size
        np.testing.assert_allclose(g, w, rtol=1e-3 if coef else tol, atol=(1e-4 if coef else tol) * np.abs(w).max(),
                                   err_msg=name)


def test_backward_is_deterministic_on_device():
    x, a, b, dy = inputs((64, 197, 768), jnp.bfloat16, seed=1)
    run = jax.jit(lambda *args: grkan_bwd(*args, impl="pallas"))
    first = [np.asarray(v) for v in run(x, a, b, dy)]
    for _ in range(3):
        for u, v in zip(first, run(x, a, b, dy)):
            assert np.array_equal(u, np.asarray(v))


def test_auto_impl_uses_the_kernel_on_device():
    x, a, b, _ = inputs((8, 197, 768), jnp.float32, seed=2)
    text = jax.jit(lambda x, a, b: grkan(x, a, b)).lower(x, a, b).as_text()
    assert "triton" in text or "tpu_custom_call" in text or "mosaic" in text
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda x, a, b: grkan(x, a, b))(x, a, b)),
        np.asarray(jax.jit(grkan_reference)(x, a, b)), rtol=1e-5, atol=1e-5,
    )
