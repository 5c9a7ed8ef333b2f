"""make_local_update: one epoch visits every example once; FedProx's proximal term; padding is inert."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed import federated as fl
from tests.distributed.federated import problem as pb

SIZES = [5, 3, 7]
LR = 0.3


def _usage_problem():
    """Each example's input is its own index; the loss is the parameter of that index, so after
    SGD ``p0 - p`` shows exactly which examples each batch used (and how many were in the batch)."""
    n = sum(SIZES)
    x = np.arange(n, dtype=np.float32)[:, None]
    parts = np.split(np.arange(n), np.cumsum(SIZES)[:-1])
    data = fl.pad_clients(x, np.zeros(n, np.int32), parts)

    def loss_fn(p, xb, yb):
        return p["w"][xb[:, 0].astype(jnp.int32)]

    return data, parts, loss_fn, n


def test_one_epoch_visits_every_example_of_the_client_once_in_a_shuffled_order():
    data, parts, loss_fn, n = _usage_problem()
    local = jax.jit(jax.vmap(fl.make_local_update(loss_fn, data, optax.sgd(LR), batch_size=2),
                             in_axes=(None, 0, 0, 0)))
    p0 = {"w": jnp.zeros((n,))}
    steps = fl.epoch_steps(SIZES, 2)  # 3, 2, 4 steps
    keys = jnp.stack([jax.random.PRNGKey(i) for i in range(3)])
    out = np.asarray(local(p0, jnp.arange(3), jnp.asarray(steps), keys)["w"])
    orders = []
    for k, idx in enumerate(parts):
        used = -out[k] / LR  # 1/|batch| for each example used once
        others = np.setdiff1d(np.arange(n), idx)
        np.testing.assert_allclose(used[others], 0.0, atol=1e-7)  # never another client's (or padding) row
        # batches of 2 then the remainder: every example exactly once, the odd one alone
        expected = [0.5] * (len(idx) - len(idx) % 2) + [1.0] * (len(idx) % 2)
        np.testing.assert_allclose(np.sort(used[idx]), np.sort(expected), rtol=1e-6)
        orders.append(used[idx])
    # another key gives another order (here: another example alone in the last batch)
    out2 = np.asarray(local(p0, jnp.arange(3), jnp.asarray(steps), keys + 7)["w"])
    assert any(not np.allclose(-out2[k][idx] / LR, orders[k]) for k, idx in enumerate(parts))
    # a second epoch (6 steps for client 0) revisits each example once more
    out3 = np.asarray(local(p0, jnp.arange(3), jnp.asarray([6, 0, 0]), keys)["w"])
    np.testing.assert_allclose(np.sort(-out3[0][parts[0]] / LR), np.sort([1.0, 1.0, 1.0, 1.0, 2.0]), rtol=1e-6)
    np.testing.assert_array_equal(out3[1], 0.0)  # zero steps: unchanged


def test_fedprox_term_matches_numpy():
    clients, data, _, _ = pb.make_clients([6], seed=2)
    mu, steps = 0.7, 3
    local = fl.fedprox_local_update(pb.loss_fn, data, optax.sgd(pb.LR), batch_size=4, mu=mu, shuffle=False)
    p0 = pb.init_params()
    got = jax.jit(local)(p0, jnp.int32(0), jnp.int32(steps), jax.random.PRNGKey(0))
    x, y = clients[0]
    theta0 = pb.to_np(p0)
    p = dict(theta0)
    for s in range(steps):  # batches 0:4, 4:6, 0:4
        b = s % 2
        g = pb.np_grad(p, x[4 * b:4 * b + 4], y[4 * b:4 * b + 4])
        p = {k: p[k] - pb.LR * (g[k] + mu * (p[k] - theta0[k])) for k in p}
    pb.assert_close(got, p)
    plain = jax.jit(pb.local_update(data, batch_size=4))(p0, jnp.int32(0), jnp.int32(steps), jax.random.PRNGKey(0))
    pb.assert_close(plain, pb.np_local_sgd(theta0, x, y, steps, 4))
