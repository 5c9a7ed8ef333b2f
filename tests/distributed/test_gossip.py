"""Gossip (D-SGD): mixing against the dense matrix, complete graph = data parallel, consensus, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, data_parallel, tree_bytes, wire_bytes
from jaxopt_lab.distributed.gossip import consensus_distance, gossip, mix
from jaxopt_lab.distributed.topology import complete, exponential, ring, torus2d
from tests.distributed.problem import DIM, loss, run, worker_data


def random_params(w, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(w, 3)).astype(np.float32), "b": rng.normal(size=(w, 2, 2)).astype(np.float32)}


def stacked(params):
    """(W, n) float64 matrix: each worker's leaves flattened in order."""
    return np.concatenate([np.asarray(params[k], np.float64).reshape(len(params[k]), -1) for k in sorted(params)], 1)


def mix_with_transform(topology, params, step):
    """One update of gossip(inner = zero update) at round ``step``: the pure mixing, through the transform."""
    tx = gossip(optax.set_to_zero(), topology)

    def one(p, s):
        state = tx.init(p)._replace(step=s)
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
        return optax.apply_updates(p, updates), state

    w = topology.num_workers
    return jax.jit(jax.vmap(one, axis_name="workers"))(params, jnp.full((w,), step, jnp.int32))


@pytest.mark.parametrize(
    "topology, step",
    [(ring(8), 0), (torus2d(12), 0), (exponential(8), 1), (exponential(8), 2), (complete(5), 0)],
    ids=["ring8", "torus3x4", "exp8_step1", "exp8_step2", "complete5"],
)
def test_mixing_matches_dense_matrix(topology, step):
    w = topology.num_workers
    params = random_params(w, seed=step)
    mixed, state = mix_with_transform(topology, params, step)
    expected = topology.mixing_matrix(step) @ stacked(params)
    np.testing.assert_allclose(stacked(mixed), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(expected, stacked(params), atol=1e-3)  # the mixing moved the parameters
    np.testing.assert_array_equal(state.step, step + 1)


def test_time_varying_phases_differ_and_mix_takes_python_steps():
    topo = exponential(8)
    params = random_params(8, seed=3)
    x = stacked(params)
    by_step = [stacked(mix_with_transform(topo, params, t)[0]) for t in (1, 2)]
    assert not np.allclose(by_step[0], by_step[1], atol=1e-3)
    # mix with a static Python step is the same phase as the traced step
    static = jax.vmap(lambda p: mix(p, topo, 4), axis_name="workers")(params)  # 4 % 3 == 1
    np.testing.assert_allclose(stacked(static), by_step[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(by_step[0], topo.mixing_matrix(1) @ x, rtol=1e-6, atol=1e-6)


def test_one_peer_exponential_reaches_exact_average_in_log2_w_rounds():
    topo = exponential(8)
    tx = gossip(optax.set_to_zero(), topo)
    params = random_params(8, seed=5)
    state = jax.vmap(tx.init)(params)

    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.zeros_like, p), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(jax.vmap(step, axis_name="workers"))
    p = params
    for _ in range(3):
        p, state = step(p, state)
    mean = stacked(params).mean(0)
    np.testing.assert_allclose(stacked(p), np.broadcast_to(mean, (8, mean.size)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.consensus, 0.0, atol=1e-5)


def test_complete_graph_gossip_equals_data_parallel_sgd():
    w, steps = 4, 5
    runner = WorkerRunner(w)
    dp, _ = run(runner, data_parallel(optax.sgd(0.1)), steps, w)
    gp, _ = run(runner, gossip(optax.sgd(0.1), complete(w), order="atc"), steps, w)
    rp, _ = run(runner, gossip(optax.sgd(0.1), ring(w)), steps, w)
    for k in dp:
        np.testing.assert_allclose(gp[k], dp[k], rtol=1e-5, atol=1e-6)
    # not vacuous: data-parallel workers agree and moved, the ring's workers disagree
    assert np.ptp(dp["w"], axis=0).max() < 1e-6
    assert np.ptp(rp["w"], axis=0).max() > 1e-3


def numpy_least_squares_grad(x, xs, ys):
    """Per-worker gradient of problem.loss in float64; x: (W, DIM + 1) as [w, b]."""
    resid = np.einsum("wrd,wd->wr", xs, x[:, :DIM]) + x[:, DIM:] - ys
    gw = np.einsum("wr,wrd->wd", resid, xs) / xs.shape[1]
    return np.concatenate([gw, resid.mean(1, keepdims=True)], 1)


@pytest.mark.parametrize("order", ["atc", "cta", None])
def test_orders_match_numpy_reference(order):  # None: the default, Lian et al.'s combine-then-adapt
    w, lr, steps = 4, 0.1, 3
    topo = ring(w)
    xs, ys = worker_data(w)
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(w, DIM)).astype(np.float32), "b": rng.normal(size=(w,)).astype(np.float32)}
    tx = gossip(optax.sgd(lr), topo) if order is None else gossip(optax.sgd(lr), topo, order=order)
    order = order or "cta"

    def step(p, s, x, y):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(jax.vmap(step, axis_name="workers"))
    p, state = params, jax.vmap(tx.init)(params)
    ref = np.concatenate([params["w"], params["b"][:, None]], 1).astype(np.float64)
    m = topo.mixing_matrix()
    xs64, ys64 = xs.astype(np.float64), ys.astype(np.float64)
    for _ in range(steps):
        p, state = step(p, state, xs, ys)
        g = numpy_least_squares_grad(ref, xs64, ys64)
        ref = m @ (ref - lr * g) if order == "atc" else m @ ref - lr * g
    got = np.concatenate([p["w"], p["b"][:, None]], 1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def numpy_consensus(x):
    return np.sqrt(np.mean(np.sum((x - x.mean(0)) ** 2, axis=1)))


def test_consensus_distance_matches_numpy():
    params = random_params(6, seed=11)
    d = jax.jit(jax.vmap(lambda p: consensus_distance(p), axis_name="workers"))(params)
    expected = numpy_consensus(stacked(params))
    np.testing.assert_allclose(d, np.full(6, expected), rtol=1e-6)


def test_consensus_decreases_under_mixing_with_zero_gradients():
    w = 8
    topo = ring(w)
    lam2 = 1 - topo.spectral_gap()
    tx = gossip(optax.sgd(0.1), topo)
    params = random_params(w, seed=2)
    state = jax.vmap(tx.init)(params)

    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.zeros_like, p), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(jax.vmap(step, axis_name="workers"))
    p, prev = params, numpy_consensus(stacked(params))
    for _ in range(6):
        p, state = step(p, state)
        now = numpy_consensus(stacked(p))
        np.testing.assert_allclose(state.consensus, np.full(w, now), rtol=1e-5)  # logged value = numpy value
        assert now < prev and now <= lam2 * prev * (1 + 1e-5)  # contracts at least by |λ2| per round
        prev = now


@pytest.mark.parametrize(
    "topology, messages",
    [(ring(8), 2), (ring(2), 1), (torus2d(16), 4), (exponential(8), 1), (complete(4), 3)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_bytes_sent_per_round(topology, messages):
    w, steps = topology.num_workers, 3
    params = random_params(w)
    one = jax.tree.map(lambda x: x[0], params)
    tx = gossip(optax.sgd(0.1), topology, track_consensus=False)
    state = jax.vmap(tx.init)(params)

    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(jax.vmap(step, axis_name="workers"))
    for _ in range(steps):
        params, state = step(params, state)
    assert tree_bytes(one) == 4 * (3 + 4)
    np.testing.assert_array_equal(communicated_bytes(state), np.full(w, steps * messages * tree_bytes(one)))
    np.testing.assert_array_equal(wire_bytes(state), np.full(w, steps * messages * 28))  # point to point: the same
    np.testing.assert_array_equal(state.consensus, 0.0)  # not tracked


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"order must be one of .* got 'both'"):
        gossip(optax.sgd(0.1), ring(4), order="both")
    with pytest.raises(ValueError, match=r"topology must be a Topology or one of .* got 'star'"):
        gossip(optax.sgd(0.1), "star")
    tx = gossip(optax.sgd(0.1), ring(4))
    params = random_params(8)
    state = jax.vmap(tx.init)(params)
    with pytest.raises(ValueError, match=r"ring\(4\) is for 4 workers, but axis 'workers' has 8"):
        jax.vmap(lambda p, s: tx.update(p, s, p), axis_name="workers")(params, state)
    with pytest.raises(ValueError, match=r"gossip needs params"):
        tx.update(params, state)
    tx2 = gossip(optax.sgd(0.1), ring(8), axis_name=("devices", "workers"))
    with pytest.raises(ValueError, match=r"single worker axis name, got \('devices', 'workers'\)"):
        jax.vmap(lambda p, s: tx2.update(p, s, p), axis_name="workers")(params, jax.vmap(tx2.init)(params))


@pytest.mark.parametrize("topology", [ring(8), exponential(8)], ids=lambda t: t.name)
def test_shard_map_one_worker_per_device_matches_vmap(topology):
    steps = 4  # exponential(8): phases 0, 1, 2, 0 (lax.switch on the traced step)
    vp, vs = run(WorkerRunner(8), gossip(optax.sgd(0.1), topology), steps, 8)
    runner = WorkerRunner(8, mode="shard_map")
    assert runner.workers_per_device == 1
    sp, ss = run(runner, gossip(optax.sgd(0.1), topology, axis_name=runner.axis_name), steps, 8)
    for k in vp:
        np.testing.assert_allclose(sp[k], vp[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ss.consensus, vs.consensus, rtol=1e-5)
    np.testing.assert_array_equal(communicated_bytes(ss), communicated_bytes(vs))
    assert np.ptp(vp["w"], axis=0).max() > 1e-3


def test_a_named_topology_is_built_over_the_axis_size():
    by_name, _ = run(WorkerRunner(8), gossip(optax.sgd(0.1), "exponential"), 3, 8)
    by_object, _ = run(WorkerRunner(8), gossip(optax.sgd(0.1), exponential(8)), 3, 8)
    for k in by_name:
        np.testing.assert_array_equal(by_name[k], by_object[k])
