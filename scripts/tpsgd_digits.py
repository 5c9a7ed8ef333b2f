"""tpSGD (backprop-free, layer-wise, random target projections) vs backprop SGD on digits: accuracy and memory.

    PYTHONPATH=$PWD python scripts/tpsgd_digits.py [--epochs 20] [--seeds 2]

An MLP 64-256-256-10 (relu). Backprop: SGD on the cross-entropy's full
gradient. tpSGD: the hidden layers get their local target-projection
gradients (``tpsgd``), the output layer the cross-entropy's gradient with its
input held fixed; one forward pass, no backward pass through the network.
Both: SGD with momentum 0.9, batch 32, the learning rates listed (tpSGD's
accuracy from its layer-by-layer step, the same update as the transform's).
Then the same comparison for a small CNN (two 3x3 conv layers, hidden for
tpSGD, their local gradients from ``conv_patches``). Memory: XLA's
compiled memory analysis (temporary buffers) of one training step at batch
8192 with L hidden layers of 512, against depth: the part of the step's
memory that holds the activations a backward pass needs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.data import load_digits
from jaxopt_lab.transforms.tpsgd import target_projection_grad, tpsgd
from jaxopt_lab.transforms.tract import conv_patches


def init_mlp(sizes, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    return {"layers": [{"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
                       for k, a, b in zip(keys, sizes[:-1], sizes[1:])]}


def forward(p, x):
    h = x.reshape(x.shape[0], -1)
    for layer in p["layers"][:-1]:
        h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
    return h @ p["layers"][-1]["kernel"] + p["layers"][-1]["bias"]


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps(num_hidden, lr_bp, lr_tp):
    hidden = [f"layers/{i}" for i in range(num_hidden)]
    tx_bp = optax.sgd(lr_bp, momentum=0.9)
    tx_tp = tpsgd(lr_tp, hidden, num_classes=10, momentum=0.9)
    sgd_part = optax.sgd(lr_tp, momentum=0.9)  # tpsgd's second link, for the layer-by-layer step

    def bp_step(p, s, x, y):
        g = jax.grad(lambda q: ce(forward(q, x), y))(p)
        u, s = tx_bp.update(g, s, p)
        return optax.apply_updates(p, u), s

    def tp_step(p, s, x, y):
        h = x.reshape(x.shape[0], -1)
        inputs, preacts = [], []
        for layer in p["layers"][:-1]:  # forward only: no gradient flows through these
            a = h @ layer["kernel"] + layer["bias"]
            inputs.append(h)
            preacts.append(a)
            h = jax.nn.relu(a)
        g_out = jax.grad(lambda q: ce(h @ q["kernel"] + q["bias"], y))(p["layers"][-1])  # the output layer, locally
        # the hidden layers' entries are placeholders (the transform replaces them): the params, no new buffer
        g = {"layers": list(p["layers"][:-1]) + [g_out]}
        u, s = tx_tp.update(g, s, p, layer_inputs=inputs, layer_preacts=preacts, labels=y)
        return optax.apply_updates(p, u), s

    def tp_stream_step(p, s, x, y):
        """The same update, each hidden layer's local gradient formed as soon as its output exists.

        An optimization barrier ties the layer's output to its gradient, so the
        next layer starts after it and the layer's input can be freed.
        """
        projections = s[0].projections["layers"]
        h = x.reshape(x.shape[0], -1)
        local, y_l = [], y
        for i, layer in enumerate(p["layers"][:-1]):
            a = h @ layer["kernel"] + layer["bias"]
            g_w, g_b = target_projection_grad(h, a, y_l, projections[i]["kernel"])
            # (the labels go through too: else every layer's target onehot(y) B_l, which needs no
            # activation, is formed up front and held)
            h, g_w, g_b, y_l = jax.lax.optimization_barrier((jax.nn.relu(a), g_w, g_b, y_l))
            local.append({"kernel": g_w, "bias": g_b})
        g_out = jax.grad(lambda q: ce(h @ q["kernel"] + q["bias"], y))(p["layers"][-1])
        # the transform's SGD part (its replacement of the hidden leaves is done above)
        u, inner = sgd_part.update({"layers": local + [g_out]}, s[1], p)
        return optax.apply_updates(p, u), (s[0], inner)

    return (tx_bp, bp_step), (tx_tp, tp_step), tp_stream_step


def temp_bytes(step, tx, sizes, batch):
    p = init_mlp(sizes, 0)
    args = (p, tx.init(p), jnp.zeros((batch, sizes[0])), jnp.zeros((batch,), jnp.int32))
    m = jax.jit(step).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes


def train(step, tx, params, forward, seed, epochs, data, batch=32):
    """Test accuracy after each epoch of ``step`` from ``params`` (``forward(params, x)`` gives the logits)."""
    xtr, ytr, xte, yte = data
    p = params
    s = tx.init(p)
    step = jax.jit(step)
    acc = jax.jit(lambda p: jnp.mean(jnp.argmax(forward(p, xte), -1) == yte))
    n = xtr.shape[0] // batch * batch
    out = []
    for epoch in range(epochs):
        for idx in np.random.default_rng([seed, epoch]).permutation(xtr.shape[0])[:n].reshape(-1, batch):
            p, s = step(p, s, xtr[idx], ytr[idx])
        out.append(float(acc(p)))
    return out


# --- a CNN: conv3x3(16) -> tanh -> avgpool 2 -> conv3x3(32) -> tanh -> avgpool 2 -> flatten -> dense(10)
# (tanh, as DRTP's networks: with relu the random targets, half of them negative, kill the conv units)


def init_cnn(seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"layers": [{"kernel": jax.random.normal(k[0], (3, 3, 1, 16)) / 3.0, "bias": jnp.zeros(16)},
                       {"kernel": jax.random.normal(k[1], (3, 3, 16, 32)) / 12.0, "bias": jnp.zeros(32)},
                       {"kernel": jax.random.normal(k[2], (128, 10)) / np.sqrt(128), "bias": jnp.zeros(10)}]}


def _pool(h):
    return jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "SAME") / 4.0


def cnn_forward(p, x):
    h = x
    for layer in p["layers"][:-1]:
        h = _pool(jnp.tanh(jax.lax.conv_general_dilated(h, layer["kernel"], (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer["bias"]))
    return h.reshape(h.shape[0], -1) @ p["layers"][-1]["kernel"] + p["layers"][-1]["bias"]


def make_cnn_steps(lr):
    tx_bp = optax.sgd(lr, momentum=0.9)
    tx_tp = tpsgd(lr, ["layers/0", "layers/1"], num_classes=10, activation="tanh", momentum=0.9)

    def bp_step(p, s, x, y):
        g = jax.grad(lambda q: ce(cnn_forward(q, x), y))(p)
        u, s = tx_bp.update(g, s, p)
        return optax.apply_updates(p, u), s

    def tp_step(p, s, x, y):
        h, inputs, preacts = x, [], []
        for layer in p["layers"][:-1]:
            patches = conv_patches(h, (3, 3), 1, "SAME")
            a = (patches @ layer["kernel"].reshape(-1, layer["kernel"].shape[-1])).reshape(*h.shape[:3], -1)
            a = a + layer["bias"]
            inputs.append(patches)
            preacts.append(a)
            h = _pool(jnp.tanh(a))
        feats = h.reshape(h.shape[0], -1)
        g_out = jax.grad(lambda q: ce(feats @ q["kernel"] + q["bias"], y))(p["layers"][-1])
        u, s = tx_tp.update({"layers": list(p["layers"][:-1]) + [g_out]}, s, p, layer_inputs=inputs,
                            layer_preacts=preacts, labels=y)
        return optax.apply_updates(p, u), s

    return (tx_bp, bp_step), (tx_tp, tp_step)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--cnn-epochs", type=int, default=10)
    args = ap.parse_args()
    ds = load_digits()
    data = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
    t0 = time.time()
    print(f"compiled step temporaries (XLA memory analysis, MiB), MLP 64-512x L-10, batch 8192 "
          f"(one activation {8192 * 512 * 4 / 2**20:.0f} MiB)")
    print("| hidden layers L | backprop SGD | tpSGD via the transform's extras | tpSGD layer by layer |")
    print("|---|---|---|---|")
    for depth in (1, 3, 6, 12):
        (txb, bps), (txt, tps), tss = make_steps(depth, 0.05, 0.01)
        wide = (64,) + (512,) * depth + (10,)
        mb, mt, ms = (temp_bytes(f, tx, wide, 8192) / 2**20 for f, tx in ((bps, txb), (tps, txt), (tss, txt)))
        print(f"| {depth} | {mb:.1f} | {mt:.1f} | {ms:.1f} |", flush=True)
    sizes = (64, 256, 256, 10)
    shown = sorted({e for e in (1, 5, args.epochs // 2, args.epochs) if 1 <= e <= args.epochs})
    print(f"digits, MLP {'-'.join(map(str, sizes))}, batch 32, momentum 0.9, {args.seeds} seeds: test accuracy after epoch")
    print("| method | lr | " + " | ".join(f"ep {e}" for e in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for name, lr in (("backprop SGD", 0.05), ("backprop SGD", 0.01), ("tpSGD", 0.05), ("tpSGD", 0.01), ("tpSGD", 0.002)):
        (txb, bps), (txt, tps), tss = make_steps(2, lr, lr)
        step, tx = (bps, txb) if name.startswith("backprop") else (tss, txt)
        accs = np.mean([train(step, tx, init_mlp(sizes, s), forward, s, args.epochs, data) for s in range(args.seeds)], axis=0)
        print(f"| {name} | {lr:g} | " + " | ".join(f"{accs[e - 1]:.3f}" for e in shown) + " |", flush=True)
    if args.cnn_epochs:
        shown = sorted({e for e in (1, 5, args.cnn_epochs // 2, args.cnn_epochs) if 1 <= e <= args.cnn_epochs})
        print(f"digits, CNN conv16-conv32-flatten-dense10 (tanh, avg-pool), batch 32, momentum 0.9, {args.seeds} seeds")
        print("| method | lr | " + " | ".join(f"ep {e}" for e in shown) + " |")
        print("|---|---|" + "---|" * len(shown))
        for lr in (0.05, 0.01, 0.002):
            (txb, bps), (txt, tps) = make_cnn_steps(lr)
            for name, step, tx in (("backprop SGD", bps, txb), ("tpSGD", tps, txt)):
                accs = np.mean([train(step, tx, init_cnn(s), cnn_forward, s, args.cnn_epochs, data) for s in range(args.seeds)], axis=0)
                print(f"| {name} | {lr:g} | " + " | ".join(f"{accs[e - 1]:.3f}" for e in shown) + " |", flush=True)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
