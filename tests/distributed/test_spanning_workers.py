"""Workers that span devices: a 2-D (workers x model) mesh gives the vmap run's numbers, 1/d of the memory.

On the 8 forced CPU devices of the test session, W x d = 8x1, 4x2, 2x4 (8x2: two workers per group; 1x8
for data parallelism) against ``vmap`` with the same W, for DiLoCo, Streaming
DiLoCo and gossip, through ``map_sync`` with donated state (as the trainer runs
them). Each worker's state is FSDP-sharded over its d devices; the bytes each
device holds are read from the arrays' ``addressable_shards``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxopt_lab.distributed import WorkerRunner, data_parallel, diloco, gossip, ring, streaming_diloco
from jaxopt_lab.distributed.workers import fsdp_spec, nnx_partition_specs

STEPS = 6  # synchronizations at 3 and 6 (DiLoCo), fragments at 3 and 6 (Streaming DiLoCo, P = 2)
IN, HIDDEN, OUT, ROWS = 8, 32, 4, 8


def init_params(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)).astype(np.float32),
        "b1": np.zeros((HIDDEN,), np.float32),
        "w2": (rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32),
    }


def loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return 0.5 * jnp.mean(jnp.square(h @ params["w2"] - y))


def worker_data(num_workers, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_workers, ROWS, IN)).astype(np.float32)
    y = (np.tanh(x[..., :OUT]) + np.arange(num_workers)[:, None, None] * 0.3).astype(np.float32)
    return x, y


def make_tx(method, runner):
    axis = runner.axis_name
    if method == "diloco":
        return diloco(optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True), sync_every=3, axis_name=axis)
    if method == "streaming":
        return streaming_diloco(optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True), sync_every=6,
                                num_fragments=2, axis_name=axis)
    if method == "gossip":
        return gossip(optax.adam(0.05), ring(runner.num_workers), axis_name=axis)
    return data_parallel(optax.adam(0.05), axis_name=axis)


def run(runner, method, steps=STEPS):
    """``steps`` steps through map_sync with donated state; host (params, state) and the device arrays."""
    tx = make_tx(method, runner)
    w = runner.num_workers

    def step(params, state, x, y, **decisions):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params, **decisions)
        return optax.apply_updates(params, updates), state

    params = runner.put(runner.replicate((init_params(), jax.tree.map(np.asarray, tx.init(init_params())))))
    x, y = runner.put(worker_data(w), batch_axis=1)  # each worker's rows over its devices
    train = runner.map_sync(step, donate_argnums=(0, 1))
    state = params
    for _ in range(steps):
        state = train(*state, x, y)
    return runner.get(state), state


LAYOUTS = {"diloco": [(8, 1), (4, 2), (2, 4), (8, 2)],  # 8 x 2: two workers per group of 2 devices
           "streaming": [(8, 1), (4, 2), (2, 4)],
           "gossip": [(8, 1), (4, 2), (2, 4)], "ddp": [(1, 8)]}
CASES = [(m, w, d) for m, layouts in LAYOUTS.items() for w, d in layouts]


@pytest.fixture(scope="module")
def vmap_runs():
    cache = {}

    def get(method, w):
        if (method, w) not in cache:
            cache[method, w] = run(WorkerRunner(w, "vmap"), method)[0]
        return cache[method, w]

    return get


@pytest.mark.parametrize("method, w, d", CASES)
def test_spanning_workers_match_vmap(vmap_runs, method, w, d):
    runner = WorkerRunner(w, "shard_map", devices_per_worker=d)
    assert runner.mesh.devices.size == 8 and runner.axis_name in ("workers", ("devices", "workers"))
    (params, state), placed = run(runner, method)
    expected_params, expected_state = vmap_runs(method, w)
    for k in params:
        np.testing.assert_allclose(params[k], expected_params[k], rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-5, atol=2e-6)
    if d > 1:  # the state stayed sharded over each worker's devices, step after step
        workers = "workers" if w > 1 else None
        assert spec(placed[0]["w1"]) == P(workers, None, "model")
        assert spec(placed[0]["w2"]) == P(workers, "model", None)
    assert np.abs(expected_params["w2"] - init_params()["w2"]).max() > 1e-2  # training moved them


def spec(array):
    """An array's PartitionSpec over all its axes (JAX drops trailing Nones and axes of size 1)."""
    mesh = array.sharding.mesh
    names = [n if n is None or mesh.shape[n] > 1 else None for n in array.sharding.spec]
    return P(*names, *([None] * (array.ndim - len(names))))


def per_device_bytes(tree):
    """Bytes each device holds of ``tree``'s arrays, from their addressable shards."""
    out = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@pytest.mark.parametrize("w, d", [(4, 2), (2, 4), (1, 8)])
def test_per_device_memory_is_one_dth_of_a_replica(w, d):
    tx = make_tx("diloco", WorkerRunner(w))
    replica = (init_params(), tx.init(init_params()))
    replica_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(replica))
    runner = WorkerRunner(w, "shard_map", devices_per_worker=d)
    placed = runner.put(runner.replicate(replica))
    held = per_device_bytes(placed)
    assert len(held) == w * d
    # each device holds 1/d of its worker's parameters and optimizer state, up to the replicated
    # scalars (step counters, keys, byte counts): under 5% here
    for nbytes in held.values():
        assert replica_bytes / d <= nbytes <= 1.05 * replica_bytes / d, (nbytes, replica_bytes, d)


def test_fsdp_spec_picks_the_largest_divisible_axis():
    assert fsdp_spec((8, 32), 4) == (None, "model")
    assert fsdp_spec((32, 4), 8) == ("model", None)
    assert fsdp_spec((6, 10), 4) == (None, None)  # nothing divisible: replicated inside the worker
    assert fsdp_spec((), 2) == ()
    assert fsdp_spec((16, 16), 2) == ("model", None)  # ties: the first axis


class Annotated(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(IN, HIDDEN, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(HIDDEN, OUT, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def test_nnx_annotations_are_honoured():
    with nnx.use_eager_sharding(False):
        model = Annotated(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    with pytest.raises(ValueError, match=r"annotation axis '(embed|mlp)' is neither 'model' nor in rules"):
        nnx_partition_specs(params)
    # tensor-parallel style: the hidden ('mlp') axis over the worker's devices, not FSDP's largest axis
    specs = nnx_partition_specs(params, rules={"mlp": "model", "embed": None})
    runner = WorkerRunner(4, "shard_map", devices_per_worker=2, param_specs=specs)
    tx = diloco(optax.adam(0.05), sync_every=2, axis_name=runner.axis_name)
    host = jax.tree.map(np.asarray, (params, tx.init(params)))
    placed = runner.put(runner.replicate(host))
    assert spec(placed[0]["down"]["kernel"]) == P("workers", "model", None)  # FSDP would too; up differs:
    assert spec(placed[0]["up"]["kernel"]) == P("workers", None, "model")
    assert spec(placed[1].anchor["down"]["kernel"]) == P("workers", "model", None)
    assert spec(placed[0]["down"]["bias"]) == P("workers", None)  # unannotated: replicated in the worker
    x, y = worker_data(4)

    def step(params, state, x, y):
        grads = jax.grad(lambda p: 0.5 * jnp.mean(jnp.square(nnx.merge(graphdef, p)(x) - y)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    out = runner.map(step)(*placed, *runner.put((x, y), batch_axis=1))
    assert spec(out[1].inner_state[0].mu["down"]["kernel"]) == P("workers", "model", None)
    reference = jax.jit(jax.vmap(step, axis_name="workers"))(*WorkerRunner(4).replicate(host), x, y)
    for a, b in zip(jax.tree.leaves(runner.get(out)), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_workers=4, mode="shard_map", devices_per_worker=3), r"devices_per_worker=3 does not divide the 8 devices"),
        (dict(num_workers=3, mode="shard_map", devices_per_worker=2), r"num_workers=3 does not fit 8 devices as groups of devices_per_worker=2"),
        (dict(num_workers=4, mode="vmap", devices_per_worker=2), r"devices_per_worker=2 needs mode='shard_map'"),
        (dict(num_workers=4, mode="shard_map", devices_per_worker=0), r"devices_per_worker must be an int >= 1, got 0"),
        (dict(num_workers=8, mode="shard_map", param_specs={}), r"param_specs .* need devices_per_worker > 1"),
    ],
)
def test_bad_spanning_layouts_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorkerRunner(**kwargs)


def test_a_step_that_does_not_synchronize_has_no_collective_across_workers():
    # DiLoCo at 4 x 2: the sync=-1 program's only collectives are FSDP's, inside each group of
    # 2 devices (XLA's iota replica groups [4,2]<=[8]); the synchronizing one adds the all-reduce
    # of the outer gradient across the workers, of each device's shard only.
    import re

    runner = WorkerRunner(4, "shard_map", devices_per_worker=2)
    tx = make_tx("diloco", runner)

    def step(params, state, x, y, **decisions):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params, **decisions)
        return optax.apply_updates(params, updates), state

    args = runner.put(runner.replicate((init_params(), jax.tree.map(np.asarray, tx.init(init_params())))))
    args += runner.put(worker_data(4), batch_axis=1)
    collective = re.compile(r"[)\]}] (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)\(")

    def groups(sync):
        text = runner.map_sync(step).program(sync=sync).lower(*args).compile().as_text()
        return [re.search(r"(replica_groups|source_target_pairs)=(.*?), (?:dimensions|use_global|to_apply|channel)",
                          line).group(2) for line in text.splitlines() if collective.search(line)]

    inside = "[4,2]<=[8]"
    no_sync, sync = groups(-1), groups(0)
    assert no_sync and all(g == inside for g in no_sync), no_sync
    across = [g for g in sync if g != inside]
    assert len(across) == 1 and "axis_1" not in across[0].split("{")[-1], sync  # over the worker axis only


def test_spanning_layouts_take_their_devices_and_keep_the_cpu_queue_bound():
    from jaxopt_lab.distributed.workers import CPU_MAX_IN_FLIGHT

    small = WorkerRunner(2, "shard_map", devices_per_worker=2)  # W x d = 4 of 8 devices, in one process
    assert small.devices == tuple(jax.devices()[:4]) and small.mesh.shape == {"workers": 2, "model": 2}
    stacked = WorkerRunner(8, "shard_map", devices_per_worker=2)  # 2 workers per group of 2 devices
    assert (stacked.worker_groups, stacked.workers_per_device, stacked.axis_name) == (4, 2, "workers")
    # several CPU devices of this process run each program: the queue bound of workers.py applies
    assert stacked.in_flight_bound == CPU_MAX_IN_FLIGHT
