r"""Asynchronous Local-SGD on the nano LM: delayed Nesterov and dynamic local updates vs synchronous DiLoCo.

    python scripts/async_local_sgd_lm.py [--out runs/async_local_sgd] [--time-budget 320] [--H 10]

Liu et al., "Asynchronous Local-SGD Training for Language Modeling" (2024),
https://arxiv.org/abs/2401.09135, on the byte-level nano GPT
(:mod:`jaxopt_lab.data` text corpus), with 4 workers of fixed speeds
``--speeds 1.0 0.7 0.4 0.25`` (local steps per simulated second), run by the
event-driven :class:`~jaxopt_lab.distributed.federated.FederatedSimulator` for
the same simulated wall-clock budget ``--time-budget``:

=================  ===================================================  ============================
method             server rule (outer step on pseudo-gradients)         trigger / local steps
=================  ===================================================  ============================
``diloco``         Nesterov SGD(0.7, momentum 0.9) on the average of    ``SyncRound(4)``, H each
                   the 4 workers' pseudo-gradients (DiLoCo)
``async_sgd``      SGD(``--async-lr``, no momentum) per arrival         ``every_arrival()``, H each
``async_nesterov`` Nesterov SGD(0.7/N, momentum 0.9) per arrival        ``every_arrival()``, H each
                   ("naive": the paper's failing baseline)
``dn``             ``delayed_nesterov(0.7, N=4, beta=0.9)``             ``every_arrival()``, H each
``dn_dylu``        ``delayed_nesterov(0.7, N=4, beta=0.9)``             ``every_arrival()``,
                                                                        ``dynamic_local_steps(v, H)``
=================  ===================================================  ============================

(0.7 and 0.9 are ``--outer-lr`` and ``--beta``.) The naive Nesterov's rate
0.7/N gives the same steady-state step per N arrivals as the delayed one (both
move ~0.7/(1-0.9) = 7 times the average pseudo-gradient per N arrivals once the
momentum is warm); they differ only in how the momentum treats stale
pseudo-gradients.

Hyperparameters, from runs of this script at the default budget (final
validation loss): inner lr 5e-4 (at 3e-3 none ended below 2.76; at 1e-3
DiLoCo ended the same, 2.570, DN and DN + dynamic steps worse, 2.558 and 2.569,
and async SGD better, 2.462, so the choice favours DN); outer 0.7/0.9 as in
DiLoCo (0.35: DiLoCo 2.655, DN 2.556, DN + dynamic steps 2.494, worse or
equal); ``--async-lr`` 0.5 for the momentum-free baseline (1.0: 2.628,
oscillating; 0.25: 2.498, as 0.5).

Local training (the simulator's ``local_update(params, client_id, num_steps,
key)``): ``num_steps`` AdamW steps (lr ``--inner-lr``, b2 0.95, weight decay
0.1, global-norm clip 1) on batches of ``--batch`` windows of ``--context``
bytes drawn from the worker's own shard (the training bytes cut into 1 KiB
blocks dealt round-robin to the workers), with a FRESH AdamW state per
dispatch (no inner state carried between a worker's rounds) and a constant
inner learning rate (the paper decays it with a cosine schedule per worker;
not done here). Time: worker w takes ``1 / v_w`` simulated seconds per local
step, no latency, no jitter.

Validation loss (mean cross-entropy, nats/byte, on the first ``--val-windows``
windows of the validation split) is evaluated inside the simulator's compiled
scan: after every round (``diloco``) or every N arrivals (async). The script
prints a table (final validation loss at the time budget, the simulated time
to reach ``--target`` (default: DiLoCo's final loss), server updates, worker
updates, inner steps, mean staleness, the loss at DiLoCo's inner-step count),
writes ``results.json`` and ``async_local_sgd.png`` (validation loss against
simulated wall-clock, server updates and inner steps) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_text
from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.distributed.federated.delayed_nesterov import (
    delayed_nesterov,
    dynamic_local_steps,
)
from jaxopt_lab.models import GPT

METHODS = ("diloco", "async_sgd", "async_nesterov", "dn", "dn_dylu")
LABELS = {
    "diloco": "sync DiLoCo",
    "async_sgd": "async, SGD",
    "async_nesterov": "async, naive Nesterov",
    "dn": "async, delayed Nesterov",
    "dn_dylu": "async, DN + dyn. local",
}
BLOCK = 1024  # bytes per shard block


def _mix(x):
    """The "lowbias32" integer hash (uint32 -> uint32): batch sampling without threefry's compile cost."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The LM task shared by every method."""

    params: Any  # initial server model (pure dict of arrays)
    local_update: Callable  # (params, client_id, num_steps, key) -> params
    eval_fn: Callable  # params -> {"val_loss": scalar}
    num_workers: int
    batch: int
    context: int


def build_problem(
    preset: str = "nano",
    num_workers: int = 4,
    batch: int = 16,
    context: int = 64,
    inner_lr: float = 5e-4,
    val_windows: int = 128,
    seed: int = 0,
) -> Problem:
    """The nano (or ``preset``) GPT on the byte corpus, one training shard per worker.

    Args:
      preset: a ``GPT_PRESETS`` name ("nano"; "micro" for tests).
      num_workers: N; the training bytes are cut into 1 KiB blocks dealt round-robin.
      batch: windows per local step.
      context: window length (the model's context is set to it).
      inner_lr: AdamW learning rate of the local steps.
      val_windows: validation windows (of ``context`` bytes) in every evaluation.
      seed: model initialisation seed.
    """
    corpus = load_text(context=context)
    model = GPT.from_preset(preset, vocab_size=corpus.vocab_size, context=context, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)

    def logits(p, tokens):
        return nnx.merge(graphdef, nnx.State(p))(tokens)

    def loss_fn(p, tokens, targets):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, tokens), targets).mean()

    blocks = corpus.train.shape[0] // (BLOCK * num_workers)
    if blocks < 1 or BLOCK <= context + 1:
        raise ValueError(f"the corpus ({corpus.train.shape[0]} bytes) is too small for {num_workers} shards")
    shards = jnp.asarray(corpus.train[: blocks * BLOCK * num_workers].reshape(blocks, num_workers, BLOCK)
                         .transpose(1, 0, 2))  # (W, blocks, BLOCK) uint8: worker w holds every W-th block
    window = jnp.arange(context + 1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(inner_lr, b1=0.9, b2=0.95, weight_decay=0.1))

    lanes = jnp.arange(batch, dtype=jnp.uint32)

    def local_update(params, client_id, num_steps, key):
        seed = _mix(key[0] ^ _mix(key[1] + jnp.uint32(0x9E3779B9)))

        def step(i, carry):
            p, opt_state = carry
            h = _mix(_mix(seed ^ (i.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B))) ^ lanes * jnp.uint32(0xC2B2AE35))
            b = (h % jnp.uint32(blocks)).astype(jnp.int32)  # window starts: block, then offset in it
            o = (_mix(h) % jnp.uint32(BLOCK - context)).astype(jnp.int32)
            seq = shards[client_id, b[:, None], o[:, None] + window].astype(jnp.int32)
            grads = jax.grad(loss_fn)(p, seq[:, :-1], seq[:, 1:])
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        return jax.lax.fori_loop(0, num_steps, step, (params, optimizer.init(params)))[0]

    vx, vy = next(corpus.eval_batches(val_windows, split="val"))
    vx, vy = jnp.asarray(vx), jnp.asarray(vy)

    def eval_fn(p):
        return {"val_loss": loss_fn(p, vx, vy)}

    return Problem(params, local_update, eval_fn, num_workers, batch, context)


def method_local_steps(method: str, speeds: Sequence[float], H: int) -> np.ndarray:
    """Local steps of each worker: H for all, or ``dynamic_local_steps(speeds, H)`` for ``dn_dylu``."""
    if method == "dn_dylu":
        return dynamic_local_steps(speeds, H)
    return np.full(len(speeds), H, np.int64)


def make_simulator(
    method: str,
    problem: Problem,
    speeds: Sequence[float],
    H: int,
    outer_lr: float = 0.7,
    beta: float = 0.9,
    async_lr: float = 0.5,
    local_steps: Sequence[int] | None = None,
) -> fl.FederatedSimulator:
    """The simulator of one method (see the module docstring's table).

    ``local_steps`` overrides the method's per-worker local steps
    (:func:`method_local_steps`), e.g. to run synchronous DiLoCo with dynamic local steps.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = problem.num_workers
    if len(speeds) != n:
        raise ValueError(f"need {n} speeds (one per worker), got {len(speeds)}")
    if method == "diloco":
        rule, trigger = fl.fedavg(outer_lr, momentum=beta, nesterov=True, weighting="uniform"), fl.SyncRound(n)
    else:
        trigger = fl.every_arrival()
        if method == "async_sgd":
            rule = fl.fedavg(async_lr, weighting="uniform")  # the one arrival's pseudo-gradient, times async_lr
        elif method == "async_nesterov":
            rule = fl.fedavg(outer_lr / n, momentum=beta, nesterov=True, weighting="uniform")
        else:
            rule = delayed_nesterov(outer_lr, buffer_size=n, beta=beta)
    return fl.FederatedSimulator(
        problem.local_update, rule, trigger, num_clients=n,
        concurrency=None if method == "diloco" else n,
        local_steps=method_local_steps(method, speeds, H) if local_steps is None else np.asarray(local_steps),
        speeds=list(map(float, speeds)),
        pseudo_gradient="dispatch")


def server_steps_within(method: str, speeds: Sequence[float], local_steps: Sequence[int], time_budget: float) -> int:
    """Server steps whose arrivals come by ``time_budget`` (no jitter: every arrival time is known).

    ``diloco``: rounds of ``max_w steps_w / v_w`` seconds (the slowest worker). Async
    (every worker always in flight, re-sent on arrival): worker w arrives every
    ``steps_w / v_w`` seconds.
    """
    period = np.asarray(local_steps, np.float64) / np.asarray(speeds, np.float64)
    tol = 1e-6 * time_budget
    if method == "diloco":
        return int(np.floor((time_budget + tol) / period.max()))
    return int(np.floor((time_budget + tol) / period).sum())


def run_method(method: str, problem: Problem, speeds: Sequence[float], H: int, time_budget: float,
               seed: int = 0, eval_fn_host: Callable | None = None, local_steps: Sequence[int] | None = None,
               **rule_kwargs) -> dict:
    """Runs one method for ``time_budget`` simulated seconds in one compiled scan; returns its curves.

    ``local_steps`` overrides the method's per-worker local steps; ``rule_kwargs``
    go to :func:`make_simulator` (``outer_lr``, ``beta``, ``async_lr``).

    Returns a dict of lists: ``eval_time``, ``eval_version``, ``eval_inner_steps``,
    ``eval_val_loss`` (the evaluations, starting with the initial model at 0) and
    the totals ``server_updates``, ``worker_updates``, ``inner_steps``,
    ``sim_time``, ``mean_staleness``, ``max_staleness``, and per arrival (in
    order) ``local_steps``, ``clients``, ``staleness``; and ``wall_s``, ``final_params``.
    """
    steps = method_local_steps(method, speeds, H) if local_steps is None else np.asarray(local_steps)
    sim = make_simulator(method, problem, speeds, H, local_steps=steps, **rule_kwargs)
    num_steps = server_steps_within(method, speeds, steps, time_budget)
    if num_steps < 1:
        raise ValueError(f"{method}: the time budget {time_budget} is shorter than one server step")
    eval_every = 1 if method == "diloco" else problem.num_workers
    evaluate = eval_fn_host or jax.jit(problem.eval_fn)
    t0 = time.perf_counter()
    state = sim.init(problem.params, seed=seed)
    state, rec = sim.run(state, num_steps, eval_fn=problem.eval_fn, eval_every=eval_every)
    jax.block_until_ready(state.params)
    wall = time.perf_counter() - t0
    rec = jax.tree.map(np.asarray, rec)
    mask = rec.mask
    steps_per_server_step = (rec.local_steps * mask).sum(axis=1)
    cum_steps = np.cumsum(steps_per_server_step)
    loss = rec.metrics["val_loss"]
    done = ~np.isnan(loss)
    initial = float(evaluate(problem.params)["val_loss"])
    final = float(evaluate(state.params)["val_loss"])
    eval_time = [0.0] + rec.time[done].tolist()
    eval_version = [0] + rec.version[done].tolist()
    eval_steps = [0] + cum_steps[done].tolist()
    eval_loss = [initial] + loss[done].tolist()
    if not done[-1]:  # the last server step was not an evaluation step: evaluate it here
        eval_time.append(float(rec.time[-1]))
        eval_version.append(int(rec.version[-1]))
        eval_steps.append(int(cum_steps[-1]))
        eval_loss.append(final)
    stale = rec.staleness[mask]
    return {
        "method": method,
        "eval_time": eval_time, "eval_version": eval_version, "eval_inner_steps": eval_steps,
        "eval_val_loss": eval_loss, "final_val_loss": final,
        "server_updates": int(state.version), "worker_updates": int(state.applied),
        "inner_steps": int(cum_steps[-1]), "sim_time": float(rec.time[-1]),
        "mean_staleness": float(stale.mean()), "max_staleness": int(stale.max()),
        "local_steps": rec.local_steps[mask].tolist(), "clients": rec.client[mask].tolist(),
        "staleness": stale.tolist(), "server_steps": num_steps, "wall_s": wall, "final_params": state.params,
    }


def time_to_target(result: dict, target: float) -> float:
    """Simulated time of the first evaluation at or below ``target`` (NaN: never)."""
    for t, v in zip(result["eval_time"], result["eval_val_loss"]):
        if v <= target:
            return float(t)
    return float("nan")


def loss_at_steps(result: dict, inner_steps: int) -> float:
    """Validation loss at the first evaluation with at least ``inner_steps`` inner steps (NaN: none)."""
    for s, v in zip(result["eval_inner_steps"], result["eval_val_loss"]):
        if s >= inner_steps:
            return float(v)
    return float("nan")


def table(results: dict[str, dict], target: float, ref_steps: int) -> str:
    head = (f"| method | final val loss | sim time to {target:.3f} | server updates | worker updates | "
            f"inner steps | mean staleness | val loss at {ref_steps} inner steps |")
    lines = [head, "|" + "---|" * 8]
    for name, r in results.items():
        ttt = time_to_target(r, target)
        at = loss_at_steps(r, ref_steps)
        lines.append(
            f"| {LABELS[name]} | {r['final_val_loss']:.3f} | {'—' if np.isnan(ttt) else f'{ttt:.0f}'} | "
            f"{r['server_updates']} | {r['worker_updates']} | {r['inner_steps']} | {r['mean_staleness']:.2f} | "
            f"{'—' if np.isnan(at) else f'{at:.3f}'} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for name, r in results.items():
        for ax, key in zip(axes, ("eval_time", "eval_version", "eval_inner_steps")):
            ax.plot(r[key], r["eval_val_loss"], "o-", ms=2.5, label=LABELS[name])
    for ax, xl in zip(axes, ("simulated wall-clock (s)", "server updates", "inner steps (all workers)")):
        ax.set_xlabel(xl)
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/byte)")
    axes[0].legend()
    lo = min(min(r["eval_val_loss"]) for r in results.values())
    axes[0].set_ylim(lo - 0.1, lo + 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/async_local_sgd")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--speeds", type=float, nargs="+", default=[1.0, 0.7, 0.4, 0.25])
    ap.add_argument("--H", type=int, default=10, help="local steps (the fastest worker's, for dn_dylu)")
    ap.add_argument("--time-budget", type=float, default=320.0, help="simulated seconds (fastest worker: 1 step/s)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--inner-lr", type=float, default=5e-4)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--beta", type=float, default=0.9)
    ap.add_argument("--async-lr", type=float, default=0.5, help="outer SGD rate of async_sgd")
    ap.add_argument("--val-windows", type=int, default=128)
    ap.add_argument("--target", type=float, default=None, help="default: sync DiLoCo's final validation loss")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    problem = build_problem(args.preset, len(args.speeds), args.batch, args.context, args.inner_lr,
                            args.val_windows, args.seed)
    evaluate = jax.jit(problem.eval_fn)
    print(f"{args.preset} GPT, {sum(x.size for x in jax.tree.leaves(problem.params)):,} parameters; "
          f"speeds {args.speeds}, H={args.H}, dynamic local steps {dynamic_local_steps(args.speeds, args.H).tolist()}; "
          f"batch {args.batch}x{args.context}; budget {args.time_budget:g} simulated s", flush=True)
    results = {}
    for m in args.methods:
        results[m] = run_method(m, problem, args.speeds, args.H, args.time_budget, args.seed, evaluate,
                                outer_lr=args.outer_lr, beta=args.beta, async_lr=args.async_lr)
        r = results[m]
        print(f"  {LABELS[m]:24s} val loss {r['final_val_loss']:.3f} at t={r['sim_time']:.0f}, "
              f"{r['server_updates']} server updates, {r['inner_steps']} inner steps ({r['wall_s']:.0f} s)", flush=True)
    target = args.target
    if target is None:
        target = results["diloco"]["final_val_loss"] if "diloco" in results else min(
            r["final_val_loss"] for r in results.values())
    ref_steps = results["diloco"]["inner_steps"] if "diloco" in results else min(
        r["inner_steps"] for r in results.values())
    text = table(results, target, ref_steps)
    print()
    print(text)
    print(f"\n(inner AdamW state fresh per dispatch; evaluations every round / every {len(args.speeds)} arrivals, "
          f"on {args.val_windows}x{args.context} validation bytes; total {time.perf_counter() - t_start:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "async_local_sgd.png")
    plot(results, png, target)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "target": target,
                   "results": {k: {kk: vv for kk, vv in r.items() if kk != "final_params"} for k, r in results.items()}},
                  f, indent=1)
    print(f"wrote {png}")
    return results


if __name__ == "__main__":
    main()
