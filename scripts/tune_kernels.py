"""Search the block sizes of the Pallas kernels on the device, per shape class; print the best as data.

    python scripts/tune_kernels.py [--budget 40] [--out tuned.json]

For each shape class (GR-KAN: KAT-B's 768- and 3072-channel activations;
the fused low-rank step: a 4096 x 4096 matrix at rank 128) it times every
block configuration of a small grid (median of ``--repeats`` calls after a
warm-up), within a time budget per class, checks each result against the
reference, and prints the fastest next to the current default, as the
``TUNED`` entries that ``jaxopt_lab.kernels`` reads. Needs a GPU (Triton
lowering); on a CPU it only checks that the script runs (``--smoke``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp

from jaxopt_lab.kernels import devices
from jaxopt_lab.kernels.grkan import TRITON_CONFIG, BlockConfig, grkan_bwd_pallas, grkan_fwd_pallas
from jaxopt_lab.kernels.grkan_reference import grkan_reference, grkan_reference_bwd
from jaxopt_lab.kernels.lowrank_step import TRITON_STEP_CONFIG, StepConfig, lowrank_apply_pallas, lowrank_project_pallas
from jaxopt_lab.kernels.lowrank_step_reference import apply_reference, project_reference


def _diff(got, want) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(g, jnp.float32) - jnp.asarray(w, jnp.float32))))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def search(name, candidates, make, args, reference, budget, repeats, tol):
    """Time ``make(cfg)(*args)`` for each cfg until ``budget`` seconds pass; return rows sorted by time."""
    want = reference(*args)
    rows, start = [], time.perf_counter()
    for cfg in candidates:
        if time.perf_counter() - start > budget:
            print(f"  [{name}] budget spent after {len(rows)} of {len(candidates)} configurations")
            break
        try:
            fn = jax.jit(make(cfg))
            diff = _diff(fn(*args), want)
            t = devices.time_fn(fn, *args, repeats=repeats, warmup=1)
        except Exception as e:  # a configuration the lowering refuses (e.g. too much shared memory)
            print(f"  [{name}] {cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        ok = diff <= tol
        rows.append((t, cfg, diff, ok))
        print(f"  [{name}] {cfg}: {t * 1e3:.3f} ms  max|diff| {diff:.2e}{'' if ok else '  WRONG'}")
        sys.stdout.flush()
    return sorted((r for r in rows if r[3]), key=lambda r: r[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per (kernel, shape class)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64, help="KAT-B batch (x 197 tokens)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two configurations, interpret mode (CPU)")
    args = ap.parse_args(argv)
    interpret = args.smoke or jax.devices()[0].platform == "cpu"
    print(f"device: {jax.devices()[0].device_kind}, JAX {jax.__version__}{' (interpret mode)' if interpret else ''}")
    results = {}
    keys = jax.random.split(jax.random.key(0), 8)
    a = 0.5 * jax.random.normal(keys[2], (8, 6))
    b = 0.5 * jax.random.normal(keys[3], (8, 4))

    fwd_grid = [BlockConfig(rows=r, max_cols=c, num_warps=w)
                for r, c, w in itertools.product((32, 64, 128), (128, 256, 512), (4, 8))]
    bwd_grid = [BlockConfig(bwd_rows=r, bwd_tiles=t, max_cols=c, num_warps=w)
                for r, t, c, w in itertools.product((16, 32), (4, 8, 16), (64, 128, 256), (4, 8))]
    shapes = {"d<=1024": (args.batch, 197, 768), "d>1024": (args.batch, 197, 3072)}
    if args.smoke:
        fwd_grid, bwd_grid, shapes = fwd_grid[:2], bwd_grid[:2], {"smoke": (2, 33, 256)}
    for cls, shape in shapes.items():
        for dtype in (jnp.bfloat16, jnp.float32):
            x = (1.5 * jax.random.normal(keys[0], shape)).astype(dtype)
            dy = jax.random.normal(keys[1], shape).astype(dtype)
            tol = 0.05 if dtype == jnp.bfloat16 else 1e-3
            tag = f"grkan_fwd {cls} {jnp.dtype(dtype).name}"
            fwd = search(tag, fwd_grid,
                         lambda cfg: functools.partial(grkan_fwd_pallas, config=cfg, interpret=interpret),
                         (x, a, b), grkan_reference, args.budget, args.repeats, tol)
            tag_b = f"grkan_bwd {cls} {jnp.dtype(dtype).name}"
            # dx only is compared (the coefficient sums are reductions over millions of terms)
            bwd = search(tag_b, bwd_grid,
                         lambda cfg: lambda *xs, cfg=cfg: grkan_bwd_pallas(*xs, config=cfg, interpret=interpret)[0],
                         (x, a, b, dy), lambda *xs: grkan_reference_bwd(*xs)[0], args.budget, args.repeats, tol)
            for label, rows, default in ((tag, fwd, TRITON_CONFIG), (tag_b, bwd, TRITON_CONFIG)):
                if rows:
                    t, cfg, _, _ = rows[0]
                    results[label] = {"config": cfg.__dict__, "ms": t * 1e3, "default": default.__dict__}
                    print(f"BEST {label}: {cfg} {t * 1e3:.3f} ms")

    d, k, r = (256, 256, 32) if args.smoke else (4096, 4096, 128)
    p, _ = jnp.linalg.qr(jax.random.normal(keys[4], (d, r)))
    m = jax.random.normal(keys[5], (r, k))
    s = jax.random.uniform(keys[6], (k,))
    step_grid = [StepConfig(cols=c, chunk=h, num_warps=w) for c, h, w in itertools.product((32, 64, 128), (32, 64, 128), (4, 8))]
    if args.smoke:
        step_grid = step_grid[:2]
    for dtype in (jnp.float32, jnp.bfloat16):
        g = jax.random.normal(keys[7], (d, k)).astype(dtype)
        name = jnp.dtype(dtype).name
        tol = 0.05 * (d ** 0.5) if dtype == jnp.bfloat16 else 1e-2
        proj = search(f"lowrank_project {name}", step_grid,
                      lambda cfg: lambda g, p, cfg=cfg: lowrank_project_pallas(g, p, transpose=False, config=cfg, interpret=interpret),
                      (g, p), functools.partial(project_reference, transpose=False), args.budget, args.repeats, tol)
        app = search(f"lowrank_apply {name}", step_grid,
                     lambda cfg: lambda g, p, m, s, cfg=cfg: lowrank_apply_pallas(g, p, m, s, transpose=False, config=cfg, interpret=interpret),
                     (g, p, m, s), lambda g, p, m, s: apply_reference(g, p, m, s, transpose=False), args.budget, args.repeats, tol)
        for label, rows in ((f"lowrank_project {name}", proj), (f"lowrank_apply {name}", app)):
            if rows:
                t, cfg, _, _ = rows[0]
                results[label] = {"config": cfg.__dict__, "ms": t * 1e3, "default": TRITON_STEP_CONFIG.__dict__}
                print(f"BEST {label}: {cfg} {t * 1e3:.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
