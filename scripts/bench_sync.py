"""Cost of a DiLoCo inner step against the plain per-worker step, before and after the host decision.

    python scripts/bench_sync.py [--workers 8] [--mode vmap|shard_map] [--batch 8] [--steps 10] [--repeats 15] [--rows REGEX]

W workers each train the nano GPT (2 blocks, width 128, context 64, vocab
256) with AdamW on their own random tokens. Every program is the same
per-worker step, mapped by ``WorkerRunner(W, mode)``; the rows differ only in
the transformation:

* plain: AdamW alone (the floor: what an inner step should cost);
* DiLoCo, in-graph decision (``sync=None``, the old path): ``lax.cond`` on the
  batched step counter, a select under vmap, so the outer step and the
  all-reduce run on every step;
* DiLoCo, host decision, no sync (``sync=False``): the program the host picks
  on H - 1 of every H steps;
* DiLoCo via ``map_sync``: the same, called through the runner's dispatcher,
  which reads ``next_sync`` from the state on the host before each step;
* DiLoCo, sync step (``sync=True``): the 1 in H;
* Streaming DiLoCo and local SGD, host decision, no sync.

The last rows donate params and state (``donate_argnums``), so what a step
passes through unchanged (DiLoCo's anchor and outer momentum) is not copied.
H = 500, so no timed step of the in-graph path actually synchronizes. Each
repeat runs ``--steps`` chained steps and waits for the result; the programs
take turns within each repeat (so machine load hits all alike), and the table
gives the median time per step and its ratio to the plain step of the same run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.distributed import WorkerRunner, diloco, local_sgd, streaming_diloco
from jaxopt_lab.models.gpt import GPT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--mode", default="vmap", choices=["vmap", "shard_map"])
    ap.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
    ap.add_argument("--steps", type=int, default=10, help="chained steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rows", default="", help="regular expression: time only the rows it finds (plain always)")
    args = ap.parse_args()
    w = args.workers
    runner = WorkerRunner(w, args.mode)
    model = GPT.from_preset("nano", vocab_size=256, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    context = model.context
    tokens = np.random.default_rng(0).integers(0, 256, (w, args.batch, context + 1)).astype(np.int32)
    x, y = runner.put((tokens[..., :-1], tokens[..., 1:]))

    def make_step(tx, **update_kwargs):
        def step(params, opt_state, x, y, **extra):
            def loss(p):
                logits = nnx.merge(graphdef, p)(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params, **update_kwargs, **extra)
            return optax.apply_updates(params, updates), opt_state

        return step

    inner = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    axis = runner.axis_name
    dil = diloco(inner, sync_every=500, axis_name=axis)
    sdil = streaming_diloco(inner, sync_every=500, num_fragments=2, axis_name=axis)
    lsgd = local_sgd(inner, sync_every=500, axis_name=axis)
    rows = {  # name: (callable(params, state) -> (params, state), tx)
        "plain AdamW": (runner.map(make_step(inner)), inner),
        "DiLoCo, in-graph decision (old)": (runner.map(make_step(dil)), dil),
        "DiLoCo, host decision, no sync": (runner.map(make_step(dil, sync=False)), dil),
        "DiLoCo via map_sync (reads the flag)": (runner.map_sync(make_step(dil)), dil),
        "DiLoCo, sync step (1 in H)": (runner.map(make_step(dil, sync=True)), dil),
        "Streaming DiLoCo P=2, in-graph (old)": (runner.map(make_step(sdil)), sdil),
        "Streaming DiLoCo P=2, host, no sync": (runner.map(make_step(sdil, sync=-1)), sdil),
        "local SGD, in-graph (old)": (runner.map(make_step(lsgd)), lsgd),
        "local SGD, host, no sync": (runner.map(make_step(lsgd, sync=False)), lsgd),
        # the same with the state donated: what a step passes through unchanged costs no copy
        "plain AdamW, donated": (runner.map(make_step(inner), donate_argnums=(0, 1)), inner),
        "DiLoCo, in-graph (old), donated": (runner.map(make_step(dil), donate_argnums=(0, 1)), dil),
        "DiLoCo, host, no sync, donated": (runner.map(make_step(dil, sync=False), donate_argnums=(0, 1)), dil),
        "Streaming P=2, host, no sync, donated": (runner.map(make_step(sdil, sync=-1), donate_argnums=(0, 1)), sdil),
    }
    rows = {k: v for k, v in rows.items() if k == "plain AdamW" or re.search(args.rows, k)}
    states = {}
    for name, (fn, tx) in rows.items():
        state = runner.put(runner.replicate((params, jax.tree.map(np.asarray, tx.init(params)))))
        states[name] = jax.block_until_ready(fn(*state, x, y))  # compile and warm up
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (fn, _) in rows.items():
            state = states[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state = fn(*state, x, y)
            states[name] = jax.block_until_ready(state)  # donated rows: the old state is gone
            times[name].append((time.perf_counter() - t0) / args.steps)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{jax.device_count()} ({dev.platform})  jax {jax.__version__}  mode {args.mode}  "
          f"W={w} ({runner.workers_per_device} per device)  nano GPT {n_params} params  "
          f"batch {args.batch}x{context} tokens per worker")
    base = statistics.median(times["plain AdamW"])
    print(f"| {'step':<38} | {'ms / step':>9} | {'/ plain':>7} |")
    print(f"|{'-' * 40}|{'-' * 11}:|{'-' * 8}:|")
    for name in rows:
        t = statistics.median(times[name])
        print(f"| {name:<38} | {1e3 * t:>9.3f} | {t / base:>6.2f}x |")


if __name__ == "__main__":
    main()
