"""The main job's training throughput against one single-worker jitted step, in one run.

    python scripts/bench_main_job.py [--config experiments/diloco_vs_ddp_fast.toml] [--repeats 20]
    python scripts/bench_main_job.py --config experiments/diloco_gpt_small.toml --set workers.mode=vmap \
        --set train.batch_size=2 --repeats 5 --ddp   # GPT-2 small, 8 workers vmapped on one device

For each variant of the config (DDP, DiLoCo, Streaming DiLoCo, gossip) it
builds the trainer's own compiled step (W workers, ``workers.mode``), and
times it on the config's batches; the baseline is one jitted single-worker
AdamW step of the same model on W x the per-worker batch (the same tokens per
step, no worker axis), measured in the same run. Prints tokens/s, the ratio to
the baseline, and the device's peak memory where the backend reports it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.build import build
from jaxopt_lab.experiment.trainer import Trainer


def median_time(fn, repeats: int) -> float:
    state = jax.block_until_ready(fn(None))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/diloco_vs_ddp_fast.toml")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], help="config overrides (key=value), applied to every variant")
    ap.add_argument("--ddp", action="store_true",
                    help="also time data parallelism with the first variant's inner optimizer (for a config without "
                         "a data_parallel variant, e.g. diloco_gpt_small.toml)")
    args = ap.parse_args(argv)
    variants = config_lib.load_variants(args.config, args.set)
    first = next(iter(variants.values()))
    if args.ddp and not any(c.method["name"] == "data_parallel" for c in variants.values()):
        if "inner" not in first.method:
            ap.error(f"--ddp needs a method with an inner optimizer; {args.config}'s is {first.method['name']!r}")
        ddp = {"name": "data_parallel", "inner": first.method["inner"]}
        variants = {"ddp": config_lib.from_dict({**first.to_dict(), "method": ddp}), **variants}
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}) x{jax.device_count()}  "
          f"JAX {jax.__version__}  config {args.config} {' '.join(args.set)}")

    # Baseline: one single-worker jitted AdamW step on W x b sequences (same tokens, no worker axis).
    exp = build(first)
    w, b, ctx = first.workers.count, first.train.batch_size, exp.data.context
    tokens = w * b * ctx
    graphdef, params, rest = nnx.split(exp.model, nnx.Param, ...)
    tx = optax.adamw(3e-3, b2=0.95, weight_decay=0.1)
    x, y = exp.data.batch(0, w * b, 0)

    @jax.jit
    def single(params, opt_state, x, y):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x, y = jnp.asarray(x), jnp.asarray(y)
    base_state = (params, tx.init(params))
    t_base = median_time(lambda s: single(*(s or base_state), x, y), args.repeats)
    print(f"\n{'step':24s} {'ms':>8s} {'tokens/s':>11s} {'vs single':>9s}")
    print(f"{'single-worker adamw':24s} {t_base * 1e3:8.2f} {tokens / t_base:11.0f} {1.0:8.2f}x   "
          f"({w * b} x {ctx} tokens in one step)")
    for name, cfg in variants.items():
        name = name or cfg.method["name"]  # a config without variants
        trainer = Trainer(build(cfg), run_dir=f"/tmp/bench_main_job_{name}")
        xs, ys = trainer.batch(0)

        def step(state, trainer=trainer, xs=xs, ys=ys):
            return trainer.train_step(state if state is not None else trainer.initial, xs, ys)[0]

        t = median_time(step, args.repeats)
        print(f"{name:24s} {t * 1e3:8.2f} {tokens / t:11.0f} {t_base / t:8.2f}x   "
              f"({w} workers x {b} x {ctx}, mode {cfg.workers.mode})")
    peak = peak_bytes()
    print(f"\npeak device memory: {peak / 2**20:.0f} MiB" if peak else "\npeak device memory: not reported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
