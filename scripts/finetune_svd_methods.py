"""EVA, SVFit and WeLore on the pretrained nano GPT (runs/pretrain_gpt_docs; made by
``jaxopt-lab run experiments/pretrain_gpt_docs.toml`` when missing).

``python scripts/finetune_svd_methods.py welore``: WeLore's compression / perplexity
trade-off: for target compressions of the attention and MLP projections, the eval loss
(nats/byte) on the docs and on Python code, WeLore's non-uniform ranks against one uniform
rank with at least the same compression.

``python scripts/finetune_svd_methods.py finetune [--steps N]``: fine-tuning docs -> code as
experiments/finetune_gpt_code.toml (batch 32 x 64 bytes, AdamW, eval on 20 x 32 windows):
LoRA (rank 8, alpha 16), EVA-initialized LoRA (same budget), SVFit (top 8 singular values)
and WeLore (30% compressed, LRC factors trained).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment.build import build
from jaxopt_lab.experiment.trainer import TrainState, evaluate, make_eval_step, make_train_step
from jaxopt_lab.finetune import (
    apply_lora,
    apply_svfit,
    apply_welore,
    eva_init,
    freeze_all_but_low_rank,
    freeze_all_but_singular_values,
    freeze_base,
)
from jaxopt_lab.finetune.pretrained import ensure_pretrained, load_params, restore_params
from jaxopt_lab.finetune.welore import WeLoreLinear, compression, spectra
from jaxopt_lab.lowrank.memory import optimizer_state_bytes

PRETRAIN = "experiments/pretrain_gpt_docs.toml"
TARGETS = "blocks/.*/(qkv|attn_out|mlp_in|mlp_out)"
EVAL_BATCHES, BATCH = 20, 32


def pretrained():
    run_dir = ensure_pretrained(PRETRAIN)
    docs = build(config_lib.load(PRETRAIN))
    code = build(config_lib.load(PRETRAIN, ['data.name="python_code"']))
    load_params(docs.model, restore_params(run_dir))
    return docs.model, docs.data, code.data


def eval_loss(model, data) -> float:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return evaluate(make_eval_step(graphdef, rest, "lm"), params, data, BATCH, EVAL_BATCHES)["eval_loss"]


def uniform(model, target: float):
    """One rank for every targeted matrix: the largest whose compression is >= target."""
    spec = spectra(model, TARGETS)
    n = min(min(shape) for _, shape in spec.values())
    for k in range(n, 0, -1):
        ranks = {p: (k if k * sum(shape) < shape[0] * shape[1] else None) for p, (_, shape) in spec.items()}
        if compression(spec, ranks) >= target:
            break
    for path, node in list(nnx.iter_graph(model)):
        p = "/".join(str(x) for x in path)
        if ranks.get(p) is not None:
            parent = model
            for key in path[:-1]:
                parent = parent[key] if isinstance(key, int) else getattr(parent, key)
            setattr(parent, path[-1], WeLoreLinear.from_linear(node, ranks[p])) if not isinstance(path[-1], int) \
                else parent.__setitem__(path[-1], WeLoreLinear.from_linear(node, ranks[p]))
    return k, compression(spec, ranks)


def welore_table():
    model, docs, code = pretrained()
    print(f"pretrained: docs {eval_loss(model, docs):.4f}, code {eval_loss(model, code):.4f} nats/byte")
    print("| target | WeLore θ | compression | LRCs / 8 | ranks (min–max) | docs loss | code loss "
          "| uniform rank | its compression | docs loss | code loss |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for target in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        m = nnx.clone(model)
        rep = apply_welore(m, TARGETS, compression_target=target)
        u = nnx.clone(model)
        k, uc = uniform(u, target)
        ranks = list(rep.ranks.values())
        print(f"| {target:.0%} | {rep.threshold:.3f} | {rep.compression:.3f} | {len(ranks)} | {min(ranks)}–{max(ranks)} "
              f"| {eval_loss(m, docs):.4f} | {eval_loss(m, code):.4f} | {k} | {uc:.3f} "
              f"| {eval_loss(u, docs):.4f} | {eval_loss(u, code):.4f} |", flush=True)


def train(model, tx, data, steps: int, lr_name: str):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = jax.jit(make_train_step(graphdef, rest, tx, "lm"))
    eval_step = make_eval_step(graphdef, rest, "lm")
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.asarray(BATCH, jnp.int32))
    first = evaluate(eval_step, params, data, BATCH, EVAL_BATCHES)["eval_loss"]
    x, y = data.batch(0, BATCH, 0)
    state, _ = step(state, x[None], y[None])  # compile
    start = time.perf_counter()
    for i in range(1, steps):
        x, y = data.batch(i, BATCH, 0)
        state, metrics = step(state, x[None], y[None])
    jax.block_until_ready(state.params)
    rate = (steps - 1) / (time.perf_counter() - start)
    last = evaluate(eval_step, state.params, data, BATCH, EVAL_BATCHES)
    trainable = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(jax.eval_shape(tx.init, params))
                    if getattr(v, "ndim", 0) > 0) // 2
    return first, last["eval_loss"], last["eval_accuracy"], trainable, optimizer_state_bytes(state.opt_state), rate


def finetune(steps: int):
    model, _, code = pretrained()
    adamw = optax.adamw(1e-3, weight_decay=0.0)
    rows = []
    m = nnx.clone(model)
    apply_lora(m, TARGETS, rank=8, alpha=16.0, rngs=nnx.Rngs(params=0))
    rows.append(("lora", train(m, freeze_base(adamw), code, steps, "")))
    m = nnx.clone(model)
    apply_lora(m, TARGETS, rank=8, alpha=16.0, rngs=nnx.Rngs(params=0))
    res = eva_init(m, [code.batch(10_000 + i, BATCH, 1)[0] for i in range(8)])
    print(f"eva: {res.steps} batches, converged {res.converged}, ranks {sorted(res.ranks.values())}", flush=True)
    rows.append(("eva", train(m, freeze_base(adamw), code, steps, "")))
    m = nnx.clone(model)
    apply_svfit(m, TARGETS, rank=8)
    rows.append(("svfit (lr 1e-2)", train(m, freeze_all_but_singular_values(optax.adamw(1e-2, weight_decay=0.0)), code,
                                          steps, "")))
    m = nnx.clone(model)
    rep = apply_welore(m, TARGETS, compression_target=0.3)
    print(f"welore: θ {rep.threshold:.3f}, compression {rep.compression:.3f}, {len(rep.ranks)} LRCs, "
          f"{len(rep.dense)} dense", flush=True)
    rows.append(("welore 30% (LRCs)", train(m, freeze_all_but_low_rank(adamw), code, steps, "")))
    print(f"| variant | eval loss at step 0 | eval loss at step {steps} | eval acc | trainable params "
          "| opt state bytes | steps/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (first, last, acc, n, b, rate) in rows:
        print(f"| {name} | {first:.4f} | {last:.4f} | {acc:.4f} | {n:,} | {b:.3e} | {rate:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["welore", "finetune"])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    welore_table() if args.what == "welore" else finetune(args.steps)
