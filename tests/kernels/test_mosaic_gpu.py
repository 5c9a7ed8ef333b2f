"""GR-KAN on Pallas's Mosaic GPU backend: lowered for CUDA on any machine (JAX >= 0.11), run on a GPU.

On CPU the kernels cannot run (Mosaic GPU has no interpret mode for their
pipelined stores in JAX 0.11), so correctness on data is checked where a GPU
is present (tests/kernels on the GPU machine: ``scripts/device_checks.sh``);
here they are lowered through ``jax.export(platforms=["cuda"])``, which runs
Mosaic GPU's layout inference and lowering to its MLIR dialect.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.kernels import _pallas_compat as compat
from jaxopt_lab.kernels import grkan_bwd, grkan_reference, grkan_reference_bwd
from jaxopt_lab.kernels.grkan_mosaic import grkan_bwd_mosaic, grkan_fwd_mosaic
from jaxopt_lab.kernels.lowrank_step import lowrank_project

needs_mosaic = pytest.mark.skipif(not compat.mosaic_gpu_available(), reason=f"needs JAX >= 0.11 (this is {jax.__version__})")


def _inputs(shape, dtype):
    k = jax.random.split(jax.random.key(0), 4)
    x = (1.5 * jax.random.normal(k[0], shape)).astype(dtype)
    a = 0.5 * jax.random.normal(k[1], (8, 6))
    b = 0.5 * jax.random.normal(k[2], (8, 4))
    return x, a, b, jax.random.normal(k[3], shape).astype(dtype)


@needs_mosaic
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_for_cuda(dtype):
    x, a, b, dy = _inputs((5, 200, 256), dtype)  # 1000 rows: the last row block ragged
    for fn, args in ((grkan_fwd_mosaic, (x, a, b)), (grkan_bwd_mosaic, (x, a, b, dy))):
        module = compat.export(fn, ["cuda"], *args).mlir_module()
        assert "mosaic_gpu" in module and "triton" not in module


@pytest.mark.skipif(jax.default_backend() != "gpu" or not compat.mosaic_gpu_available(), reason="needs a GPU and JAX >= 0.11")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matches_reference_on_gpu(dtype):
    x, a, b, dy = _inputs((5, 200, 768), dtype)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(jax.jit(grkan_fwd_mosaic)(x, a, b), np.float32),
                               np.asarray(grkan_reference(x, a, b), np.float32), rtol=tol, atol=tol)
    got = jax.jit(lambda *xs: grkan_bwd(*xs, impl="mosaic_gpu"))(x, a, b, dy)  # through the dispatcher
    want = grkan_reference_bwd(x, a, b, dy)
    for g, w in zip(got, want):
        w = np.asarray(w, np.float32)
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=tol, atol=tol * np.abs(w).max())


def test_bad_inputs_are_named():
    x, a, b, dy = _inputs((4, 200), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128, got 200"):
        grkan_fwd_mosaic(x, a, b)
    with pytest.raises(ValueError, match="no Mosaic GPU version"):
        lowrank_project(jnp.ones((8, 8)), jnp.ones((8, 2)), impl="mosaic_gpu")
