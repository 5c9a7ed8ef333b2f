"""A small multi-worker least-squares problem shared by the distributed tests.

Each worker has its own data (different rows), so the workers' gradients
differ and synchronization matters. Everything is generated from a seed, so
several processes build the same problem.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

DIM = 5


def worker_data(num_workers, rows=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_workers, rows, DIM)).astype(np.float32)
    w_true = rng.normal(size=(DIM,))
    y = (x @ w_true + 0.1 * rng.normal(size=(num_workers, rows)) + np.arange(num_workers)[:, None] * 0.3).astype(np.float32)
    return x, y


def init_params(seed=1):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(DIM,)).astype(np.float32), "b": np.zeros((), np.float32)}


def loss(params, x, y):
    return 0.5 * jnp.mean(jnp.square(x @ params["w"] + params["b"] - y))


def make_step(tx, loss_fn=loss, **update_kwargs):
    """One worker's step: gradient on its data, then the (multi-worker) transformation.

    ``update_kwargs`` (e.g. a static ``sync=False``) are passed to ``tx.update``.
    """

    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params, **update_kwargs)
        return optax.apply_updates(params, updates), state

    return step


def run(runner, tx, steps, num_workers, seed=0):
    """Run ``steps`` steps of ``tx`` over the runner's workers; return host (params, state)."""
    x, y = worker_data(num_workers, seed=seed)
    params = runner.replicate(init_params())
    state = runner.replicate(jax.tree.map(np.asarray, tx.init(init_params())))
    params, state, x, y = runner.put((params, state, x, y))
    step = runner.map(make_step(tx))
    for _ in range(steps):
        params, state = step(params, state, x, y)
    return runner.get((params, state))
