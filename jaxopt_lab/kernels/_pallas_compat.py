"""The Pallas APIs that moved between the JAX versions we support, wrapped once.

Kernels import Pallas backend pieces from here and nowhere else, so a JAX
upgrade that renames a module or a class is fixed in this one file. Checked
against JAX 0.10.2 (run, on CPU) and the 0.11.0/0.11.1 sources (read, not run:
no GPU machine and no JAX 0.11 for Python 3.11 were at hand):

- the Triton backend module: ``jax.experimental.pallas.triton`` (both), named
  ``jax.experimental.pallas.gpu`` in older JAX;
- compiler-parameter classes: ``CompilerParams`` in each backend module (both),
  ``TritonCompilerParams`` / ``TPUCompilerParams`` / ``GPUCompilerParams`` in
  older JAX;
- masked loads and stores (the Triton lowering does not clip blocks that run
  past the end of an array): ``pallas.triton.load/store`` (both),
  ``pallas.load/store`` with an index in older JAX;
- the custom-call target a Triton kernel lowers to: ``__gpu$xla.gpu.triton``
  (both; 0.11 has a switch to ``triton_kernel_call_ffi``), which
  ``jax.export`` refuses unless its safety check is disabled;
- which GPU lowering ``pallas_call`` picks with no compiler parameters: Mosaic
  GPU (``jax_pallas_use_mosaic_gpu`` defaults to True in both). Our kernels
  always pass Triton parameters on GPU, so the choice does not depend on it;
- lowering a Triton kernel on a machine without a GPU: 0.10 assumed compute
  capability 9.0; 0.11 reads the target GPU from the abstract mesh's
  ``AbstractDevice`` and raises without one, so :func:`export` names one;
- the Triton backend of ``pallas_call`` is deprecated in 0.11 (a
  ``DeprecationWarning`` at lowering; Mosaic GPU is its successor); a
  Mosaic GPU kernel is written with ``plgpu.kernel`` + ``plgpu.emit_pipeline``
  (0.11 no longer registers a Mosaic GPU lowering for ``pallas_call``), and
  lowers on 0.11 only (:func:`mosaic_gpu_available`);
- ``jax.enable_x64`` (a context manager in both), ``jax.experimental.enable_x64``
  in older JAX.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import jax
from jax.experimental import pallas as pl


def _import(*names: str) -> Any:
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


pltriton = _import("jax.experimental.pallas.triton", "jax.experimental.pallas.gpu")
pltpu = _import("jax.experimental.pallas.tpu")
plmgpu = _import("jax.experimental.pallas.mosaic_gpu")

# Custom-call targets of Pallas/Triton kernels across jaxlib versions. They are
# not on jax.export's list of targets guaranteed stable, so exporting a Triton
# kernel needs ``disabled_checks`` (see :func:`export_disabled_checks`).
TRITON_CUSTOM_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def _first_attr(module: Any, *names: str) -> Any:
    if module is None:
        raise NotImplementedError(f"this JAX has none of {names}: its Pallas backend module is missing")
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise NotImplementedError(f"{module.__name__} has none of {names} (JAX {jax.__version__})")


def triton_compiler_params(*, num_warps: int | None = None, num_stages: int | None = None) -> Any:
    """Compiler parameters that select the Triton lowering of ``pallas_call`` on GPU."""
    cls = _first_attr(pltriton, "CompilerParams", "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(*, dimension_semantics: tuple[str, ...], vmem_limit_bytes: int | None = None) -> Any:
    """Mosaic TPU compiler parameters (``"parallel"`` / ``"arbitrary"`` per grid axis)."""
    cls = _first_attr(pltpu, "CompilerParams", "TPUCompilerParams")
    kwargs: dict[str, Any] = {"dimension_semantics": tuple(dimension_semantics)}
    if vmem_limit_bytes is not None:
        kwargs["vmem_limit_bytes"] = int(vmem_limit_bytes)
    return cls(**kwargs)


def mosaic_gpu_available() -> bool:
    """Whether this JAX's Pallas Mosaic GPU backend can lower our Mosaic GPU kernels (JAX >= 0.11).

    0.10 ships the backend, but its ``plgpu.load`` needs an index, and a
    coefficient row cannot be loaded in the WGMMA column layout there
    ("Tiling ... does not apply to shape (1, 128)"): checked by export on CPU.
    """
    version = tuple(int(p) for p in jax.__version__.split(".")[:2] if p.isdigit())
    return plmgpu is not None and hasattr(plmgpu, "kernel") and hasattr(plmgpu, "emit_pipeline") and version >= (0, 11)


def triton_load(ref: Any, *, mask: jax.Array | None = None, other: Any = None) -> jax.Array:
    """``ref[...]`` with lanes where ``mask`` is False read as ``other`` (Triton only)."""
    if pltriton is not None and hasattr(pltriton, "load"):
        return pltriton.load(ref, mask=mask, other=other)
    return pl.load(ref, (slice(None),) * len(ref.shape), mask=mask, other=other)  # older JAX


def triton_store(ref: Any, value: jax.Array, *, mask: jax.Array | None = None) -> None:
    """``ref[...] = value`` where ``mask`` is True (Triton only)."""
    if pltriton is not None and hasattr(pltriton, "store"):
        pltriton.store(ref, value, mask=mask)
    else:  # older JAX
        pl.store(ref, (slice(None),) * len(ref.shape), value, mask=mask)


def export_disabled_checks(platforms: Any) -> list[Any]:
    """The ``jax.export`` safety checks to disable to export our kernels for ``platforms``.

    Pallas TPU (``tpu_custom_call``) and Mosaic GPU kernels lower to custom calls
    that ``jax.export`` already trusts; Triton kernels do not.
    """
    if isinstance(platforms, str):
        platforms = (platforms,)
    if not any(p in ("cuda", "rocm", "gpu") for p in platforms):
        return []
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CUSTOM_CALL_TARGETS]


def export(fn: Any, platforms: Any, *args: Any, gpu_kind: str = "NVIDIA H100") -> Any:
    """``jax.export.export(jax.jit(fn), platforms=...)(*args)``: lowers (and for
    Triton and Mosaic, compiles the kernel's lowering to MLIR) for ``platforms``
    on any machine, without running anything. Without a local GPU, a CUDA
    lowering targets ``gpu_kind`` (a device kind as JAX reports it)."""
    if isinstance(platforms, str):
        platforms = (platforms,)
    exported = jax.export.export(
        jax.jit(fn), platforms=tuple(platforms), disabled_checks=export_disabled_checks(platforms)
    )
    with _target_gpu(platforms, gpu_kind):
        return exported(*args)


def _target_gpu(platforms: tuple[str, ...], gpu_kind: str) -> Any:
    """An abstract mesh naming the GPU to lower for, where there is none to ask (JAX >= 0.11 needs it)."""
    if "cuda" not in platforms or jax.default_backend() == "gpu" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()  # a GPU to ask, or an older JAX that assumes one
    device = jax.sharding.AbstractDevice(gpu_kind, 1, "cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("_export",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def enable_x64(enabled: bool = True) -> Any:
    """Context manager turning 64-bit types on (or off) within its block."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(enabled)
    from jax.experimental import enable_x64 as _enable_x64, disable_x64 as _disable_x64  # older JAX

    return _enable_x64() if enabled else _disable_x64()
