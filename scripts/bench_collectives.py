"""The worker-axis mean under vmap: ``jax.lax.pmean`` against ``jaxopt_lab.distributed.collectives``, in one run.

    python scripts/bench_collectives.py [--mode vmap|shard_map] [--workers 8] [--batch 2] [--steps 5] [--repeats 11]

Two tables, every variant timed in the same rounds (the programs take turns
within each round, so machine load hits all alike); medians, and ratios of
medians to the row named as baseline:

1. the bare mean of a (W, 512, 2048) float32 array over the vmapped worker
   axis, W = 2 and 8: ``jax.vmap(lambda x: jax.lax.pmean(x, "w"))`` against
   the same with ``collectives.pmean``;
2. per-worker training steps of the nano GPT (2 blocks, width 128, context 64,
   vocab 256) on W workers mapped by ``WorkerRunner(W, mode)``, params and
   state donated: plain AdamW (no collective; the floor), data parallelism
   (``data_parallel(adamw)``, a mean every step) and DiLoCo's synchronizing
   step (``sync=True``: the outer gradient's mean and the outer step). "lax"
   rows are the same code traced with the fast path switched off (every name
   sent to ``jax.lax``, i.e. the code before ``collectives`` existed).

With ``--mode shard_map`` the workers are split over the host devices (set
``XLA_FLAGS=--xla_force_host_platform_device_count=N``); with k > 1 per device
the vmapped ``"workers"`` part of ``("devices", "workers")`` takes the fast
path and ``"devices"`` stays an all-reduce.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.distributed import WorkerRunner, collectives, data_parallel, diloco
from jaxopt_lab.models.gpt import GPT


@contextlib.contextmanager
def lax_collectives():
    """Trace with every axis name sent to jax.lax (the code before the fast path)."""
    saved = collectives._mesh_axes
    collectives._mesh_axes = lambda: None
    try:
        yield
    finally:
        collectives._mesh_axes = saved


def timed_rounds(programs, repeats, steps, start):
    """``{name: [seconds per call]}``: each round runs every program ``steps`` times, chained, in turn."""
    states = {name: start(name) for name in programs}
    for name, fn in programs.items():
        states[name] = jax.block_until_ready(fn(states[name]))  # warm up
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, fn in programs.items():
            state = states[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                state = fn(state)
            states[name] = jax.block_until_ready(state)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def table(times, base, note=""):
    b = statistics.median(times[base])
    print(f"| {'program':<44} | {'ms':>8} | {'/ ' + base[:18]:>21} |{note}")
    print(f"|{'-' * 46}|{'-' * 9}:|{'-' * 22}:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name:<44} | {1e3 * t:>8.3f} | {t / b:>20.2f}x |")
    print()


def bare_mean(repeats):
    for w in (2, 8):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((w, 512, 2048)).astype(np.float32))
        programs = {
            f"jax.lax.pmean, W={w}": jax.jit(jax.vmap(lambda a: jax.lax.pmean(a, "w"), axis_name="w")),
            f"collectives.pmean, W={w}": jax.jit(jax.vmap(lambda a: collectives.pmean(a, "w"), axis_name="w")),
        }
        got = [np.asarray(f(x)) for f in programs.values()]
        err = np.abs(got[0] - got[1]).max()
        times = timed_rounds({k: (lambda s, f=f: f(x)) for k, f in programs.items()}, repeats, 1, lambda _: None)
        table(times, f"jax.lax.pmean, W={w}", f" max |difference| {err:.1e}")


def training_steps(args):
    w = args.workers
    runner = WorkerRunner(w, args.mode)
    model = GPT.from_preset("nano", vocab_size=256, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = np.random.default_rng(0).integers(0, 256, (w, args.batch, model.context + 1)).astype(np.int32)
    x, y = runner.put((tokens[..., :-1], tokens[..., 1:]))

    def make_step(tx, **update_kwargs):
        def step(params, opt_state, x, y):
            def loss(p):
                logits = nnx.merge(graphdef, p)(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params, **update_kwargs)
            return optax.apply_updates(params, updates), opt_state

        return step

    inner = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    axis = runner.axis_name
    ddp = data_parallel(inner, axis_name=axis)
    dil = diloco(inner, sync_every=500, axis_name=axis)
    txs = {"plain AdamW": (inner, {}), "DDP": (ddp, {}), "DiLoCo sync step": (dil, {"sync": True})}

    def start(tx):
        return runner.put(runner.replicate((params, jax.tree.map(np.asarray, tx.init(params)))))

    programs, txof = {}, {}
    for name, (tx, kw) in txs.items():
        for label, ctx in (("lax", lax_collectives), ("collectives", contextlib.nullcontext)):
            if name == "plain AdamW" and label == "lax":
                continue
            row = name if name == "plain AdamW" else f"{name}, {label}"
            with ctx():
                compiled = runner.map(make_step(tx, **kw), donate_argnums=(0, 1)).lower(*start(tx), x, y).compile()
            programs[row] = lambda s, c=compiled: c(*s, x, y)
            txof[row] = tx
    # the same numbers both ways (one step from the same start)
    for name in ("DDP", "DiLoCo sync step"):
        a, b = (runner.get(programs[f"{name}, {lab}"](start(txof[f"{name}, {lab}"]))[0]) for lab in ("lax", "collectives"))
        err = max(float(np.abs(u - v).max()) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        print(f"{name}: max |params(lax) - params(collectives)| after one step = {err:.1e}")
    times = timed_rounds(programs, args.repeats, args.steps, lambda name: start(txof[name]))
    dev = jax.devices()[0]
    print(f"\n{dev.device_kind} x{jax.device_count()} ({dev.platform}), jax {jax.__version__}, mode {args.mode}, "
          f"W={w} ({runner.workers_per_device} per device), nano GPT, {args.batch}x{model.context} tokens per worker, "
          f"medians of {args.repeats} rounds of {args.steps} chained steps, params and state donated\n")
    table(times, "plain AdamW")
    for name in ("DDP", "DiLoCo sync step"):
        lax_t, ours = (statistics.median(times[f"{name}, {lab}"]) for lab in ("lax", "collectives"))
        print(f"{name}: lax / collectives = {lax_t / ours:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="vmap", choices=["vmap", "shard_map"])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="sequences per worker per step")
    ap.add_argument("--steps", type=int, default=5, help="chained steps per timed round")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--skip-bare", action="store_true", help="only the training steps")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"{dev.device_kind} x{jax.device_count()} ({dev.platform}), jax {jax.__version__}\n")
    if not args.skip_bare:
        bare_mean(args.repeats)
    training_steps(args)


if __name__ == "__main__":
    main()
