"""Benchmark the Pallas kernels against their XLA-compiled references, in one run.

    python scripts/bench_kernels.py              # GPU / TPU: full shapes, compiled Pallas kernels
    python scripts/bench_kernels.py --small      # CPU smoke test: small shapes, interpret mode
    python scripts/bench_kernels.py --only grkan --grkan-shape 64,197,768 --dtype float32

For every kernel it prints the median time, the bandwidth achieved (the bytes
the operation must move, over the time) as a fraction of the device's HBM
bandwidth (datasheet numbers in :mod:`jaxopt_lab.kernels.devices`; ``n/a`` on
CPU and unknown devices), and the speedup over the XLA-compiled reference
(``ref/kernel``: above 1 the kernel is faster), plus the largest difference
from the reference as a sanity check. On a CPU the kernels can only run in
Pallas interpret mode: the timings are then meaningless, but every code path
runs; without ``--small`` or an explicit shape, a CPU run uses the small shapes.

Each kernel is one *section*: a function ``bench_<name>(ctx) -> list[Row]``
registered with ``@section("<name>")``. To add a kernel, add its section
below (and its shape flag to ``parse_args``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxopt_lab.kernels import describe, devices, grkan, grkan_bwd, grkan_reference
from jaxopt_lab.kernels.lowrank_step import lowrank_step
from jaxopt_lab.kernels.lowrank_step_reference import norm_growth_limiter


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    impl: str  # the kernel implementation to time: "pallas" on GPU/TPU, "interpret" on CPU
    small: bool  # small shapes (CPU smoke test)
    spec: devices.DeviceSpec | None
    dtype: jnp.dtype

    def time(self, fn: Callable, *args) -> float:
        return devices.time_fn(fn, *args, repeats=self.args.repeats, warmup=self.args.warmup, batch=self.args.batch)


@dataclasses.dataclass
class Row:
    kernel: str  # e.g. "grkan 128x197x3072 bf16"
    op: str  # "fwd", "bwd", ...
    seconds: float
    bytes: float  # what the operation must read + write at least
    baselines: dict[str, float]  # name -> seconds of an XLA version of the same op
    max_diff: float | None = None  # vs the reference
    flops: float | None = None


SECTIONS: dict[str, Callable[[Context], list[Row]]] = {}
MOSAIC_GPU_SECTIONS = ("grkan",)  # kernels with a Mosaic GPU version (impl="mosaic_gpu")


def section(name: str):
    def register(fn):
        SECTIONS[name] = fn
        return fn

    return register


def _max_diff(got, want) -> float:
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(g, jnp.float32) - jnp.asarray(w, jnp.float32))))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )


# ---------------------------------------------------------------- GR-KAN (KAT / FlashKAT)


@section("grkan")
def bench_grkan(ctx: Context) -> list[Row]:
    """KAT's group-rational activation at a KAT-B hidden shape (B x 197 tokens x 3072 channels, 8 groups)."""
    shape = tuple(int(s) for s in ctx.args.grkan_shape.split(",")) if ctx.args.grkan_shape else None
    shape = shape or ((2, 197, 256) if ctx.small else (128, 197, 3072))
    k = jax.random.split(jax.random.key(0), 4)
    x = (1.5 * jax.random.normal(k[0], shape)).astype(ctx.dtype)
    dy = jax.random.normal(k[1], shape).astype(ctx.dtype)
    a = 0.5 * jax.random.normal(k[2], (8, 6))
    b = 0.5 * jax.random.normal(k[3], (8, 4))
    impl = ctx.impl

    fwd = jax.jit(functools.partial(grkan, impl=impl))
    fwd_ref = jax.jit(functools.partial(grkan, impl="reference"))
    bwd = jax.jit(functools.partial(grkan_bwd, impl=impl))
    bwd_ref = jax.jit(functools.partial(grkan_bwd, impl="reference"))  # closed-form backward in jnp

    @jax.jit
    def bwd_autodiff(x, a, b, dy):  # plain autodiff of the jnp forward
        return jax.vjp(grkan_reference, x, a, b)[1](dy)

    def train(impl):  # forward + backward, as in training: loss = <grkan(x), dy>
        def loss(x, a, b):
            return jnp.vdot(grkan(x, a, b, impl=impl).astype(jnp.float32), dy.astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    train_kernel, train_ref = train(impl), train("reference")

    size, item = math.prod(shape), jnp.dtype(ctx.dtype).itemsize
    name = f"grkan {'x'.join(map(str, shape))} {jnp.dtype(ctx.dtype).name}"
    # Bytes: x (and dy) read, y (or dx) written, in the input dtype; the (G, 10) coefficients and the
    # backward's per-block partial sums are negligible. Elementwise float32 work, memory-bound: no
    # FLOP rate against the bf16 matmul peak is reported. max|diff| compares y, or dx.
    return [
        Row(name, "fwd", ctx.time(fwd, x, a, b), 2 * size * item,
            {"XLA ref": ctx.time(fwd_ref, x, a, b)}, _max_diff(fwd(x, a, b), fwd_ref(x, a, b))),
        Row(name, "bwd", ctx.time(bwd, x, a, b, dy), 3 * size * item,
            {"XLA ref": ctx.time(bwd_ref, x, a, b, dy), "autodiff": ctx.time(bwd_autodiff, x, a, b, dy)},
            _max_diff(bwd(x, a, b, dy)[0], bwd_ref(x, a, b, dy)[0])),
        Row(name, "fwd+bwd", ctx.time(train_kernel, x, a, b), 5 * size * item,
            {"autodiff": ctx.time(train_ref, x, a, b)},
            _max_diff(train_kernel(x, a, b)[0], train_ref(x, a, b)[0])),
    ]


# ---------------------------------------------------------------- fused low-rank step (GaLore / Fira)


def unfused_step(g, p, mu, nu, previous_norm, *, residual, b1=0.9, b2=0.999, eps=1e-6, scale=0.25, growth_limit=1.01):
    """The step as jaxopt_lab.lowrank.galore / fira compute it unfused: every intermediate a d x k array."""
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)  # float32 products, as the kernels
    g32 = g.astype(jnp.float32)
    low = mm(p.T, g32)
    mu = b1 * mu + (1 - b1) * low
    nu = b2 * nu + (1 - b2) * low * low
    n = mu / (jnp.sqrt(nu) + eps)
    update = scale * mm(p, n)
    if residual:
        phi = jnp.linalg.norm(n, axis=0) / (jnp.linalg.norm(low, axis=0) + 1e-8)
        s = (g32 - scale * mm(p, low)) * phi[None, :]
        norm = jnp.linalg.norm(s)
        limiter = norm_growth_limiter(norm, previous_norm, growth_limit)
        update, previous_norm = update + s / limiter, norm / limiter
    return update.astype(g.dtype), mu, nu, previous_norm


@section("lowrank_step")
def bench_lowrank_step(ctx: Context) -> list[Row]:
    """One fused GaLore / Fira step on a d x k gradient at rank r, fp32 and bf16 gradients."""
    d, k, r = (tuple(int(s) for s in ctx.args.lowrank_shape.split(",")) if ctx.args.lowrank_shape
               else ((256, 256, 32) if ctx.small else (4096, 4096, 128)))
    keys = jax.random.split(jax.random.key(1), 3)
    p, _ = jnp.linalg.qr(jax.random.normal(keys[0], (d, r)))
    mu = 0.1 * jax.random.normal(keys[1], (r, k))
    nu = jnp.abs(mu) ** 2 + 1e-3
    prev = jnp.asarray(1.0, jnp.float32)
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        g = jax.random.normal(keys[2], (d, k)).astype(dtype)
        item = jnp.dtype(dtype).itemsize
        for method, residual in (("galore", False), ("fira", True)):
            kernel = jax.jit(functools.partial(lowrank_step, scale=0.25, residual=residual, impl=ctx.impl))
            two_pass_xla = jax.jit(functools.partial(lowrank_step, scale=0.25, residual=residual, impl="reference"))
            unfused = jax.jit(functools.partial(unfused_step, residual=residual))
            # At least: G read once, the update written once (G's dtype), P and the r x k moments read and written.
            moved = 2 * d * k * item + 4 * (d * r + 4 * r * k)
            flops = 2 * (2 * d * r * k)  # PᵀG and P·M
            rows.append(Row(
                f"{method}_step {d}x{k} r{r} {jnp.dtype(dtype).name}", "step", ctx.time(kernel, g, p, mu, nu, prev),
                moved, {"XLA unfused": ctx.time(unfused, g, p, mu, nu, prev),
                        "XLA 2-pass": ctx.time(two_pass_xla, g, p, mu, nu, prev)},
                _max_diff(kernel(g, p, mu, nu, prev)[0], unfused(g, p, mu, nu, prev)[0]), flops))
    return rows


# ---------------------------------------------------------------- (next kernel's section here)


# ---------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small shapes (the default on CPU)")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--impl", choices=["pallas", "interpret", "mosaic_gpu"], default=None,
                        help="kernel implementation to time (default: pallas on GPU/TPU, interpret on CPU; "
                             "mosaic_gpu: the Mosaic GPU kernels, GR-KAN only)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=10, help="calls dispatched back to back per timed round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grkan-shape", default=None, help="B,T,D of the GR-KAN input (default 128,197,3072)")
    parser.add_argument("--lowrank-shape", default=None, help="d,k,r of the fused low-rank step (default 4096,4096,128)")
    return parser.parse_args(argv)


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = jax.devices()[0]
    accelerator = device.platform in ("gpu", "tpu")
    impl = args.impl or ("pallas" if accelerator else "interpret")
    explicit_shape = any(v for k, v in vars(args).items() if k.endswith("_shape"))
    small = args.small or (not accelerator and not explicit_shape)
    spec = devices.device_spec(device)
    print(f"device: {device.device_kind} ({device.platform}), JAX {jax.__version__}")
    print(f"kernels: {describe(impl, device.platform)}; baselines: XLA-compiled jnp references")
    print(f"ceilings: {spec.name}, HBM {spec.hbm_bytes_per_s / 1e12:.2f} TB/s, bf16 {spec.bf16_flops_per_s / 1e12:.0f} "
          "TFLOP/s" if spec else "ceilings: n/a (CPU or a device not in jaxopt_lab.kernels.devices.KNOWN_DEVICES)")
    if not accelerator:
        print("CPU: Pallas runs in interpret mode, so kernel timings say nothing about GPU/TPU speed"
              + (" (small shapes)" if small else ""))
    ctx = Context(args=args, impl=impl, small=small, spec=spec, dtype=jnp.dtype(args.dtype))

    header = (f"{'kernel':32s} {'op':8s} {'ms':>9s} {'GB/s':>8s} {'%HBM':>6s} {'%bf16':>6s}  "
              f"{'baseline ms (speedup = baseline/kernel)':44s} {'max|diff|':>9s}")
    print()
    print(header)
    print("-" * len(header))
    for name in args.only or list(SECTIONS):
        if impl == "mosaic_gpu" and name not in MOSAIC_GPU_SECTIONS:
            print(f"{name}: no Mosaic GPU kernel yet, skipped")
            continue
        for row in SECTIONS[name](ctx):
            bandwidth = row.bytes / row.seconds
            flop_rate = row.flops / row.seconds if row.flops else None
            base = "  ".join(f"{k} {_fmt_time(t).strip()} ({t / row.seconds:.2f}x)" for k, t in row.baselines.items())
            diff = f"{row.max_diff:9.2e}" if row.max_diff is not None else "        -"
            print(f"{row.kernel:32s} {row.op:8s} {_fmt_time(row.seconds)} {bandwidth / 1e9:8.1f} "
                  f"{devices.fraction(bandwidth, spec and spec.hbm_bytes_per_s):>6s} "
                  f"{devices.fraction(flop_rate, spec and spec.bf16_flops_per_s):>6s}  {base:44s} {diff}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
