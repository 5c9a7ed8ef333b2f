"""Pallas kernels for the memory-bound parts, each beside a pure-``jnp`` reference.

Each kernel lives in its own module (``grkan.py``: KAT's group-rational
activation, FlashKAT-style backward) next to its reference
(``grkan_reference.py``), with a ``custom_vjp`` where it is differentiated and
an ``impl`` argument resolved by :mod:`jaxopt_lab.kernels.dispatch`: Pallas on
GPU (Triton lowering) and TPU (Mosaic), interpret mode for CPU tests, the
reference elsewhere. JAX APIs that moved between versions are wrapped once in
``_pallas_compat.py``; device ceilings and timing helpers for benchmarks are in
:mod:`jaxopt_lab.kernels.devices`.

Adding a kernel is adding ``<name>.py`` + ``<name>_reference.py`` here, their
exports below, a test module in ``tests/kernels/`` and a section in
``scripts/bench_kernels.py``.
"""

from jaxopt_lab.kernels.dispatch import IMPLS, check_impl, describe, dispatch
from jaxopt_lab.kernels.grkan import (
    TPU_CONFIG,
    TRITON_CONFIG,
    BlockConfig,
    grkan,
    grkan_bwd,
    grkan_bwd_pallas,
    grkan_fwd_pallas,
)
from jaxopt_lab.kernels.grkan_reference import grkan_reference, grkan_reference_bwd

__all__ = [
    "IMPLS",
    "TPU_CONFIG",
    "TRITON_CONFIG",
    "BlockConfig",
    "check_impl",
    "describe",
    "dispatch",
    "grkan",
    "grkan_bwd",
    "grkan_bwd_pallas",
    "grkan_fwd_pallas",
    "grkan_reference",
    "grkan_reference_bwd",
]
