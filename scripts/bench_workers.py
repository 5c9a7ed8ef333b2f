"""Worker-step throughput: W vmapped workers against a Python loop over the same W workers.

    python scripts/bench_workers.py [--workers 1 8 64] [--mode vmap|shard_map]

Each worker does one AdamW step of a 64-128-10 MLP on its own batch of 32
digits. The loop baseline calls one jitted single-worker step W times (the
floor a JAX user gets without a worker axis). Also times the same vmapped
step through DiLoCo with a synchronization every step (its worst case).
Prints worker-steps per second and the ratio, all measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_digits
from jaxopt_lab.distributed import WorkerRunner, diloco
from jaxopt_lab.models import MLP


def make_step(graphdef, tx):
    def step(params, opt_state, x, y):
        def loss(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def timeit(fn, repeats=20):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--mode", default="vmap", choices=["vmap", "shard_map"])
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    data = load_digits()
    model = MLP(64, (128,), 10, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  mode {args.mode}")
    print(f"{'workers':>7} | {'loop w-steps/s':>14} | {'mapped w-steps/s':>16} | {'mapped/loop':>11} | {'diloco(H=1) w-steps/s':>21}")
    for w in args.workers:
        xs, ys = zip(*(data.batch(i, args.batch, 0) for i in range(w)))
        x, y = np.stack(xs), np.stack(ys)
        tx = optax.adamw(1e-3)
        single = jax.jit(make_step(graphdef, tx))
        state0 = tx.init(params)

        def loop():
            outs = [single(params, state0, x[i], y[i]) for i in range(w)]
            return outs[-1]

        runner = WorkerRunner(w, args.mode)
        stacked = runner.put(runner.replicate((params, state0)))
        xw, yw = runner.put((x, y))
        mapped = runner.map(make_step(graphdef, tx))
        dtx = diloco(tx, sync_every=1, axis_name=runner.axis_name)
        dstate = runner.put(runner.replicate((params, dtx.init(params))))
        dmapped = runner.map(make_step(graphdef, dtx))
        t_loop = timeit(loop)
        t_vmap = timeit(lambda: mapped(*stacked, xw, yw))
        t_dil = timeit(lambda: dmapped(*dstate, xw, yw))
        print(f"{w:>7} | {w / t_loop:>14.0f} | {w / t_vmap:>16.0f} | {t_loop / t_vmap:>10.1f}x | {w / t_dil:>21.0f}")


if __name__ == "__main__":
    main()
