"""Step time and per-device memory against d, the devices one worker spans, for a fixed global batch.

    python scripts/bench_scale.py [--preset nano] [--global-batch 32] [--steps 5] [--repeats 5] [--layouts 8x1,4x2,2x4,1x8]

On 8 devices (8 forced host CPU devices unless XLA_FLAGS says otherwise), each
layout W x d runs DiLoCo (AdamW inner, H = 500) on the GPT preset with W
workers of d devices (``WorkerRunner(W, "shard_map", devices_per_worker=d)``;
8x1 is the plain one-worker-per-device runner), each worker taking
``global_batch / W`` sequences, split over its d devices. Timed: the inner
step that does not synchronize (``map_sync``'s ``sync=-1`` program, what H - 1
of every H steps run) and the synchronizing step, each as the median over
repeats of ``--steps`` chained steps, state donated. Memory per device, read
from the arrays' ``addressable_shards``: the parameters and optimizer state
(anchor, AdamW moments, outer momentum) a device holds, against one worker's
full replica; and XLA's own figure for the inner step (arguments + temporaries
of the compiled program, per device) where the backend reports it.

The layouts differ in the method's numbers (W workers of batch B/W), not only
in layout: the point is what a worker spanning d devices costs and saves at a
fixed number of devices and tokens per step.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxopt_lab.distributed import WorkerRunner, diloco  # noqa: E402
from jaxopt_lab.models.gpt import GPT  # noqa: E402


def per_device_bytes(tree) -> dict:
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--global-batch", type=int, default=32, help="sequences per step, over all workers")
    ap.add_argument("--steps", type=int, default=5, help="chained steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layouts", default="8x1,4x2,2x4,1x8", help="W x d, comma separated")
    args = ap.parse_args()
    model = GPT.from_preset(args.preset, vocab_size=256, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    host_params = jax.tree.map(np.asarray, params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    context = model.context
    n_dev = len(jax.devices())
    print(f"GPT {args.preset}: {n_params:,} parameters, context {context}; {n_dev} {jax.devices()[0].platform} "
          f"devices; global batch {args.global_batch} x {context} tokens; DiLoCo (AdamW inner, H = 500)")
    rows = []
    for layout in args.layouts.split(","):
        w, d = (int(v) for v in layout.lower().split("x"))
        runner = WorkerRunner(w, "shard_map", devices_per_worker=d)
        tx = diloco(optax.adamw(1e-3, b2=0.95, weight_decay=0.1), sync_every=500, axis_name=runner.axis_name)

        def loss(p, tokens):
            logits = nnx.merge(graphdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        def step(p, state, tokens, **decisions):
            grads = jax.grad(loss)(p, tokens)
            updates, state = tx.update(grads, state, p, **decisions)
            return optax.apply_updates(p, updates), state

        replica = (host_params, jax.tree.map(np.asarray, tx.init(params)))
        replica_bytes = sum(x.nbytes for x in jax.tree.leaves(replica))
        tokens = np.random.default_rng(0).integers(0, 256, (w, args.global_batch // w, context + 1)).astype(np.int32)
        batch_axis = 1 if d > 1 else None
        xs = runner.put(tokens, batch_axis=batch_axis)
        synced = runner.map_sync(step, donate_argnums=(0, 1))
        state = runner.put(runner.replicate(replica))
        held = max(per_device_bytes(state).values())
        programs = {"inner": synced.program(sync=-1), "sync": synced.program(sync=0)}
        xla_bytes = None
        try:
            lowered = programs["inner"].lower(*state, xs)
            mem = lowered.compile().memory_analysis()
            if mem is not None:
                xla_bytes = mem.argument_size_in_bytes + mem.temp_size_in_bytes
        except Exception:  # noqa: BLE001 - a backend without memory analysis, or a bounded step
            pass
        times = {k: [] for k in programs}
        for name, prog in programs.items():  # compile and warm up
            state = prog(*state, xs)
        jax.block_until_ready(state)
        for _ in range(args.repeats):
            for name, prog in programs.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    state = prog(*state, xs)
                jax.block_until_ready(state)
                times[name].append((time.perf_counter() - t0) / args.steps)
        rows.append((f"{w} x {d}", args.global_batch // w, statistics.median(times["inner"]),
                     statistics.median(times["sync"]), held, replica_bytes, xla_bytes))
        print(f"  {w} x {d}: done", flush=True)
    print()
    print("| W x d | batch per worker | inner step (s) | sync step (s) | params + opt state per device | "
          "per device / one replica | XLA inner step per device (args + temp) |")
    print("|---|---|---|---|---|---|---|")
    for name, b, t_in, t_sync, held, rep, xla in rows:
        xla_txt = f"{xla / 2**20:.2f} MiB" if xla is not None else "n/a"
        print(f"| {name} | {b} | {t_in:.3f} | {t_sync:.3f} | {held / 2**20:.2f} MiB | {held / rep:.3f} | {xla_txt} |")


if __name__ == "__main__":
    main()
