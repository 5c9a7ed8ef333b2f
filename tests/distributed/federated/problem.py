"""A tiny softmax regression split over clients, with an independent numpy float64 reference.

The jax side is what the simulator runs; the numpy side recomputes local SGD
and the server rules by hand, so tests compare the simulator against code that
shares nothing with it.
"""

import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed import federated as fl

D, K = 3, 2  # features, classes
LR = 0.5
# the tests' simulators compile with LLVM at -O0: about a third less compile time, same numbers
FAST = {"compiler_options": {"xla_backend_optimization_level": 0}}


def make_clients(sizes, seed=0):
    """Per-client (x, y) in float64 and the padded ClientData (float32)."""
    rng = np.random.default_rng(seed)
    n = int(sum(sizes))
    x = rng.normal(size=(n, D))
    y = (x @ rng.normal(size=(D,)) + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    cuts = np.cumsum(sizes)[:-1]
    parts = np.split(np.arange(n), cuts)
    data = fl.pad_clients(x.astype(np.float32), y, parts)
    return [(x[p], y[p]) for p in parts], data, x, y


def init_params(seed=1):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(D, K)) * 0.5, jnp.float32), "b": jnp.zeros((K,), jnp.float32)}


def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)


def local_update(data, batch_size, lr=LR):
    return fl.make_local_update(loss_fn, data, optax.sgd(lr), batch_size, shuffle=False)


# ---------------------------------------------------------------- numpy float64 reference

def to_np(p):
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


def np_grad(p, x, y):
    logits = x @ p["w"] + p["b"]
    logits = logits - logits.max(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    g = probs - np.eye(K)[y]
    return {"w": x.T @ g / len(y), "b": g.mean(0)}


def np_local_sgd(p, x, y, steps, batch_size, lr=LR):
    """In-order minibatches of ``batch_size``; the last one of a pass holds the remainder."""
    p = {k: v.copy() for k, v in p.items()}
    per_pass = max(-(-len(y) // batch_size), 1)
    for s in range(steps):
        b = s % per_pass
        xb, yb = x[b * batch_size:(b + 1) * batch_size], y[b * batch_size:(b + 1) * batch_size]
        g = np_grad(p, xb, yb)
        p = {k: p[k] - lr * g[k] for k in p}
    return p


def assert_close(a, b, tol=2e-5):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), b[k], rtol=tol, atol=tol)
