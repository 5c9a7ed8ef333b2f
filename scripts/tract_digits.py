"""TrAct vs the same optimizer without it on digits (MLP and CNN): test accuracy per epoch.

    PYTHONPATH=$PWD python scripts/tract_digits.py [--epochs 10] [--seeds 3]

Same initialization, batches and learning rate with and without TrAct
(``scale_by_tract`` on the first layer's kernel, lambda = 0.1, the official
default); the optimizer is SGD with momentum 0.9 or Adam.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.data import load_digits
from jaxopt_lab.models import CNN, MLP
from jaxopt_lab.transforms.tract import conv_patches, scale_by_tract

FIRST = {"mlp": "layers/0/kernel", "cnn": "convs/0/kernel"}


def make_model(kind, seed):
    rngs = nnx.Rngs(seed)
    return MLP(64, (128,), 10, rngs=rngs) if kind == "mlp" else CNN(10, 1, (16, 32), rngs=rngs)


def first_input(kind, x):
    return x.reshape(x.shape[0], -1) if kind == "mlp" else conv_patches(x, (3, 3), 1, "SAME")


def run(kind, opt_name, use_tract, seed, epochs, batch, lr, data):
    model = make_model(kind, seed)
    graphdef, params = nnx.split(model, nnx.Param)
    base = optax.sgd(lr, momentum=0.9) if opt_name == "sgd" else optax.adam(lr)
    tx = optax.chain(scale_by_tract(FIRST[kind], l=0.1), base) if use_tract else base
    state = tx.init(params)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        extra = {"first_layer_input": first_input(kind, x)} if use_tract else {}
        u, s = tx.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

    @jax.jit
    def accuracy(p, x, y):
        return jnp.mean(jnp.argmax(nnx.merge(graphdef, p)(x), -1) == y)

    xtr, ytr, xte, yte = data
    n = xtr.shape[0] // batch * batch
    accs = []
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, epoch]).permutation(xtr.shape[0])[:n].reshape(-1, batch)
        for idx in perm:
            params, state = step(params, state, xtr[idx], ytr[idx])
        accs.append(float(accuracy(params, xte, yte)))
    return accs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--optimizers", default="sgd,adam")
    args = ap.parse_args()
    ds = load_digits()
    data = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
    lrs = {"sgd": 0.01, "adam": 1e-3}
    shown = sorted({1, 2, args.epochs // 2, args.epochs} - {0})
    print(f"digits, batch {args.batch}, {args.seeds} seeds; test accuracy (mean over seeds) after epoch")
    print("| model | optimizer | TrAct | " + " | ".join(f"ep {e}" for e in shown) + " |")
    print("|---|---|---|" + "---|" * len(shown))
    t0 = time.time()
    for kind in args.models.split(","):
        for opt_name in args.optimizers.split(","):
            for use in (False, True):
                accs = np.mean([run(kind, opt_name, use, s, args.epochs, args.batch, lrs[opt_name], data)
                                for s in range(args.seeds)], axis=0)
                cells = " | ".join(f"{accs[e - 1]:.3f}" for e in shown)
                print(f"| {kind} | {opt_name} (lr {lrs[opt_name]:g}) | {'yes' if use else 'no'} | {cells} |", flush=True)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
