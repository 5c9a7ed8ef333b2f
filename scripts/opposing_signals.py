r"""Opposing signals on digits: the paired outlier groups, their losses, and the sharpness.

    python scripts/opposing_signals.py [--out runs/opposing_signals] [--steps 600] [--lr 0.5]

Rosenfeld & Risteski, "Outliers with Opposing Signals Have an Outsized Effect
on Neural Network Optimization" (ICLR 2024), https://arxiv.org/abs/2311.04163.
An MLP (64 -> ``--hidden`` -> ``--hidden`` -> 10, relu) trained on the digits
training split by full-batch gradient descent with learning rate ``--lr``
(stability threshold 2/lr). Every step: the per-example training losses.
Every ``--sharpness-every`` steps: the top Hessian eigenvalue of the training
loss (:func:`jaxopt_lab.diagnostics.edge_of_stability`, Lanczos, 20 steps).
At step ``--identify-at`` the two opposing groups of ``--k`` examples are
found from the per-example gradients (:func:`jaxopt_lab.diagnostics.opposing_signals`)
and, for comparison, by the paper's loss-change criterion over the step before
(:func:`~jaxopt_lab.diagnostics.largest_loss_changes`). Reported: the cosine
of the groups' mean gradients, the correlation of the step-to-step changes of
the two groups' mean losses after identification (negative: they oscillate
against each other), each group's loss range, and the step at which sharpness
first reaches 2/lr. Writes ``results.json``, ``summary.md`` and
``opposing_signals.png`` (training loss, group losses, sharpness vs 2/lr) to
``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_digits
from jaxopt_lab.diagnostics import edge_of_stability, group_losses, largest_loss_changes, opposing_signals
from jaxopt_lab.models import MLP
from study_output import write_study  # scripts/ is on sys.path when run as a script


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/opposing_signals")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--identify-at", type=int, default=100)
    p.add_argument("--sharpness-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.identify_at < args.steps:
        raise SystemExit(f"--identify-at must be in [1, --steps), got {args.identify_at}")
    data = load_digits()
    x, y = jnp.asarray(data.x_train.reshape(data.num_train, -1)), jnp.asarray(data.y_train)
    graphdef, params = nnx.split(MLP(64, (args.hidden, args.hidden), 10, rngs=nnx.Rngs(args.seed)))

    def example_losses(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y)

    def one_loss(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(xi[None]), yi[None])[0]

    @jax.jit
    def gd_step(p):
        losses, vjp = jax.vjp(example_losses, p)
        (g,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
        return jax.tree.map(lambda a, b: a - args.lr * b, p, g), losses

    sharp = jax.jit(lambda p, key: edge_of_stability(lambda q: example_losses(q).mean(), p, args.lr, key))
    find = jax.jit(lambda p: opposing_signals(one_loss, p, x, y, k=args.k))
    t0 = time.perf_counter()
    history, sharpness, prev = [], [], None
    found = None
    for step in range(args.steps):
        if step % args.sharpness_every == 0:
            out = sharp(params, jax.random.key(step))
            sharpness.append((step, float(out["sharpness"])))
        if step == args.identify_at:
            found = find(params)
        params, losses = gd_step(params)  # losses: at the parameters before this step
        history.append(np.asarray(losses))
        if step == args.identify_at:
            rose, fell = largest_loss_changes(jnp.asarray(prev), losses, args.k)
        prev = losses
    losses = np.stack(history)  # (steps, N): per-example loss at step t (before update t)
    pos, neg = np.asarray(found.positive), np.asarray(found.negative)
    groups = np.asarray(group_losses(jnp.asarray(losses), [pos, neg, np.asarray(rose), np.asarray(fell)]))
    after = groups[args.identify_at:]
    d = np.diff(after, axis=0)
    corr = float(np.corrcoef(d[:, 0], d[:, 1])[0, 1])
    corr_loss_change = float(np.corrcoef(d[:, 2], d[:, 3])[0, 1])
    threshold = 2.0 / args.lr
    eos_step = next((s for s, v in sharpness if v >= 0.95 * threshold), None)
    overlap = len(set(pos.tolist() + neg.tolist()) & set(np.asarray(rose).tolist() + np.asarray(fell).tolist()))
    results = dict(
        args=vars(args), wall_time=time.perf_counter() - t0, train_loss=losses.mean(1).tolist(),
        sharpness=sharpness, threshold=threshold, eos_step=eos_step,
        positive=pos.tolist(), negative=neg.tolist(), rose=np.asarray(rose).tolist(), fell=np.asarray(fell).tolist(),
        positive_labels=np.asarray(data.y_train)[pos].tolist(), negative_labels=np.asarray(data.y_train)[neg].tolist(),
        group_cosine=float(found.cosine), diff_correlation=corr, diff_correlation_loss_change=corr_loss_change,
        group_losses=groups.tolist(), overlap_with_loss_change=overlap,
        group_loss_range=[[float(after[:, j].min()), float(after[:, j].max())] for j in range(4)],
        train_loss_final=float(losses[-1].mean()),
    )
    return write_study(results, args.out, summary(results), None if args.no_plot else plot, "opposing_signals.png")


def summary(r: dict) -> str:
    rows = [
        ("sharpness first >= 0.95 * 2/lr at step", str(r["eos_step"])),
        ("max sharpness / (2/lr)", f"{max(v for _, v in r['sharpness']) / r['threshold']:.3f}"),
        ("cosine of the groups' mean gradients (at identification)", f"{r['group_cosine']:.3f}"),
        ("corr. of step-to-step loss changes, gradient groups (+ vs -)", f"{r['diff_correlation']:.3f}"),
        ("corr. of step-to-step loss changes, loss-change groups (rose vs fell)",
         f"{r['diff_correlation_loss_change']:.3f}"),
        ("+ group loss range after identification", "{:.3f} – {:.3f}".format(*r["group_loss_range"][0])),
        ("− group loss range after identification", "{:.3f} – {:.3f}".format(*r["group_loss_range"][1])),
        ("labels of the + group", " ".join(map(str, sorted(r["positive_labels"])))),
        ("labels of the − group", " ".join(map(str, sorted(r["negative_labels"])))),
        ("examples shared by the two selections (of 2k each)", str(r["overlap_with_loss_change"])),
        ("final training loss", f"{r['train_loss_final']:.4f}"),
    ]
    return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.asarray(r["group_losses"])
    steps = np.arange(g.shape[0])
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(steps, r["train_loss"], color="k")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[1].plot(steps, g[:, 0], label=f"+ group (k={r['args']['k']}, gradients)")
    axes[1].plot(steps, g[:, 1], label="− group (gradients)")
    axes[1].plot(steps, g[:, 2], ":", label="loss rose most (paper's criterion)")
    axes[1].plot(steps, g[:, 3], ":", label="loss fell most")
    axes[1].axvline(r["args"]["identify_at"], color="gray", lw=0.8)
    axes[1].set_ylabel("group mean loss")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    s, v = zip(*r["sharpness"])
    axes[2].plot(s, v, "o-", ms=3, label="sharpness λmax")
    axes[2].axhline(r["threshold"], color="r", ls="--", label="2 / lr")
    axes[2].set_ylabel("sharpness")
    axes[2].set_xlabel("GD step")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"digits MLP, full-batch GD lr {r['args']['lr']}: opposing signals and sharpness")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
