"""Which implementation of a kernel runs: Pallas on GPU and TPU, the reference elsewhere.

Every kernel in :mod:`jaxopt_lab.kernels` takes ``impl``:

- ``None`` (auto): the Pallas kernel on GPU (Triton lowering) and TPU (Mosaic),
  the pure-``jnp`` reference on any other platform (CPU);
- ``"pallas"``: the Pallas kernel, Triton on GPU and Mosaic on TPU (lowering it
  for CPU fails: Pallas runs on CPU only in interpret mode);
- ``"interpret"``: the Pallas kernel in interpret mode, on any platform (tests);
- ``"reference"``: the pure-``jnp`` reference, differentiated by JAX;
- ``"mosaic_gpu"``: the Pallas kernel on Mosaic GPU, Triton's successor (JAX >=
  0.11; GPU only), where a kernel has one (GR-KAN).

The choice between GPU, TPU and the fallback is made when the program is
*lowered*, not when it is traced, through :func:`jax.lax.platform_dependent`:
so ``jax.export`` on a CPU machine with ``platforms=["cuda"]`` (or ``["tpu"]``)
lowers the real kernel, and a program lowered for several platforms carries
each one's branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

IMPLS = (None, "pallas", "interpret", "reference", "mosaic_gpu")


def check_impl(impl: Any) -> None:
    """Raises a ValueError naming the choices if ``impl`` is not one of :data:`IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} (None = auto), got {impl!r}")


def dispatch(
    impl: str | None,
    *args: Any,
    reference: Callable[..., Any],
    gpu: Callable[..., Any],
    tpu: Callable[..., Any],
    interpret: Callable[..., Any],
    mosaic_gpu: Callable[..., Any] | None = None,
) -> Any:
    """Calls the implementation that ``impl`` names on ``args``.

    Args:
      impl: one of :data:`IMPLS`.
      *args: arrays passed to whichever implementation runs (all branches of a
        ``platform_dependent`` must return the same shapes and dtypes).
      reference: the pure-``jnp`` function.
      gpu: the Pallas kernel with the Triton lowering (CUDA and ROCm).
      tpu: the Pallas kernel with the Mosaic TPU lowering.
      interpret: the Pallas kernel in interpret mode.
      mosaic_gpu: the Pallas kernel with the Mosaic GPU lowering, or None if there is none.
    """
    check_impl(impl)
    if impl == "mosaic_gpu":
        if mosaic_gpu is None:
            raise ValueError("impl='mosaic_gpu': this kernel has no Mosaic GPU version yet (use 'pallas': Triton on GPU)")
        return mosaic_gpu(*args)
    if impl == "reference":
        return reference(*args)
    if impl == "interpret":
        return interpret(*args)
    default = reference if impl is None else gpu
    return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=tpu, default=default)


def describe(impl: str | None, platform: str | None = None) -> str:
    """What ``impl`` runs on ``platform`` (default: JAX's default backend), in words."""
    check_impl(impl)
    platform = platform or jax.default_backend()
    if impl == "reference":
        return "reference (XLA)"
    if impl == "interpret":
        return "Pallas interpret mode"
    if impl == "mosaic_gpu":
        return "Pallas (Mosaic GPU)"
    if platform in ("gpu", "cuda", "rocm"):
        return "Pallas (Triton lowering)"
    if platform == "tpu":
        return "Pallas (Mosaic TPU)"
    return "reference (XLA)" if impl is None else f"Pallas (cannot run on {platform})"
