"""DFedSAM: reduces to gossip SGD at rho = 0, K = 1; matches a float64 numpy reference on quadratics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, tree_bytes, wire_bytes
from jaxopt_lab.distributed.dfedsam import dfedsam
from jaxopt_lab.distributed.gossip import gossip
from jaxopt_lab.distributed.topology import exponential, ring
from tests.distributed.problem import run

W, D = 4, 5  # workers (default); parameter size, split into leaves u (3) and v (2)


def test_rho_zero_one_local_step_is_gossip_sgd():
    runner = WorkerRunner(W)
    gp, gs = run(runner, gossip(optax.sgd(0.1), ring(W), order="atc"), 4, W)  # DFedSAM mixes after its local step
    dp, ds = run(runner, dfedsam(optax.sgd(0.1), ring(W), rho=0.0, local_steps=1), 4, W)
    for k in gp:
        np.testing.assert_allclose(dp[k], gp[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ds.consensus, gs.consensus, rtol=1e-5)
    np.testing.assert_array_equal(communicated_bytes(ds), communicated_bytes(gs))
    assert np.ptp(gp["w"], axis=0).max() > 1e-3  # workers differ: the mixing is not a plain average


def quadratic_problem(w, local_steps, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(w, D, D))
    a = np.einsum("wij,wkj->wik", b, b) / D + 0.5 * np.eye(D)  # SPD per worker
    c = rng.normal(size=(w, local_steps, D))  # a different "minibatch" per local step
    x0 = rng.normal(size=(w, D))
    return a, c, x0


def numpy_dfedsam(a, c, x0, topology, lr, rho, local_steps, gossip_steps, rounds, eps=1e-12):
    """f_i^k(x) = ½ (x − c_ik)ᵀ A_i (x − c_ik): K SAM steps per worker, then Q mixings per round."""
    x = x0.astype(np.float64)
    for t in range(rounds):
        y = x.copy()
        for i in range(len(x)):
            for k in range(local_steps):
                g = a[i] @ (y[i] - c[i, k])
                perturbed = y[i] + rho * g / (np.linalg.norm(g) + eps)
                y[i] = y[i] - lr * (a[i] @ (perturbed - c[i, k]))
        for q in range(gossip_steps):
            y = topology.mixing_matrix(t * gossip_steps + q) @ y
        x = y
    return x


@pytest.mark.parametrize(
    "topology, local_steps, gossip_steps, rounds",
    [(ring(W), 3, 1, 1), (exponential(8), 2, 2, 2)],  # exponential(8): phases 0, 1 | 2, 0
    ids=["ring_K3", "exp8_K2_MGS2_2rounds"],
)
def test_matches_numpy_reference_on_quadratics(topology, local_steps, gossip_steps, rounds):
    lr, rho, w = 0.1, 0.3, topology.num_workers
    a, c, x0 = quadratic_problem(w, local_steps)
    tx = dfedsam(optax.sgd(lr), topology, rho=rho, local_steps=local_steps, gossip_steps=gossip_steps)
    a32, c32 = a.astype(np.float32), c.astype(np.float32)

    def local_loss(p, a_i, c_ik):
        x = jnp.concatenate([p["u"], p["v"]])
        return 0.5 * (x - c_ik) @ a_i @ (x - c_ik)

    def step(p, s, a_i, c_i):
        grad_fn = lambda q, k: jax.grad(local_loss)(q, a_i, c_i[k])  # noqa: E731
        u, s = tx.update(grad_fn(p, 0), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, u), s

    step = jax.jit(jax.vmap(step, axis_name="workers"))
    p = {"u": x0[:, :3].astype(np.float32), "v": x0[:, 3:].astype(np.float32)}
    state = jax.vmap(tx.init)(p)
    for _ in range(rounds):
        p, state = step(p, state, a32, c32)
    expected = numpy_dfedsam(a, c, x0, topology, lr, rho, local_steps, gossip_steps, rounds)
    got = np.concatenate([p["u"], p["v"]], 1)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    # rho matters: without the perturbation the result is visibly different
    plain = numpy_dfedsam(a, c, x0, topology, lr, 0.0, local_steps, gossip_steps, rounds)
    assert np.abs(plain - expected).max() > 1e-2
    per_worker = tree_bytes({"u": p["u"][0], "v": p["v"][0]})
    sent = sum(topology.messages(s) for s in range(rounds * gossip_steps)) * per_worker
    np.testing.assert_array_equal(communicated_bytes(state), np.full(w, sent))
    np.testing.assert_array_equal(wire_bytes(state), np.full(w, sent))  # point-to-point messages
    np.testing.assert_array_equal(state.step, rounds)
    mean = got.mean(0)
    np.testing.assert_allclose(state.consensus, np.sqrt(np.mean(np.sum((got - mean) ** 2, 1))), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), r"rho must be a number >= 0, got -0.1"),
        (dict(rho="big"), r"rho must be a number >= 0, got 'big'"),
        (dict(local_steps=0), r"local_steps must be an int >= 1, got 0"),
        (dict(local_steps=2.0), r"local_steps must be an int >= 1, got 2.0"),
        (dict(gossip_steps=0), r"gossip_steps must be an int >= 1, got 0"),
        (dict(eps=-1.0), r"eps must be a number >= 0, got -1.0"),
        (dict(topology=None), r"topology must be a Topology .* got None"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    args = dict(inner=optax.sgd(0.1), topology=ring(W)) | kwargs
    with pytest.raises(ValueError, match=match):
        dfedsam(**args)


def test_needs_grad_fn_when_it_takes_extra_gradients():
    tx = dfedsam(optax.sgd(0.1), ring(W), rho=0.05)
    params = {"w": jnp.zeros((W, 2))}
    state = jax.vmap(tx.init)(params)
    with pytest.raises(ValueError, match=r"rho=0.05, local_steps=1 needs grad_fn"):
        jax.vmap(lambda p, s: tx.update(p, s, p), axis_name="workers")(params, state)
    with pytest.raises(ValueError, match=r"dfedsam needs params"):
        tx.update(params, state)
