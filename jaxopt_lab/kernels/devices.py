"""Device ceilings and a timer, for reporting kernels as a fraction of what the chip can do.

``scripts/bench_kernels.py`` and ``notebooks/04_kernels.ipynb`` report each
kernel's achieved bandwidth (bytes it must move / time) as a fraction of the
device's HBM bandwidth, and its FLOP rate as a fraction of the dense bf16
peak. The table holds vendor datasheet numbers for the chips we expect;
unknown devices (and CPUs) report ``n/a``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet ceilings of one device (one JAX device: a GPU, or a TPU chip)."""

    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float  # dense (no sparsity)


_TB, _TF = 1e12, 1e12

# (substrings that must all appear in the lower-cased device_kind, spec); first match wins,
# so the more specific entries come first.
KNOWN_DEVICES: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    (("h200",), DeviceSpec("NVIDIA H200", 4.8 * _TB, 989 * _TF)),
    (("h100", "pcie"), DeviceSpec("NVIDIA H100 PCIe", 2.0 * _TB, 756 * _TF)),
    (("h100", "nvl"), DeviceSpec("NVIDIA H100 NVL", 3.9 * _TB, 835 * _TF)),
    (("h100",), DeviceSpec("NVIDIA H100 SXM", 3.35 * _TB, 989 * _TF)),
    (("a100", "pcie", "80gb"), DeviceSpec("NVIDIA A100 80GB PCIe", 1.935 * _TB, 312 * _TF)),
    (("a100", "80gb"), DeviceSpec("NVIDIA A100 80GB SXM", 2.039 * _TB, 312 * _TF)),
    (("a100",), DeviceSpec("NVIDIA A100 40GB", 1.555 * _TB, 312 * _TF)),
    (("l40s",), DeviceSpec("NVIDIA L40S", 0.864 * _TB, 362 * _TF)),
    (("l4",), DeviceSpec("NVIDIA L4", 0.3 * _TB, 121 * _TF)),
    (("a10",), DeviceSpec("NVIDIA A10", 0.6 * _TB, 125 * _TF)),
    (("t4",), DeviceSpec("NVIDIA T4 (fp16 peak)", 0.32 * _TB, 65 * _TF)),
    (("v100",), DeviceSpec("NVIDIA V100 (fp16 peak)", 0.9 * _TB, 125 * _TF)),
    (("tpu", "v6"), DeviceSpec("TPU v6e", 1.64 * _TB, 918 * _TF)),
    (("tpu", "v5", "lite"), DeviceSpec("TPU v5e", 0.819 * _TB, 197 * _TF)),
    (("tpu", "v5e"), DeviceSpec("TPU v5e", 0.819 * _TB, 197 * _TF)),
    (("tpu", "v5"), DeviceSpec("TPU v5p", 2.765 * _TB, 459 * _TF)),
    (("tpu", "v4"), DeviceSpec("TPU v4", 1.228 * _TB, 275 * _TF)),
)


def device_spec(device: Any = None) -> DeviceSpec | None:
    """The ceilings of ``device`` (default: the first JAX device), or None if unknown or a CPU."""
    device = device if device is not None else jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for keys, spec in KNOWN_DEVICES:
        if all(k in kind for k in keys):
            return spec
    return None


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 2, batch: int = 10) -> float:
    """Seconds per call of ``fn(*args)`` (a jitted function): the median over ``repeats`` rounds of
    ``batch`` calls dispatched back to back, waited for once, divided by ``batch``.

    Dispatching a batch before waiting lets the device run call i while the
    host dispatches call i + 1, so a short kernel is timed at its device
    throughput rather than at the host's per-call dispatch and sync cost
    (tens of microseconds on a GPU: as much as a 100 MB elementwise kernel
    takes there). ``batch=1`` times one call plus dispatch. Compile time is
    excluded by the warm-up.
    """
    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn(*args))
    batch = max(1, int(batch))
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(batch)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def fraction(achieved: float | None, ceiling: float | None) -> str:
    """``achieved / ceiling`` as a percentage, or ``n/a``."""
    if achieved is None or not ceiling:
        return "n/a"
    return f"{100.0 * achieved / ceiling:.1f}%"
