"""How the plain vmapped per-worker step scales with the number of workers W (nano GPT, AdamW).

    python scripts/bench_worker_scaling.py [--workers 1 2 4 8 16 32 64] [--batch 2] [--steps 3] [--repeats 5]
        [--hlo-dir DIR] [--variant plain|donated|...]

For each W, the same per-worker step (the nano GPT's loss, its gradient, AdamW,
``optax.apply_updates``; the state donated, as the trainer does) is mapped by
``WorkerRunner(W, "vmap")`` and timed: median over ``--repeats`` of ``--steps``
chained steps, waited for. The baseline, measured in the same run, is the same
step jitted for one worker without a worker axis; the table gives the time per
worker-step and its ratio to that baseline, so a flat column is perfect
scaling. All W take turns within each repeat, so machine load hits all alike.

Beside the times, from the compiled program of each W: XLA's temporary buffer
(``memory_analysis().temp_size_in_bytes``), and the count and bytes of the
``copy``/``transpose`` instructions and the ``dot`` instructions with a batch
dimension in the optimized HLO (what vmap turned the matmuls into); with
``--hlo-dir`` the HLO text of each is written there. Also the minor page faults
per step (``getrusage``): memory the kernel had to map and zero for the step.
``--malloc ab`` times each program under two glibc allocator settings, taking
turns (see ``set_malloc``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import resource
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.distributed import WorkerRunner
from jaxopt_lab.models.gpt import GPT
from bench_workers import make_step  # scripts/ is on sys.path when run as a script

_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def hlo_stats(text: str) -> dict[str, float]:
    """Counts and output bytes of copies/transposes and batched dots in optimized HLO text."""
    out = {"copies": 0, "copy_mb": 0.0, "batched_dots": 0, "dots": 0}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\][^ ]* (\w+)\(", line)
        if not m:
            continue
        dtype, dims, op = m.groups()
        size = np.prod([int(d) for d in dims.split(",") if d]) * _DTYPE_BYTES.get(dtype, 4)
        if op in ("copy", "transpose"):
            out["copies"] += 1
            out["copy_mb"] += size / 1e6
        elif op == "dot":
            out["dots"] += 1
            if "lhs_batch_dims" in line:
                out["batched_dots"] += 1
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def set_malloc(keep: bool) -> None:
    """glibc: ``keep`` serves every allocation from the heap and keeps freed memory (thresholds at
    4 GiB); else glibc's own behaviour at its ceiling: blocks of 32 MiB or more are mmapped fresh
    and unmapped on free (the dynamic threshold never rises past 32 MiB)."""
    libc = ctypes.CDLL("libc.so.6")
    mmap, trim = (4 << 30, 4 << 30) if keep else (32 << 20, 64 << 20)
    if not (libc.mallopt(M_MMAP_THRESHOLD, mmap) and libc.mallopt(M_TRIM_THRESHOLD, trim)):
        raise SystemExit("mallopt refused the thresholds")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--batch", type=int, default=2, help="sequences of 64 tokens per worker per step")
    ap.add_argument("--steps", type=int, default=3, help="chained steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hlo-dir", default=None)
    ap.add_argument("--malloc", choices=["default", "ab"], default="default",
                    help="ab: time every program twice per repeat, with glibc's mmap/trim thresholds at their "
                         "ceiling (32/64 MiB) and raised to 4 GiB (see set_malloc)")
    args = ap.parse_args(argv)

    model = GPT.from_preset("nano", vocab_size=256, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ctx = model.context
    tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)

    step = make_step(graphdef, tx)  # the same per-worker step as bench_workers.py

    rng = np.random.default_rng(0)
    programs = {}  # label: (fn, workers, state, x, y)
    single_tokens = rng.integers(0, 256, (args.batch, ctx + 1)).astype(np.int32)
    single = jax.jit(step, donate_argnums=(0, 1))
    programs["single (no worker axis)"] = [single, 1, (params, tx.init(params)),
                                           single_tokens[:, :-1], single_tokens[:, 1:]]
    for w in args.workers:
        runner = WorkerRunner(w, "vmap")
        tokens = rng.integers(0, 256, (w, args.batch, ctx + 1)).astype(np.int32)
        x, y = runner.put((tokens[..., :-1], tokens[..., 1:]))
        state = runner.put(runner.replicate((params, jax.tree.map(np.asarray, tx.init(params)))))
        programs[f"vmap W={w}"] = [runner.map(step, donate_argnums=(0, 1)), w, state, x, y]

    info = {}
    for label, entry in programs.items():
        fn, w, state, x, y = entry
        compiled = fn.lower(*state, x, y).compile()
        mem = compiled.memory_analysis()
        text = compiled.as_text()
        info[label] = {"temp_mb": (mem.temp_size_in_bytes / 1e6) if mem is not None else float("nan"),
                       **hlo_stats(text)}
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, label.replace(" ", "_").replace("(", "").replace(")", "") + ".txt"),
                      "w") as f:
                f.write(text)
        entry[2] = jax.block_until_ready(fn(*state, x, y))  # compile and warm up

    modes = [False, True] if args.malloc == "ab" else [None]
    times = {(label, m): [] for label in programs for m in modes}
    faults = {(label, m): [] for label in programs for m in modes}
    for _ in range(args.repeats):
        for label, entry in programs.items():
            for mode in modes:
                if mode is not None:
                    set_malloc(mode)
                fn, w, state, x, y = entry
                f0, t0 = minor_faults(), time.perf_counter()
                for _ in range(args.steps):
                    state = fn(*state, x, y)
                entry[2] = state = jax.block_until_ready(state)
                times[(label, mode)].append((time.perf_counter() - t0) / args.steps)
                faults[(label, mode)].append((minor_faults() - f0) / args.steps)

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{jax.device_count()} ({dev.platform})  jax {jax.__version__}  "
          f"nano GPT, batch {args.batch} x {ctx} tokens per worker, AdamW, state donated; "
          f"median of {args.repeats} x {args.steps} steps; cpus {os.cpu_count()}  "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")
    base = statistics.median(times[("single (no worker axis)", modes[0])])
    page = resource.getpagesize()
    print("| program | malloc | W | ms / step | ms / worker-step | × single | page faults / step (MB) | XLA temp MB | "
          "copies+transposes (MB) | batched dots / dots |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, entry in programs.items():
        for mode in modes:
            w = entry[1]
            t = statistics.median(times[(label, mode)])
            fl = statistics.median(faults[(label, mode)])
            i = info[label]
            how = {None: "as started", False: "glibc ceiling", True: "heap kept"}[mode]
            print(f"| {label} | {how} | {w} | {1e3 * t:.2f} | {1e3 * t / w:.2f} | {t / w / base:.2f} | "
                  f"{fl:.0f} ({fl * page / 1e6:.1f}) | {i['temp_mb']:.1f} | "
                  f"{i['copies']} ({i['copy_mb']:.1f}) | {i['batched_dots']} / {i['dots']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
