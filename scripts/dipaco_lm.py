r"""DiPaCo on the byte-level LM: P paths of shared modules vs dense DiLoCo of one path's size and of the total size.

    python scripts/dipaco_lm.py [--out runs/dipaco] [--grid 2 2] [--steps 150] [--H 30]

Douillard et al., "DiPaCo: Distributed Path Composition" (2024), shrunk to a
CPU: the Python-docs byte corpus (:func:`jaxopt_lab.data.load_text`), a GPT of
width ``--width`` whose blocks form ``len(--grid)`` levels of
``--layers-per-level`` blocks; level l has ``grid[l]`` module choices, so
there are P = prod(grid) paths, one per worker; embeddings, final norm and head
are shared by every path. Three runs on the same W = P workers, each worker
reading the same batches in all three:

=====================  ======================================================  ==========================
run                    model on each worker                                    synchronization
=====================  ======================================================  ==========================
``dipaco``             its path (one module per level + the shared part)       per module, among the
                                                                                workers holding it
``diloco_path``        a dense GPT of one path's size (L·levels blocks)        all workers
``diloco_total``       a dense GPT of the modular model's total size           all workers
                       (L·sum(grid) blocks: the same parameter count)
=====================  ======================================================  ==========================

All use DiLoCo's rule: H = ``--H`` inner AdamW steps (lr ``--inner-lr``, β =
(0.9, 0.95), weight decay 0.1, global-norm clip 1), then Nesterov SGD (lr 0.7,
momentum 0.9) on the averaged outer gradient; DiPaCo averages each module's
outer gradient over its own workers only.

Routing (offline, fixed, as the paper's): the feature of a window is the byte
histogram of the ``--prefix`` bytes *before* it (text a deployed model has
already read, so no byte it predicts is used to choose its path). The default
router (``--router grid``, :func:`~jaxopt_lab.distributed.dipaco.grid_router`)
picks level l's module from the window's projection on the l-th principal
direction of the features, cut at the quantiles of 4096 training windows, so
each module gets an equal share of the data; ``--router kmeans`` is the nearest
of P k-means centroids (:func:`~jaxopt_lab.distributed.dipaco.kmeans_router`,
the paper's choice of algorithm, which on this feature left three paths with
under 3% of the data: shards of 36973, 296, 104, 897 windows). Training windows
start every 16 bytes; worker p's shard is every window routed to path p, and
the dense runs read the same shards. Evaluation: ``--val-windows`` windows evenly
spaced over the validation split, mean cross-entropy in nats per byte over all
their positions; DiPaCo runs one path per window, the router's (also reported:
a random path per window, to show what routing is worth).

Bytes: payload and wire summed over workers
(:mod:`jaxopt_lab.distributed.accounting`; DiPaCo's per module: a ring
all-reduce among the workers holding the module), in MB (1e6 bytes).
Writes ``results.json`` (with each run's validation curve, one point per
round) and ``loss.png`` (:func:`plot`, also drawn into ``docs/dipaco.png`` by
``scripts/make_figures.py dipaco``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_text
from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, diloco, wire_bytes
from jaxopt_lab.distributed.dipaco import (
    byte_histogram,
    compose,
    dipaco,
    gpt_levels,
    grid_paths,
    grid_router,
    kmeans_router,
    module_bytes,
    modules_of,
    route,
    route_grid,
)
from jaxopt_lab.models.gpt import GPT

STRIDE = 16  # training windows start every STRIDE bytes


def gpt_params(layers: int, args) -> tuple:
    model = GPT(vocab_size=256, layers=layers, width=args.width, heads=args.heads, context=args.context,
                rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def make_loss(graphdef):
    def window_losses(p, tokens, targets):  # (N,) mean cross-entropy per window
        logits = nnx.merge(graphdef, nnx.State(p))(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=1)

    return window_losses


def shards_and_val(args, num_paths: int):
    corpus = load_text(context=args.context)
    train, val = np.asarray(corpus.train), np.asarray(corpus.val)
    starts = np.arange(args.prefix, len(train) - args.context - 1, STRIDE)
    feats = byte_histogram(np.stack([train[s - args.prefix:s] for s in starts]))
    rng = np.random.default_rng(args.seed)
    fit = rng.choice(len(starts), size=min(4096, len(starts)), replace=False)
    if args.router == "kmeans":
        centroids = kmeans_router(feats[fit], num_paths, seed=args.seed)
        router = lambda f: route(f, centroids)  # noqa: E731
    else:
        fitted = grid_router(feats[fit], args.grid)
        router = lambda f: route_grid(f, fitted)  # noqa: E731
    paths = router(feats)
    shards = [starts[paths == p] for p in range(num_paths)]
    if min(len(s) for s in shards) == 0:
        raise ValueError(f"the router left a path with no training window: shards {[len(s) for s in shards]}")
    vstarts = np.linspace(args.prefix, len(val) - args.context - 1, args.val_windows).astype(np.int64)
    vpaths = router(byte_histogram(np.stack([val[s - args.prefix:s] for s in vstarts])))
    window = np.arange(args.context + 1)
    vseq = val[vstarts[:, None] + window].astype(np.int32)
    return train, shards, (vseq[:, :-1], vseq[:, 1:]), vpaths


def batches(train, shards, args):
    """(steps, W, batch, context + 1) int32: worker w's windows drawn from its shard (with replacement)."""
    rng = np.random.default_rng(args.seed + 1)
    window = np.arange(args.context + 1)
    out = np.empty((args.steps, len(shards), args.batch, args.context + 1), np.int32)
    for w, shard in enumerate(shards):
        starts = shard[rng.integers(len(shard), size=(args.steps, args.batch))]
        out[:, w] = train[starts[..., None] + window]
    return out


def train_run(name, tx, graphdef, params, data, val, vpaths, args):
    W = data.shape[1]
    runner = WorkerRunner(W)
    window_losses = make_loss(graphdef)

    def step(p, state, seq, sync=None):
        grads = jax.grad(lambda q: window_losses(q, seq[:, :-1], seq[:, 1:]).mean())(p)
        updates, state = tx.update(grads, state, p, sync=sync)
        return optax.apply_updates(p, updates), state

    mapped = runner.map_sync(step)
    evaluate = jax.jit(jax.vmap(window_losses, in_axes=(0, None, None)))  # (W, N): every worker on every window
    p = runner.put(runner.replicate(params))
    state = runner.put(runner.replicate(jax.tree.map(np.asarray, tx.init(params))))
    curve, t0 = [], time.perf_counter()
    for i in range(args.steps):
        p, state = mapped(p, state, jnp.asarray(data[i]))
        if (i + 1) % args.H == 0:
            losses = np.asarray(evaluate(p, *val))
            routed = losses[vpaths, np.arange(losses.shape[1])] if name == "dipaco" else losses[0]
            curve.append((i + 1, float(routed.mean())))
            print(f"  {name:13s} step {i + 1:4d}  val loss {curve[-1][1]:.4f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    wall = time.perf_counter() - t0
    p, state = runner.get((p, state))
    losses = np.asarray(evaluate(p, *val))
    return p, state, losses, curve, wall


LABELS = {"dipaco": "DiPaCo {grid} ({P} paths), router's path", "diloco_path": "dense DiLoCo, one path's size",
          "diloco_total": "dense DiLoCo, total size"}


def plot(results: dict[str, dict], args: dict, path: str) -> str:
    """Validation loss per round against inner steps and against wire MB sent so far (all workers).

    ``results``/``args``: ``results.json``'s. A run sends the same bytes every round (each round
    all-reduces the same trees among the same workers), so the wire bytes after round k of R are
    k/R of the run's total.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = "x".join(map(str, args["grid"]))
    P = int(np.prod(args["grid"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, r in results.items():
        steps = np.array([c[0] for c in r["curve"]], float)
        loss = [c[1] for c in r["curve"]]
        label = LABELS[name].format(grid=grid, P=P)
        axes[0].plot(steps, loss, "o-", ms=3, label=label)
        axes[1].plot(r["wire_bytes"] / 1e6 * steps / args["steps"], loss, "o-", ms=3, label=label)
        if name == "dipaco":
            axes[0].plot([steps[-1]], [r["val_loss_random_path"]], "x", color="gray", ms=7,
                         label="DiPaCo, a random path per input")
    axes[0].set_xlabel(f"inner steps (H = {args['H']}; one point per round)")
    axes[1].set_xlabel("wire MB sent so far (ring all-reduce, all workers)")
    axes[0].set_ylabel("validation loss (nats/byte)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"DiPaCo vs dense DiLoCo, {P} workers, width {args['width']}, {args['steps']} steps "
                 f"of batch {args['batch']}x{args['context']} per worker", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/dipaco")
    ap.add_argument("--grid", type=int, nargs="+", default=[2, 2], help="modules per level")
    ap.add_argument("--layers-per-level", type=int, default=1)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=64, help="bytes before a window that the router reads")
    ap.add_argument("--router", choices=["grid", "kmeans"], default="grid",
                    help="grid: balanced product router (grid_router); kmeans: nearest of P k-means centroids")
    ap.add_argument("--batch", type=int, default=16, help="windows per worker per inner step")
    ap.add_argument("--steps", type=int, default=150, help="inner steps (a multiple of --H)")
    ap.add_argument("--H", type=int, default=30)
    ap.add_argument("--inner-lr", type=float, default=1e-3)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--runs", nargs="+", default=["dipaco", "diloco_path", "diloco_total"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps % args.H:
        raise ValueError(f"--steps ({args.steps}) must be a multiple of --H ({args.H}) so the last step synchronizes")

    t_start = time.perf_counter()
    paths = grid_paths(*args.grid)
    P, levels = len(paths), len(args.grid)
    train, shards, val, vpaths = shards_and_val(args, P)
    data = batches(train, shards, args)
    tokens = data.shape[0] * data.shape[1] * data.shape[2] * args.context
    print(f"grid {args.grid}: {P} paths = {P} workers; shard windows {[len(s) for s in shards]}; "
          f"val windows per path {np.bincount(vpaths, minlength=P).tolist()}; {args.steps} steps, H={args.H}, "
          f"{tokens:,} training tokens per run", flush=True)

    def inner():
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(args.inner_lr, b1=0.9, b2=0.95, weight_decay=0.1))

    def outer():
        return optax.sgd(args.outer_lr, momentum=args.momentum, nesterov=True)

    path_layers = args.layers_per_level * levels
    total_layers = args.layers_per_level * sum(args.grid)
    level_of = lambda q: gpt_levels(q, levels)  # noqa: E731
    results = {}
    for name in args.runs:
        layers = total_layers if name == "diloco_total" else path_layers
        graphdef, params = gpt_params(layers, args)
        n_worker = sum(x.size for x in jax.tree.leaves(params))
        if name == "dipaco":
            tx = dipaco(paths, level_of, inner(), outer(), sync_every=args.H)
            lv = jax.tree.leaves(level_of(params))
            sizes = [x.size for x in jax.tree.leaves(params)]
            n_shared = sum(s for s, lab in zip(sizes, lv) if lab < 0)
            n_total = n_shared + sum(k * sum(s for s, lab in zip(sizes, lv) if lab == level)
                                     for level, k in enumerate(args.grid))
        else:
            tx = diloco(inner(), outer(), sync_every=args.H)
            n_total = n_worker
        p, state, losses, curve, wall = train_run(name, tx, graphdef, params, data, val, vpaths, args)
        r = {"params_per_worker": n_worker, "params_total": n_total, "curve": curve, "wall_s": wall,
             "payload_bytes": float(communicated_bytes(state).sum()), "wire_bytes": float(wire_bytes(state).sum())}
        if name == "dipaco":
            r["val_loss"] = float(losses[vpaths, np.arange(losses.shape[1])].mean())
            rand = np.random.default_rng(args.seed + 2).integers(P, size=losses.shape[1])
            r["val_loss_random_path"] = float(losses[rand, np.arange(losses.shape[1])].mean())
            r["val_loss_per_path_on_all"] = losses.mean(axis=1).tolist()
            r["module_bytes"] = {str(k): v for k, v in module_bytes(state, paths).items()}
            # the paths composed from the modules are the workers' anchors (modules are in sync), and
            # the parameters equal them to rounding (a worker adds anchor - params to its params)
            mods = modules_of(state.anchor, paths, level_of)
            for w, path in enumerate(paths):
                composed = compose(mods, path, params, level_of)
                for a, b, c in zip(jax.tree.leaves(composed), jax.tree.leaves(jax.tree.map(lambda x: x[w], state.anchor)),
                                   jax.tree.leaves(jax.tree.map(lambda x: x[w], p))):
                    np.testing.assert_array_equal(a, b)
                    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
        else:
            r["val_loss"] = float(losses[0].mean())
        results[name] = r

    def row(label, r, loss):
        return (f"| {label} | {r['params_per_worker'] / 1e3:.0f}k | {r['params_total'] / 1e3:.0f}k | {loss:.4f} "
                f"| {r['payload_bytes'] / 1e6:.2f} | {r['wire_bytes'] / 1e6:.2f} | {r['wall_s']:.0f} |")

    labels = {k: v.format(grid="x".join(map(str, args.grid)), P=P) for k, v in LABELS.items()}
    lines = ["| run | params / worker | params total | val loss (nats/byte) | payload MB | wire MB | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(row(labels[name], r, r["val_loss"]))
        if name == "dipaco":
            lines.append(row("DiPaCo, a random path per input", r, r["val_loss_random_path"]))
    text = "\n".join(lines)
    print()
    print(text)
    if "dipaco" in results:
        print("\nDiPaCo bytes per module (all its workers, MB):")
        for k, v in results["dipaco"]["module_bytes"].items():
            print(f"  {k:8s} {v['workers']} workers  payload {v['payload'] / 1e6:.3f}  wire {v['wire'] / 1e6:.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "table": text}, f, indent=1)
    plot(results, vars(args), os.path.join(args.out, "loss.png"))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; wrote {args.out}/results.json")
    return results


if __name__ == "__main__":
    main()

