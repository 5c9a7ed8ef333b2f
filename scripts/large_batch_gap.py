r"""The large-batch generalization gap on digits and what closes it (Hoffer et al. 2017).

    python scripts/large_batch_gap.py [--out runs/large_batch_gap] [--epochs 20] [--seeds 0 1 2]

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks" (NeurIPS 2017),
https://arxiv.org/abs/1705.08741. A CNN with batch norm after each conv
(``conv3x3(16) -> BN -> relu -> avgpool -> conv3x3(32) -> BN -> relu -> avgpool
-> global mean -> dense``) on digits, SGD with momentum 0.9 and a constant
learning rate, test accuracy after training:

==========  ======================================================================
setting     what
==========  ======================================================================
``sb``      small batch ``--small`` (32), lr ``--lr``, ``--epochs`` epochs
``lb``      large batch ``--large`` (512), the same lr and epochs (the gap)
``lb_sqrt`` + square-root scaled lr, ``lr * sqrt(large / small)``
``lb_gbn``  + Ghost Batch Norm over ghost batches of ``--small``
``lb_ra``   + regime adaptation: ``large / small`` times the epochs (as many
            updates as ``sb``)
==========  ======================================================================

Each setting adds to the one above it (``lb_ra`` has the sqrt lr and GBN too).
Batch norm is :class:`~jaxopt_lab.models.GhostBatchNorm` with ``ghost_size``
equal to the batch (plain batch norm) or ``--small`` (GBN); evaluation uses the
running statistics. Batches are drawn by ``ArrayDataset.batch_indices`` (a
fresh permutation per epoch). Writes ``results.json`` and
``large_batch_gap.png`` (test error against epochs and against updates) to
``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_digits
from jaxopt_lab.models import GhostBatchNorm
from study_output import write_study  # scripts/ is on sys.path when run as a script


class BNCNN(nnx.Module):
    """Two conv blocks with (ghost) batch norm, global average pool, dense head."""

    def __init__(self, ghost_size: int, channels=(16, 32), *, rngs: nnx.Rngs):
        sizes = (1, *channels)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
                               for a, b in zip(sizes[:-1], sizes[1:])])
        self.norms = nnx.List([GhostBatchNorm(b, ghost_size) for b in channels])
        self.head = nnx.Linear(channels[-1], 10, rngs=rngs)

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
            x = nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
        return self.head(jnp.mean(x, axis=(1, 2)))


def settings(args) -> dict[str, dict]:
    r = args.large / args.small
    return {
        "sb": dict(batch=args.small, ghost=args.small, lr=args.lr, epochs=args.epochs),
        "lb": dict(batch=args.large, ghost=args.large, lr=args.lr, epochs=args.epochs),
        "lb_sqrt": dict(batch=args.large, ghost=args.large, lr=args.lr * math.sqrt(r), epochs=args.epochs),
        "lb_gbn": dict(batch=args.large, ghost=args.small, lr=args.lr * math.sqrt(r), epochs=args.epochs),
        "lb_ra": dict(batch=args.large, ghost=args.small, lr=args.lr * math.sqrt(r), epochs=args.epochs * r),
    }


@functools.lru_cache(maxsize=None)
def programs(ghost: int, lr: float):
    """The jitted training chunk and evaluation for one (ghost size, lr): compiled once for all seeds."""
    model = BNCNN(ghost, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    tx = optax.sgd(lr, momentum=0.9)

    def loss_fn(p, s, x, y):
        m = nnx.merge(graphdef, p, s, copy=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        return loss, nnx.state(m, nnx.BatchStat)

    @jax.jit
    def chunk(carry, idxs, x_train, y_train):
        def step(carry, idx):
            p, s, o = carry
            (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x_train[idx], y_train[idx])
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), s, o), loss

        return jax.lax.scan(step, carry, idxs)

    @jax.jit
    def evaluate(p, s, x_test, y_test):
        logits = nnx.merge(eval_graphdef, p, s, copy=True)(x_test)
        return (optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean(),
                (logits.argmax(-1) == y_test).mean())

    return tx, chunk, evaluate


def train(data, batch: int, ghost: int, lr: float, epochs: float, seed: int, evals: int) -> dict:
    """SGD(momentum 0.9) for ``ceil(epochs * N / batch)`` steps; test metrics at ``evals`` points."""
    n = data.num_train
    steps = max(1, math.ceil(epochs * n / batch))
    tx, chunk, evaluate = programs(ghost, lr)
    _, params, stats = nnx.split(BNCNN(ghost, rngs=nnx.Rngs(seed)), nnx.Param, nnx.BatchStat)
    arrays = [jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test)]
    size = math.ceil(steps / evals)
    bounds = [*range(size, steps, size), steps]
    carry, done, curve = (params, stats, tx.init(params)), 0, []
    indices = np.stack([data.batch_indices(t, batch, seed) for t in range(steps)])
    # equal-length chunks compile once; the last, shorter one (if any) once more
    for end in bounds:
        carry, losses = chunk(carry, jnp.asarray(indices[done:end]), arrays[0], arrays[1])
        done = end
        loss, acc = evaluate(carry[0], carry[1], arrays[2], arrays[3])
        curve.append(dict(step=end, epoch=end * batch / n, train_loss=float(losses[-1]),
                          test_loss=float(loss), test_acc=float(acc)))
    return dict(steps=steps, curve=curve, final=curve[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/large_batch_gap")
    p.add_argument("--epochs", type=float, default=20.0)
    p.add_argument("--small", type=int, default=32)
    p.add_argument("--large", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evals", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None, help="settings to run (default: all)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.large % args.small:
        raise SystemExit(f"--large {args.large} must be a multiple of --small {args.small} (the ghost batch)")
    data = load_digits()
    results = {"args": vars(args), "settings": {}}
    t0 = time.perf_counter()
    for name, s in settings(args).items():
        if args.only and name not in args.only:
            continue
        runs = [train(data, s["batch"], s["ghost"], s["lr"], s["epochs"], seed, args.evals) for seed in args.seeds]
        accs = [r["final"]["test_acc"] for r in runs]
        results["settings"][name] = dict(**s, runs=runs, steps=runs[0]["steps"], test_acc_mean=float(np.mean(accs)),
                                         test_acc_std=float(np.std(accs)),
                                         test_loss_mean=float(np.mean([r["final"]["test_loss"] for r in runs])))
    results["wall_time"] = time.perf_counter() - t0
    lines = ["| setting | batch | ghost | lr | epochs | updates | test acc (mean ± std over seeds) | test loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["settings"].items():
        lines.append(f"| {name} | {r['batch']} | {r['ghost']} | {r['lr']:.3g} | {r['epochs']:g} | {r['steps']} | "
                     f"{r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f} | {r['test_loss_mean']:.4f} |")
    return write_study(results, args.out, "\n".join(lines), None if args.no_plot else plot, "large_batch_gap.png")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, r in results["settings"].items():
        for ax, key in zip(axes, ("epoch", "step")):
            xs = [c[key] for c in r["runs"][0]["curve"]]
            err = np.mean([[1 - c["test_acc"] for c in run["curve"]] for run in r["runs"]], axis=0)
            ax.plot(xs, err, marker="o", ms=3, label=f"{name} (B={r['batch']}, ghost {r['ghost']})")
    axes[0].set_xlabel("epochs")
    axes[1].set_xlabel("updates")
    axes[1].set_xscale("log")
    axes[0].set_ylabel("test error (mean over seeds)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("digits CNN: large-batch gap, sqrt lr, ghost batch norm, regime adaptation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
