"""Gradient leakage through a sketched gradient, and the Gaussian noise that stops it (Song et al. 2023).

    python scripts/sketch_gradient_attack.py [--images 8] [--steps 1500] [--restarts 4] [--out docs/sketch_gradient_attack.png]

Setting (the paper's Section on vulnerability, on the 8x8 digits that ship with
scikit-learn): a worker computes the gradient of a 64-32-10 sigmoid MLP (fixed
random init) on ONE private image and sends the sketch ``R g`` of it
(``jaxopt_lab.distributed.compression.sketch``; Gaussian R with 25% rows per
tensor). The server knows the shared seed, hence R, and runs the gradient
matching attack (Zhu et al., "Deep Leakage from Gradients", 2019): it looks for
an image x' and a soft label y' whose sketched gradient matches what it received,

    min_{x', y'} || desk(sk(grad L(x', y'))) - received ||^2 ,

with Adam from ``--restarts`` random starts per image, keeping the start with the
smallest matching loss (which the attacker can see). Rows of the table: the plain
gradient (no sketch), the sketched gradient, the sketch of the clipped gradient
plus Gaussian noise of a small sigma, and the (epsilon, delta)-DP noise of
``dp_sigma`` (Gaussian mechanism). The reported error is the per-pixel MSE of the
best reconstruction against the private image, next to the MSE of guessing the
mean digit (what an attacker knows without any gradient).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.data.digits import load_digits
from jaxopt_lab.distributed.compression import dp_sigma, identity, sketch


def init_mlp(key, sizes=(64, 32, 10)):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        params.append({"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros((b,))})
    return params


def loss_fn(params, x, y_soft):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.sigmoid(h)
    return -jnp.sum(y_soft * jax.nn.log_softmax(h))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--epsilon", type=float, default=0.9)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--small-sigma", type=float, default=0.01)
    ap.add_argument("--out", default="docs/sketch_gradient_attack.png")
    args = ap.parse_args()
    t0 = time.time()

    data = load_digits()
    xs = jnp.asarray(data.x_test[: args.images].reshape(args.images, 64))
    ys = jax.nn.one_hot(jnp.asarray(data.y_test[: args.images]), 10)
    mean_digit = jnp.asarray(data.x_train.reshape(-1, 64).mean(0))
    params = init_mlp(jax.random.key(0))
    step = jnp.int32(0)
    sigma_dp = dp_sigma(args.epsilon, args.delta, args.clip)

    # (name, what the worker sends, what the attacker maps its candidates through: same seed, no noise)
    settings = [
        ("plain gradient", identity(), identity()),
        (f"sketch {args.ratio:g}", sketch("gaussian", args.ratio, seed=1), sketch("gaussian", args.ratio, seed=1)),
        (f"sketch + clip {args.clip:g} + noise sigma={args.small_sigma:g}",
         sketch("gaussian", args.ratio, seed=1, clip_norm=args.clip, noise_sigma=args.small_sigma),
         sketch("gaussian", args.ratio, seed=1, clip_norm=args.clip)),
        (f"sketch + DP (eps={args.epsilon:g}, delta={args.delta:g}: sigma={sigma_dp:.2f})",
         sketch("gaussian", args.ratio, seed=1, dp=(args.epsilon, args.delta), clip_norm=args.clip),
         sketch("gaussian", args.ratio, seed=1, clip_norm=args.clip)),
    ]

    def attack(sender, attacker, x, y, key):
        g = jax.grad(loss_fn)(params, x, y)
        received, _, _ = sender.compress(g, sender.init(g), jax.random.fold_in(key, 7), step)

        def match(z):
            xp, yp = jax.nn.sigmoid(z["x"]), jax.nn.softmax(z["y"])
            gp = jax.grad(loss_fn)(params, xp, yp)
            dec, _, _ = attacker.compress(gp, attacker.init(gp), key, step)
            return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(received)))

        opt = optax.adam(0.05)

        def one_start(k):
            z = {"x": jax.random.normal(k, (64,)), "y": jax.random.normal(jax.random.fold_in(k, 1), (10,))}

            def body(carry, _):
                z, s = carry
                val, grad = jax.value_and_grad(match)(z)
                u, s = opt.update(grad, s, z)
                return (optax.apply_updates(z, u), s), val

            (z, _), _ = jax.lax.scan(body, (z, opt.init(z)), None, length=args.steps)
            return jax.nn.sigmoid(z["x"]), match(z)

        recs, losses = jax.vmap(one_start)(jax.random.split(key, args.restarts))
        return recs[jnp.argmin(losses)]

    keys = jax.random.split(jax.random.key(42), args.images)
    rows = []
    print(f"{'setting':<62} {'MSE (mean over images)':>22} {'images with MSE < 0.01':>23}")
    for name, sender, attacker in settings:
        rec = jax.jit(jax.vmap(lambda x, y, k: attack(sender, attacker, x, y, k)))(xs, ys, keys)
        mse = np.asarray(jnp.mean((rec - xs) ** 2, axis=1))
        rows.append((name, np.asarray(rec)))
        print(f"{name:<62} {mse.mean():>22.4f} {int((mse < 0.01).sum()):>17d} / {args.images}")
    base = float(jnp.mean((mean_digit[None] - xs) ** 2))
    print(f"{'guess: the mean training digit':<62} {base:>22.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrow = len(rows) + 1
    fig, axes = plt.subplots(nrow, args.images, figsize=(1.1 * args.images + 2.6, 1.2 * nrow))
    for j in range(args.images):
        axes[0, j].imshow(np.asarray(xs[j]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        for i, (_, rec) in enumerate(rows):
            axes[i + 1, j].imshow(rec[j].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    labels = ["private image"] + [name.replace(" + ", "\n+ ").replace(": ", ":\n") for name, _ in rows]
    for i, lab in enumerate(labels):
        axes[i, 0].set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Gradient matching attack on one digit's (sketched) gradient, 64-32-10 MLP", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
