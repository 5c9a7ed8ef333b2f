"""DiPaCo: one path is DiLoCo, a float64 reference of per-module outer steps, per-module bytes, routing, GPT levels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, diloco, wire_bytes
from jaxopt_lab.distributed.dipaco import (
    SHARED,
    byte_histogram,
    compose,
    dipaco,
    gpt_levels,
    grid_paths,
    grid_router,
    kmeans_router,
    module_bytes,
    module_counts,
    modules_of,
    route,
    route_grid,
)
from jaxopt_lab.models.gpt import GPT
from tests.distributed.problem import DIM, init_params, run, worker_data

W = 4
RUNNER = WorkerRunner(W)
LEVELS = {"w": 0, "b": SHARED}  # the least-squares problem: "w" a level-0 module, "b" shared by all


def nesterov(lr=0.7, mu=0.9):
    return optax.sgd(lr, momentum=mu, nesterov=True)


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_one_path_is_diloco_exactly(inner):
    make_inner = (lambda: optax.sgd(0.05)) if inner == "sgd" else (lambda: optax.adamw(0.01, b1=0.9, b2=0.95))
    H, steps = 3, 9
    ref, ref_state = run(RUNNER, diloco(make_inner(), nesterov(), sync_every=H), steps, W)
    got, state = run(RUNNER, dipaco([(0,)] * W, LEVELS, make_inner(), nesterov(), sync_every=H), steps, W)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    np.testing.assert_array_equal(communicated_bytes(state), communicated_bytes(ref_state))
    np.testing.assert_array_equal(wire_bytes(state), wire_bytes(ref_state))


def test_one_worker_one_path_is_diloco():
    runner = WorkerRunner(1)
    ref, _ = run(runner, diloco(optax.sgd(0.05), nesterov(), sync_every=2), 6, 1)
    got, _ = run(runner, dipaco([(0,)], LEVELS, optax.sgd(0.05), nesterov(), sync_every=2), 6, 1)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


# Two levels: "a" from level 0, "b" from level 1, "c" shared. Module (0, 0) is in 3 paths.
PATHS = [(0, 0), (0, 1), (0, 2), (1, 0)]
LEVELS2 = {"a": 0, "b": 1, "c": SHARED}


def modules_init():
    rng = np.random.default_rng(3)
    return {"a": rng.normal(size=(2, DIM)), "b": rng.normal(size=(3, DIM)), "c": np.float64(0.5)}


def path_init(mods, path):
    return {"a": mods["a"][path[0]], "b": mods["b"][path[1]], "c": mods["c"]}


def loss2(p, x, y):
    return 0.5 * jnp.mean(jnp.square(x @ (p["a"] + 0.5 * p["b"]) + p["c"] - y))


def test_module_outer_step_matches_float64_reference_with_three_paths_sharing_it():
    H, rounds, lr, outer_lr, mu = 3, 3, 0.05, 0.7, 0.9
    tx = dipaco(PATHS, LEVELS2, optax.sgd(lr), nesterov(outer_lr, mu), sync_every=H)
    mods = modules_init()
    init = [jax.tree.map(lambda v: np.asarray(v, np.float32), path_init(mods, p)) for p in PATHS]
    params = jax.tree.map(lambda *xs: np.stack(xs), *init)
    state = jax.tree.map(lambda *xs: np.stack(xs), *[jax.tree.map(np.asarray, tx.init(p)) for p in init])
    x, y = worker_data(W)
    step = RUNNER.map_sync(make_step_sync(tx))
    for _ in range(H * rounds):
        params, state = step(params, state, x, y)
    params, state = RUNNER.get((params, state))

    # float64 numpy: every module and its momentum; each worker runs H SGD steps on its path
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mom = {k: np.zeros_like(v) for k, v in mods.items()}
    for _ in range(rounds):
        deltas = []
        for w, path in enumerate(PATHS):
            p = path_init(mods, path)
            start = dict(p)
            for _ in range(H):
                r = x64[w] @ (p["a"] + 0.5 * p["b"]) + p["c"] - y64[w]
                g = x64[w].T @ r / len(r)
                p = {"a": p["a"] - lr * g, "b": p["b"] - lr * 0.5 * g, "c": p["c"] - lr * r.mean()}
            deltas.append({k: start[k] - p[k] for k in p})
        avg = {"a": np.zeros_like(mods["a"]), "b": np.zeros_like(mods["b"]), "c": np.mean([d["c"] for d in deltas])}
        for level, name in ((0, "a"), (1, "b")):
            for k in range(mods[name].shape[0]):
                holders = [w for w, path in enumerate(PATHS) if path[level] == k]
                avg[name][k] = np.mean([deltas[w][name] for w in holders], axis=0)  # per-module count
        mom = {k: mu * mom[k] + avg[k] for k in mods}
        mods = {k: mods[k] - outer_lr * (mu * mom[k] + avg[k]) for k in mods}
    for w, path in enumerate(PATHS):
        for k, v in path_init(mods, path).items():
            np.testing.assert_allclose(params[k][w], v, rtol=2e-5, atol=2e-6)
    # the three holders of module (0, 0) hold the same anchor, bit for bit
    np.testing.assert_array_equal(state.anchor["a"][:3], np.broadcast_to(state.anchor["a"][0], (3, DIM)))

    # bytes: per module, every holder sends its bytes once per round; wire is a ring among the holders
    ring = lambda n, c: -(-2 * (c - 1) * n // c)  # noqa: E731
    got = module_bytes(state, PATHS)
    assert got["shared"] == {"payload": rounds * W * 4, "wire": rounds * W * ring(4, W), "workers": W}
    n = 4 * DIM
    for (level, k), c in {(0, 0): 3, (0, 1): 1, (1, 0): 2, (1, 1): 1, (1, 2): 1}.items():
        assert got[(level, k)] == {"payload": rounds * c * n, "wire": rounds * c * ring(n, c), "workers": c}
    np.testing.assert_array_equal(communicated_bytes(state), [rounds * (4 + 2 * n)] * W)
    expected_wire = [rounds * (ring(4, W) + ring(n, ca) + ring(n, cb)) for ca, cb in ((3, 2), (3, 1), (3, 1), (1, 2))]
    np.testing.assert_array_equal(wire_bytes(state), expected_wire)


def make_step_sync(tx):
    def step(params, state, x, y, sync=None):
        grads = jax.grad(loss2)(params, x, y)
        updates, state = tx.update(grads, state, params, sync=sync)
        return optax.apply_updates(params, updates), state

    return step


def test_in_graph_decision_matches_host_decision():
    tx = dipaco(PATHS, LEVELS2, optax.sgd(0.05), nesterov(), sync_every=2)
    init = [jax.tree.map(lambda v: np.asarray(v, np.float32), path_init(modules_init(), p)) for p in PATHS]
    params0 = jax.tree.map(lambda *xs: np.stack(xs), *init)
    state0 = jax.tree.map(lambda *xs: np.stack(xs), *[jax.tree.map(np.asarray, tx.init(p)) for p in init])
    x, y = worker_data(W)
    out = []
    for step in (RUNNER.map(make_step_sync(tx)), RUNNER.map_sync(make_step_sync(tx))):
        params, state = params0, state0
        for _ in range(4):
            params, state = step(params, state, x, y)
        out.append(RUNNER.get(params))
    for k in out[0]:
        np.testing.assert_allclose(out[0][k], out[1][k], rtol=1e-6, atol=1e-7)


def test_counts_and_grid_paths():
    assert grid_paths(2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    counts = module_counts(PATHS)
    np.testing.assert_array_equal(counts[0], [3, 1])
    np.testing.assert_array_equal(counts[1], [2, 1, 1])
    for c in module_counts(grid_paths(2, 3)):
        assert (c == c[0]).all()


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"module\(s\) \[1\] of level 0"):
        dipaco([(0,), (2,)], LEVELS)
    with pytest.raises(ValueError, match="sync_every"):
        dipaco([(0,)], LEVELS, sync_every=0)
    with pytest.raises(ValueError, match="equal-length"):
        dipaco([(0, 1), (0,)], LEVELS)
    tx = dipaco([(0,)] * 3, LEVELS)  # 3 paths on 4 workers
    with pytest.raises(ValueError, match="3 paths"):
        run(RUNNER, tx, 1, W)
    with pytest.raises(ValueError, match=r"level\(s\) \[1\]"):
        dipaco([(0,)], {"w": 1, "b": SHARED}).init(init_params())
    with pytest.raises(ValueError, match="one level per parameter leaf"):
        dipaco([(0,)], {"w": 0}).init(init_params())


def test_router_is_deterministic_and_separates_clusters():
    rng = np.random.default_rng(0)
    text = [rng.choice([97, 98], size=(50, 16)), rng.choice([48, 49], size=(50, 16))]  # letters vs digits
    feats = byte_histogram(np.concatenate(text))
    c1, c2 = kmeans_router(feats, 2, seed=1), kmeans_router(feats, 2, seed=1)
    np.testing.assert_array_equal(c1, c2)
    paths = route(feats, c1)
    assert len(set(paths[:50])) == 1 and len(set(paths[50:])) == 1 and paths[0] != paths[50]
    np.testing.assert_allclose(feats.sum(1), 1.0)


def test_grid_router_is_balanced_per_level_and_a_product():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(600, 8)) * np.array([5.0, 3.0, 1, 1, 1, 1, 1, 1])
    router = grid_router(feats, (2, 3))
    paths = route_grid(feats, router)
    table = np.asarray(grid_paths(2, 3))[paths]
    np.testing.assert_array_equal(np.bincount(table[:, 0]), [300, 300])  # quantile cuts: equal shares per level
    np.testing.assert_array_equal(np.bincount(table[:, 1]), [200, 200, 200])
    # level 0 follows the largest-variance feature, level 1 the next one (up to their fixed sign)
    proj = (feats - router.mean) @ router.directions.T
    np.testing.assert_array_equal(table[:, 0], (proj[:, 0] > np.median(proj[:, 0])).astype(int))
    assert abs(router.directions[0, 0]) > 0.99 and abs(router.directions[1, 1]) > 0.99
    np.testing.assert_array_equal(route_grid(feats, grid_router(feats, (2, 3))), paths)  # deterministic


def test_gpt_levels_modules_compose_round_trip():
    model = GPT(vocab_size=16, layers=4, width=8, heads=2, context=8, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    levels = gpt_levels(params, 2)
    assert [jax.tree.leaves(levels["blocks"][b])[0] for b in sorted(levels["blocks"])] == [0, 0, 1, 1]
    assert set(jax.tree.leaves(levels["token_embed"])) == {SHARED}
    paths = grid_paths(2, 2)
    stacked = jax.tree.map(lambda v: np.stack([np.asarray(v) + w for w in range(4)]), params)  # worker w: +w
    mods = modules_of(stacked, paths, lambda p: gpt_levels(p, 2))
    p = compose(mods, (1, 0), params, lambda q: gpt_levels(q, 2))
    # (1, 0): level-0 module 1 first held by worker 2, level-1 module 0 first held by worker 0, shared from worker 0
    np.testing.assert_array_equal(p["blocks"][0]["qkv"]["kernel"], np.asarray(params["blocks"][0]["qkv"]["kernel"]) + 2)
    np.testing.assert_array_equal(p["blocks"][3]["qkv"]["kernel"], np.asarray(params["blocks"][3]["qkv"]["kernel"]) + 0)
    np.testing.assert_array_equal(p["head"]["kernel"], np.asarray(params["head"]["kernel"]))
    with pytest.raises(ValueError, match="cannot be split"):
        gpt_levels(params, 5)


def test_shard_map_with_two_workers_per_device_matches_vmap():
    """Under shard_map the worker axis is ("devices", "workers"): axis_index and the masked psum span both."""
    sharded = WorkerRunner(W, "shard_map", devices=jax.devices()[:2])
    assert sharded.axis_name == ("devices", "workers")
    init = [jax.tree.map(lambda v: np.asarray(v, np.float32), path_init(modules_init(), p)) for p in PATHS]
    x, y = worker_data(W)
    out = []
    for runner in (RUNNER, sharded):
        tx = dipaco(PATHS, LEVELS2, optax.sgd(0.05), nesterov(), sync_every=2, axis_name=runner.axis_name)
        params = jax.tree.map(lambda *xs: np.stack(xs), *init)
        state = jax.tree.map(lambda *xs: np.stack(xs), *[jax.tree.map(np.asarray, tx.init(p)) for p in init])
        params, state, xs, ys = runner.put((params, state, x, y))
        step = runner.map_sync(make_step_sync(tx))
        for _ in range(4):
            params, state = step(params, state, xs, ys)
        out.append(runner.get((params, state)))
    for k in out[0][0]:
        np.testing.assert_allclose(out[1][0][k], out[0][0][k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(wire_bytes(out[1][1]), wire_bytes(out[0][1]))
