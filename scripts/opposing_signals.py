r"""Opposing signals on digits or text: the paired outlier groups, their losses, and the sharpness.

    python scripts/opposing_signals.py [--data digits|text] [--out DIR] [--steps 600] [--lr LR]

Rosenfeld & Risteski, "Outliers with Opposing Signals Have an Outsized Effect
on Neural Network Optimization" (ICLR 2024), https://arxiv.org/abs/2311.04163.
Full-batch gradient descent with learning rate ``--lr`` (stability threshold
2/lr) on one of:

* ``--data digits`` (lr 0.5 by default): an MLP (64 -> ``--hidden`` ->
  ``--hidden`` -> 10, relu) on the digits training split; an example is an image.
* ``--data text`` (lr 0.05 by default): a byte-level GPT (``--layers`` blocks,
  width ``--width``, 2 heads) on ``--windows`` windows of ``--context`` bytes
  drawn at random from the package's text corpus (Python's docs, the shipped
  snapshot); an example is one predicted byte, so the groups are tokens in
  their contexts. The gradient diagnostic stacks the gradients of
  ``--grad-tokens`` of them drawn at random (memory: that many x params).

Every step: the per-example training losses.
Every ``--sharpness-every`` steps: the top Hessian eigenvalue of the training
loss (:func:`jaxopt_lab.diagnostics.edge_of_stability`, Lanczos, 20 steps).
At step ``--identify-at`` the two opposing groups of ``--k`` examples are
found from the per-example gradients (:func:`jaxopt_lab.diagnostics.opposing_signals`)
and, for comparison, by the paper's loss-change criterion over the step before
(:func:`~jaxopt_lab.diagnostics.largest_loss_changes`). Reported: the cosine
of the groups' mean gradients, the correlation of the step-to-step changes of
the two groups' mean losses after identification (negative: they oscillate
against each other), each group's loss range, what the groups hold (labels,
or target bytes), the largest one-step rise of the training loss, and the
step at which sharpness first reaches 2/lr. Writes ``results.json``,
``summary.md`` and ``opposing_signals.png`` (training loss, group losses,
sharpness vs 2/lr) to ``--out`` (default ``runs/opposing_signals``, with
``_text`` for text).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_digits, load_text
from jaxopt_lab.diagnostics import edge_of_stability, group_losses, largest_loss_changes, opposing_signals
from jaxopt_lab.models import GPT, MLP
from study_output import write_study  # scripts/ is on sys.path when run as a script


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("digits", "text"), default="digits")
    p.add_argument("--out", default=None, help="default runs/opposing_signals (digits), runs/opposing_signals_text")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=None, help=f"default {DEFAULT_LR}")
    p.add_argument("--hidden", type=int, default=64, help="digits: MLP width")
    p.add_argument("--windows", type=int, default=64, help="text: training windows (full batch)")
    p.add_argument("--context", type=int, default=32, help="text: bytes per window")
    p.add_argument("--width", type=int, default=32, help="text: GPT width")
    p.add_argument("--layers", type=int, default=2, help="text: GPT blocks")
    p.add_argument("--grad-tokens", type=int, default=1024,
                   help="text: tokens (drawn at random) whose gradients the diagnostic stacks (memory: this x params)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--identify-at", type=int, default=100)
    p.add_argument("--sharpness-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.data]
    if args.out is None:
        args.out = "runs/opposing_signals" + ("_text" if args.data == "text" else "")
    if not 1 <= args.identify_at < args.steps:
        raise SystemExit(f"--identify-at must be in [1, --steps), got {args.identify_at}")
    if args.lr <= 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")
    problem = digits_problem(args) if args.data == "digits" else text_problem(args)
    example_losses, one_loss, params, gx, gy, gidx = problem["example_losses"], problem["one_loss"], \
        problem["params"], problem["grad_x"], problem["grad_y"], problem["grad_index"]

    @jax.jit
    def gd_step(p):
        losses, vjp = jax.vjp(example_losses, p)
        (g,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
        return jax.tree.map(lambda a, b: a - args.lr * b, p, g), losses

    sharp = jax.jit(lambda p, key: edge_of_stability(lambda q: example_losses(q).mean(), p, args.lr, key))
    find = jax.jit(lambda p: opposing_signals(one_loss, p, gx, gy, k=args.k))
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
    # the gradient groups index the diagnostic's examples (a subsample of the tokens for text): as examples
    pos, neg = gidx[np.asarray(found.positive)], gidx[np.asarray(found.negative)]
    rose, fell = np.asarray(rose), np.asarray(fell)
    groups = np.asarray(group_losses(jnp.asarray(losses), [pos, neg, rose, fell]))
    after = groups[args.identify_at:]
    d = np.diff(after, axis=0)
    corr = float(np.corrcoef(d[:, 0], d[:, 1])[0, 1])
    corr_loss_change = float(np.corrcoef(d[:, 2], d[:, 3])[0, 1])
    threshold = 2.0 / args.lr
    eos_step = next((s for s, v in sharpness if v >= 0.95 * threshold), None)
    overlap = len(set(pos.tolist() + neg.tolist()) & set(rose.tolist() + fell.tolist()))
    label = problem["label"]
    train_loss = losses.mean(1)
    results = dict(
        args=vars(args), wall_time=time.perf_counter() - t0, train_loss=train_loss.tolist(),
        sharpness=sharpness, threshold=threshold, eos_step=eos_step,
        positive=pos.tolist(), negative=neg.tolist(), rose=rose.tolist(), fell=fell.tolist(),
        positive_labels=[label(i) for i in pos], negative_labels=[label(i) for i in neg],
        rose_labels=[label(i) for i in rose], fell_labels=[label(i) for i in fell],
        group_cosine=float(found.cosine), diff_correlation=corr, diff_correlation_loss_change=corr_loss_change,
        group_losses=groups.tolist(), overlap_with_loss_change=overlap,
        group_loss_range=[[float(after[:, j].min()), float(after[:, j].max())] for j in range(4)],
        train_loss_final=float(train_loss[-1]),
        largest_loss_spike=float(np.max(np.diff(train_loss), initial=0.0)),
    )
    if args.data == "text":
        results["contexts"] = {name: [problem["context_of"](i) for i in idx[:5]]
                               for name, idx in (("positive", pos), ("negative", neg))}
    return write_study(results, args.out, summary(results), None if args.no_plot else plot, "opposing_signals.png")


DEFAULT_LR = {"digits": 0.5, "text": 0.05}


def digits_problem(args) -> dict:
    """An MLP on the digits training split; an example is an image."""
    data = load_digits()
    x, y = jnp.asarray(data.x_train.reshape(data.num_train, -1)), jnp.asarray(data.y_train)
    graphdef, params = nnx.split(MLP(64, (args.hidden, args.hidden), 10, rngs=nnx.Rngs(args.seed)))

    def example_losses(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y)

    def one_loss(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(xi[None]), yi[None])[0]

    labels = np.asarray(data.y_train)
    return dict(example_losses=example_losses, one_loss=one_loss, params=params, grad_x=x, grad_y=y,
                grad_index=np.arange(x.shape[0]), label=lambda i: int(labels[i]))


def text_problem(args) -> dict:
    """A byte-level GPT on ``--windows`` random windows of the package's text corpus (Python's docs);
    an example is one predicted byte (window, position): ``windows x context`` of them, all in every step.
    The gradient diagnostic stacks the gradients of ``--grad-tokens`` of them, drawn at random."""
    n = args.windows * args.context
    if not 2 * args.k <= args.grad_tokens <= n:
        raise SystemExit(f"--grad-tokens must be in [2 * --k, windows * context] = [{2 * args.k}, {n}], "
                         f"got {args.grad_tokens}")
    corpus = load_text(context=args.context)
    rng = np.random.default_rng(args.seed)
    starts = rng.choice(corpus.train.shape[0] - args.context - 1, size=args.windows, replace=False)
    window = starts[:, None] + np.arange(args.context + 1)
    tokens = corpus.train[window].astype(np.int32)
    x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    graphdef, params = nnx.split(GPT(vocab_size=256, layers=args.layers, width=args.width, heads=2,
                                     context=args.context, rngs=nnx.Rngs(args.seed)))

    def example_losses(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).reshape(-1)

    def one_loss(p, xi, yi):  # xi: the (T,) window, yi: (position, target byte)
        logits = nnx.merge(graphdef, p)(xi[None])[0, yi[0]]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[1])

    sub = np.sort(rng.choice(n, size=args.grad_tokens, replace=False))
    w, t = sub // args.context, sub % args.context
    flat_y = tokens[:, 1:].reshape(-1)

    def context_of(i):  # the last bytes the model sees, then the byte it must predict
        wi, ti = divmod(int(i), args.context)
        seen = bytes(tokens[wi, max(0, ti - 11): ti + 1].astype(np.uint8)).decode("latin-1")
        return f"{seen!r} -> {chr(flat_y[i])!r}"

    return dict(example_losses=example_losses, one_loss=one_loss, params=params,
                grad_x=x[w], grad_y=jnp.asarray(np.stack([t, flat_y[sub]], 1)), grad_index=sub,
                label=lambda i: chr(int(flat_y[i])), context_of=context_of)


def _labels(labels: list) -> str:
    """Digits: the sorted class labels; text: each target byte with its count, most frequent first."""
    if all(isinstance(v, int) for v in labels):
        return " ".join(map(str, sorted(labels)))
    return ", ".join(f"{b!r} x{c}" for b, c in Counter(labels).most_common())


def summary(r: dict) -> str:
    what = "labels" if r["args"].get("data", "digits") == "digits" else "target bytes"
    rows = [
        ("sharpness first >= 0.95 * 2/lr at step", str(r["eos_step"])),
        ("max sharpness / (2/lr)", f"{max(v for _, v in r['sharpness']) / r['threshold']:.3f}"),
        ("cosine of the groups' mean gradients (at identification)", f"{r['group_cosine']:.3f}"),
        ("corr. of step-to-step loss changes, gradient groups (+ vs -)", f"{r['diff_correlation']:.3f}"),
        ("corr. of step-to-step loss changes, loss-change groups (rose vs fell)",
         f"{r['diff_correlation_loss_change']:.3f}"),
        ("+ group loss range after identification", "{:.3f} – {:.3f}".format(*r["group_loss_range"][0])),
        ("− group loss range after identification", "{:.3f} – {:.3f}".format(*r["group_loss_range"][1])),
        (f"{what} of the + group", _labels(r["positive_labels"])),
        (f"{what} of the − group", _labels(r["negative_labels"])),
        ("examples shared by the two selections (of 2k each)", str(r["overlap_with_loss_change"])),
        ("final training loss", f"{r['train_loss_final']:.4f}"),
        ("largest one-step rise of the training loss", f"{r['largest_loss_spike']:.4f}"),
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
    a = r["args"]
    model = ("digits MLP" if a.get("data", "digits") == "digits" else
             f"byte-level GPT ({a['layers']} blocks, width {a['width']}) on {a['windows']}x{a['context']} bytes of text")
    fig.suptitle(f"{model}, full-batch GD lr {a['lr']}: opposing signals and sharpness", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
