r"""Maximal stable learning rate against batch size: measured, and the predicted curves.

    python scripts/lr_vs_batch.py [--out runs/lr_vs_batch] [--steps 100] [--batches 4 8 ... 1024]

Granziol et al., "Learning Rates as a Function of Batch Size: A Random Matrix
Theory Approach to Neural Network Training" (JMLR 2022),
https://arxiv.org/abs/2006.09092: the extremal eigenvalue of the batch Hessian
exceeds the full-data one by a term that shrinks as ``1/B``, so the maximal
stable learning rate of SGD grows linearly with the batch ``B`` (until the
full-data curvature dominates) and that of Adam as ``sqrt(B)``.

Measured: an MLP (64 -> ``--hidden`` -> 10, relu) on the digits training split,
``--steps`` steps of plain SGD (no momentum) or Adam (0.9, 0.999, eps 1e-8)
from one initialisation, batches drawn by ``ArrayDataset.batch_indices``
(seed 0), for every learning rate of a log grid (``--points-per-octave`` per
factor 2), all rates of one batch size trained together under ``jax.vmap``.
A rate is *stable* when the final full-training-set loss is finite and below
the loss at initialisation; the maximal stable rate of a batch size is the
largest grid rate below which every rate is stable.

Predicted: (a) the rule of the paper anchored at the smallest batch (linear
for SGD, square root for Adam): ``lr(B) = lr(B0) * (B / B0)`` or
``* sqrt(B / B0)``; (b) for SGD, the quadratic-model threshold ``2 / lambda_max(H_B)``
with ``lambda_max`` of the mini-batch Hessian at initialisation (Lanczos,
:func:`jaxopt_lab.diagnostics.top_eigenvalue`, averaged over
``--hessian-batches`` batches), which is what the theory's ``1/B`` term comes from.

Writes ``results.json``, ``summary.md`` and ``lr_vs_batch.png`` to ``--out``.
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
from jaxopt_lab.diagnostics import top_eigenvalue
from jaxopt_lab.models import MLP
from jaxopt_lab.schedules import predicted_max_learning_rate
from study_output import write_study  # scripts/ is on sys.path when run as a script

GRIDS = {"sgd": (2.0**-6, 2.0**8), "adam": (2.0**-12, 2.0**2)}


def make_tx(name: str, lr):
    return optax.sgd(lr) if name == "sgd" else optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


@functools.lru_cache(maxsize=None)
def program(name: str, hidden: int):
    graphdef, _ = nnx.split(MLP(64, (hidden,), 10, rngs=nnx.Rngs(0)))

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

    @jax.jit
    def sweep(params, lrs, idx, x, y):
        def one(lr):
            tx = make_tx(name, lr)

            def step(carry, i):
                p, o = carry
                g = jax.grad(loss)(p, x[i], y[i])
                u, o = tx.update(g, o, p)
                return (optax.apply_updates(p, u), o), None

            (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), idx)
            return loss(p, x, y)

        return jax.vmap(one)(lrs)

    return loss, sweep


def max_stable(lrs: np.ndarray, final: np.ndarray, initial: float) -> float:
    stable = np.isfinite(final) & (final < initial)
    if not stable[0]:
        return float("nan")
    first_bad = np.argmin(stable) if not stable.all() else len(stable)
    return float(lrs[first_bad - 1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/lr_vs_batch")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=sorted(GRIDS))
    p.add_argument("--points-per-octave", type=int, default=2)
    p.add_argument("--hessian-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    data = load_digits()
    x, y = jnp.asarray(data.x_train.reshape(data.num_train, -1)), jnp.asarray(data.y_train)
    _, params = nnx.split(MLP(64, (args.hidden,), 10, rngs=nnx.Rngs(args.seed)))
    t0 = time.perf_counter()
    results = {"args": vars(args), "optimizers": {}}
    for name in args.optimizers:
        lo, hi = GRIDS[name]
        n = int(round(math.log2(hi / lo) * args.points_per_octave)) + 1
        lrs = np.geomspace(lo, hi, n)
        loss, sweep = program(name, args.hidden)
        initial = float(loss(params, x, y))
        rows = []
        for b in args.batches:
            idx = jnp.asarray(np.stack([data.batch_indices(t, b, args.seed) for t in range(args.steps)]))
            final = np.asarray(sweep(params, jnp.asarray(lrs, jnp.float32), idx, x, y))
            rows.append(dict(batch=b, max_stable_lr=max_stable(lrs, final, initial), final_losses=final.tolist()))
        anchor = rows[0]["max_stable_lr"]
        rule = "linear" if name == "sgd" else "sqrt"
        predicted = predicted_max_learning_rate(args.batches, args.batches[0], anchor, rule)
        for r, pred in zip(rows, predicted):
            r["predicted_" + rule] = pred
        results["optimizers"][name] = dict(lrs=lrs.tolist(), initial_loss=initial, rule=rule, rows=rows)
    if "sgd" in args.optimizers and args.hessian_batches:
        loss, _ = program("sgd", args.hidden)
        eig = jax.jit(lambda p, xb, yb, k: top_eigenvalue(lambda q: loss(q, xb, yb), p, k, num_iters=20))
        for r in results["optimizers"]["sgd"]["rows"]:
            b = r["batch"]
            lams = []
            for j in range(args.hessian_batches):
                i = data.batch_indices(j, b, args.seed)
                lams.append(float(eig(params, x[i], y[i], jax.random.key(j))))
            r["lambda_max"] = float(np.mean(lams))
            r["predicted_2_over_lambda"] = 2.0 / r["lambda_max"]
        results["lambda_max_full"] = float(eig(params, x, y, jax.random.key(0)))
    results["wall_time"] = time.perf_counter() - t0
    return write_study(results, args.out, summary(results), None if args.no_plot else plot, "lr_vs_batch.png")


def summary(results: dict) -> str:
    opts = results["optimizers"]
    head = ["batch"]
    for name, o in opts.items():
        head += [f"{name}: max stable lr", f"{name}: {o['rule']} rule"]
    if "lambda_max_full" in results:
        head += ["sgd: λmax(H_B) at init", "sgd: 2/λmax"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    batches = [r["batch"] for r in next(iter(opts.values()))["rows"]]
    for k, b in enumerate(batches):
        cells = [str(b)]
        for name, o in opts.items():
            r = o["rows"][k]
            cells += [f"{r['max_stable_lr']:.3g}", f"{r['predicted_' + o['rule']]:.3g}"]
        if "lambda_max_full" in results:
            r = opts["sgd"]["rows"][k]
            cells += [f"{r['lambda_max']:.3g}", f"{r['predicted_2_over_lambda']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    if "lambda_max_full" in results:
        lines.append(f"\nfull training set: λmax(H) = {results['lambda_max_full']:.3g}, "
                     f"2/λmax = {2 / results['lambda_max_full']:.3g}")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = results["optimizers"]
    fig, axes = plt.subplots(1, len(opts), figsize=(5.5 * len(opts), 4), squeeze=False)
    for ax, (name, o) in zip(axes[0], opts.items()):
        b = [r["batch"] for r in o["rows"]]
        ax.plot(b, [r["max_stable_lr"] for r in o["rows"]], "o-", label="measured max stable lr")
        ax.plot(b, [r["predicted_" + o["rule"]] for r in o["rows"]], "--", label=f"{o['rule']} rule from B={b[0]}")
        if "lambda_max" in o["rows"][0]:
            ax.plot(b, [r["predicted_2_over_lambda"] for r in o["rows"]], ":", label="2 / λmax(batch Hessian at init)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{name}, digits MLP, {results['args']['steps']} steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
