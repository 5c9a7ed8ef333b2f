r"""Learning-rate sensitivity of small GPTs at three widths, with and without qk-layernorm + z-loss.

    python scripts/instability_proxies.py [--out runs/instability_proxies] [--widths 32 64 128] [--steps 200]

Wortsman et al., "Small-scale proxies for large-scale Transformer training
instabilities" (ICLR 2024), https://arxiv.org/abs/2309.14322, at laptop scale:
byte-level GPTs (``--layers`` blocks, ``--heads`` heads, context ``--context``)
of widths ``--widths`` on the shipped text corpus, AdamW (b1 0.9, b2 0.95, eps
1e-8, no weight decay, global-norm clipping off), linear warm-up over 10% of
``--steps`` then cosine decay to 0, batch ``--batch`` windows, for every
learning rate of ``--lrs``; all rates of one (width, mitigation) trained
together under ``jax.vmap`` from the same initialisation and batches.

* ``baseline``: plain GPT, cross-entropy loss.
* ``qk_ln+z``: ``GPT(qk_layernorm=True)`` and z-loss ``1e-4 * mean(log Z^2)``
  (:func:`jaxopt_lab.losses.z_loss`) added to the training loss.

Per run: the final validation cross-entropy (first ``--val-windows`` windows of
the validation split), and at the end of training the instability monitors of
:mod:`jaxopt_lab.diagnostics.instability` on one training batch: the largest
attention logit over blocks/heads (``attn_logit_max``) and the mean log Z of the
output logits. Per (width, mitigation): the LR sensitivity (Eq. 1: the mean
over the sweep of ``min(loss, loss at init) - best loss``). Writes
``results.json``, ``summary.md`` and ``instability_proxies.png`` (final loss vs
learning rate per width; attention-logit max vs learning rate; LR sensitivity
vs width) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_text
from jaxopt_lab.diagnostics import instability_metrics, lr_sensitivity
from jaxopt_lab.losses import z_loss
from jaxopt_lab.models import GPT
from study_output import write_study  # scripts/ is on sys.path when run as a script

VARIANTS = {"baseline": dict(qk_layernorm=False, z_loss=0.0), "qk_ln+z": dict(qk_layernorm=True, z_loss=1e-4)}


def build(width: int, args, qk_layernorm: bool, seed: int):
    return GPT(vocab_size=256, layers=args.layers, width=width, heads=args.heads, context=args.context,
               qk_layernorm=qk_layernorm, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=None)
def program(width: int, layers: int, heads: int, context: int, qk_layernorm: bool, z_weight: float, steps: int):
    graphdef, _ = nnx.split(GPT(vocab_size=256, layers=layers, width=width, heads=heads, context=context,
                                qk_layernorm=qk_layernorm, rngs=nnx.Rngs(0)))

    def ce(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    def train_loss(p, x, y):
        loss, logits = ce(p, x, y)
        return loss + (z_loss(logits, z_weight) if z_weight else 0.0)

    @jax.jit
    def sweep(params, lrs, xs, ys, x_val, y_val):
        def one(lr):
            unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 10), steps, 0.0)
            sched = lambda t: lr * unit(t)  # noqa: E731 (lr is traced: scale a unit schedule)
            tx = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)

            def step(carry, batch):
                p, o = carry
                g = jax.grad(train_loss)(p, *batch)
                u, o = tx.update(g, o, p)
                return (optax.apply_updates(p, u), o), None

            (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
            monitors = instability_metrics(nnx.merge(graphdef, p), xs[-1])
            return ce(p, x_val, y_val)[0], monitors

        return jax.lax.map(one, lrs) if lrs.shape[0] > 64 else jax.vmap(one)(lrs)

    @jax.jit
    def initial(params, x_val, y_val):
        return ce(params, x_val, y_val)[0], instability_metrics(nnx.merge(graphdef, params), x_val)

    return sweep, initial


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/instability_proxies")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    data = load_text(context=args.context)
    xs, ys = map(np.stack, zip(*(data.batch(t, args.batch, args.seed) for t in range(args.steps))))
    x_val, y_val = next(data.eval_batches(args.val_windows, max_batches=1))
    xs, ys, x_val, y_val = map(jnp.asarray, (xs, ys, x_val, y_val))
    lrs = jnp.asarray(args.lrs, jnp.float32)
    t0 = time.perf_counter()
    results = {"args": vars(args), "runs": {}}
    for width in args.widths:
        for name in args.variants:
            v = VARIANTS[name]
            sweep, initial = program(width, args.layers, args.heads, args.context, v["qk_layernorm"], v["z_loss"],
                                     args.steps)
            _, params = nnx.split(build(width, args, v["qk_layernorm"], args.seed))
            loss0, _ = initial(params, x_val, y_val)
            final, monitors = sweep(params, lrs, xs, ys, x_val, y_val)
            final = np.asarray(final, np.float64)
            results["runs"][f"{name}/w{width}"] = dict(
                variant=name, width=width, initial_loss=float(loss0), final_losses=final.tolist(),
                attn_logit_max=np.asarray(monitors["attn_logit_max"]).tolist(),
                log_z_mean=np.asarray(monitors["log_z_mean"]).tolist(),
                lr_sensitivity=lr_sensitivity(final, float(loss0)), best_loss=float(np.nanmin(final)))
            print(f"{name} width {width}: LRS {results['runs'][f'{name}/w{width}']['lr_sensitivity']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    results["wall_time"] = time.perf_counter() - t0
    return write_study(results, args.out, summary(results), None if args.no_plot else plot, "instability_proxies.png")


def summary(results: dict) -> str:
    lrs = results["args"]["lrs"]
    head = ["variant", "width", "LR sensitivity", "best val loss"] + [f"loss @ {lr:g}" for lr in lrs] + [
        "max attn logit @ largest lr", "log Z mean @ largest lr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"].values():
        cells = [r["variant"], str(r["width"]), f"{r['lr_sensitivity']:.3f}", f"{r['best_loss']:.3f}"]
        cells += [f"{v:.3f}" if np.isfinite(v) else "nan" for v in r["final_losses"]]
        cells += [f"{r['attn_logit_max'][-1]:.3g}", f"{r['log_z_mean'][-1]:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = results["args"]["lrs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"baseline": "-", "qk_ln+z": "--"}
    for r in results["runs"].values():
        label = f"{r['variant']}, width {r['width']}"
        axes[0].plot(lrs, np.minimum(np.nan_to_num(r["final_losses"], nan=r["initial_loss"]), r["initial_loss"]),
                     styles[r["variant"]], marker="o", ms=3, label=label)
        axes[1].plot(lrs, r["attn_logit_max"], styles[r["variant"]], marker="o", ms=3, label=label)
    for variant in styles:
        rows = [r for r in results["runs"].values() if r["variant"] == variant]
        if rows:
            axes[2].plot([r["width"] for r in rows], [r["lr_sensitivity"] for r in rows], styles[variant], marker="o",
                         label=variant)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
    axes[0].set_ylabel("final val loss (capped at the initial loss)")
    axes[1].set_ylabel("max |attention logit| at the end")
    axes[1].set_yscale("log")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("width")
    axes[2].set_ylabel("LR sensitivity")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
