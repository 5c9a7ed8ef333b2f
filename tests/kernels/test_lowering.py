"""Every kernel LOWERS for the accelerators on this CPU-only machine, without running.

``jax.export`` with ``platforms=["cuda"]`` runs the Pallas Triton lowering
(block shapes must be powers of two, the kernel body must lower to Triton IR)
and with ``platforms=["tpu"]`` the Mosaic TPU lowering (the last two block dims
divisible by (8, 128) or equal to the array's). Through ``impl=None`` (auto),
so this also checks that the dispatcher puts the Pallas kernel, not the
reference, in the program lowered for each accelerator.

To add a kernel, add its entries to ``KERNELS``.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxopt_lab.kernels import grkan, grkan_bwd
from jaxopt_lab.kernels.lowrank_step import lowrank_step
from jaxopt_lab.kernels._pallas_compat import TRITON_CUSTOM_CALL_TARGETS, export


def spec(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _grkan_args(n, d, dtype, backward):
    args = [spec(n, d, dtype=dtype), spec(8, 6), spec(8, 4)]
    return args + [spec(n, d, dtype=dtype)] if backward else args


# name: (function, abstract arguments)
KERNELS = {
    # KAT-B's hidden activation: 128 images x 197 tokens x 3072 channels, bf16
    "grkan_fwd_kat_b": (lambda x, a, b: grkan(x, a, b), _grkan_args(128 * 197, 3072, jnp.bfloat16, False)),
    "grkan_bwd_kat_b": (lambda x, a, b, dy: grkan_bwd(x, a, b, dy), _grkan_args(128 * 197, 3072, jnp.bfloat16, True)),
    # ragged rows, D = 72 (not a multiple of 128 nor a power of two)
    "grkan_fwd_ragged": (lambda x, a, b: grkan(x, a, b), _grkan_args(100, 72, jnp.float32, False)),
    "grkan_bwd_ragged": (lambda x, a, b, dy: grkan_bwd(x, a, b, dy), _grkan_args(100, 72, jnp.float32, True)),
    # through the custom_vjp: forward and backward kernels in one program
    "grkan_grad": (
        lambda x, a, b: jax.grad(lambda x, a, b: jnp.sum(grkan(x, a, b)), argnums=(0, 1, 2))(x, a, b),
        _grkan_args(3 * 41, 256, jnp.float32, False),
    ),
    # the fused Fira step at the benchmark's shape, gradient read as stored (4096 x 4096, bf16) and transposed
    "fira_step_4096": (
        lambda g, p, m, v, n: lowrank_step(g, p, m, v, n, residual=True),
        [spec(4096, 4096, dtype=jnp.bfloat16), spec(4096, 128), spec(128, 4096), spec(128, 4096), spec()],
    ),
    "galore_step_transposed_ragged": (
        lambda g, p, m, v, n: lowrank_step(g, p, m, v, n, transpose=True),
        [spec(300, 70), spec(70, 12), spec(12, 300), spec(12, 300), spec()],
    ),
}

EXPECTED_CALL = {"cuda": TRITON_CUSTOM_CALL_TARGETS, "tpu": ("tpu_custom_call",)}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_lowers_for_accelerator(name, platform):
    fn, args = KERNELS[name]
    exported = export(fn, platform, *args)
    assert exported.platforms == (platform,)
    text = exported.mlir_module()
    assert any(target in text for target in EXPECTED_CALL[platform]), f"no Pallas kernel in the {platform} program"
