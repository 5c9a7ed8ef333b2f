"""Worker-axis sum and mean: slices under vmap, jax.lax on mesh axes, the same numbers either way."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, collectives, data_parallel

W = 8
REDUCE = re.compile(r"= f32\[[^\]]*\]\{?[^ ]* reduce\(")  # a float reduction (what lax.psum under vmap becomes)


def worker_tree(w=W):
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((w, 5, 3)).astype(np.float32), "b": rng.standard_normal((w,)).astype(np.float32),
            "n": np.arange(w, dtype=np.int32)}


def both(axis_name):
    return lambda t: (collectives.pmean(t, axis_name), collectives.psum(t, axis_name))


@pytest.mark.parametrize("mode,devices", [("vmap", None), ("shard_map", 8), ("shard_map", 4)],
                         ids=["vmap", "1_per_device", "2_per_device"])
def test_mean_and_sum_equal_float64_on_every_worker(mode, devices):
    runner = WorkerRunner(W, mode, devices=None if devices is None else jax.devices()[:devices])
    tree = worker_tree()
    mean, total = runner.get(runner.map(both(runner.axis_name))(runner.put(tree)))
    for k, x in tree.items():
        ref = x.astype(np.float64)  # the int32 leaf goes through jax.lax
        np.testing.assert_allclose(mean[k], np.broadcast_to(ref.mean(0), x.shape), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(total[k], np.broadcast_to(ref.sum(0), x.shape), rtol=1e-6, atol=1e-6)


def test_vmap_sums_slices_in_worker_order():
    x = worker_tree(6)["a"]
    got = np.asarray(jax.jit(jax.vmap(lambda t: collectives.psum(t, "workers"), axis_name="workers"))(x))
    in_order = ((((x[0] + x[1]) + x[2]) + x[3]) + x[4]) + x[5]  # float32, as numpy adds them
    np.testing.assert_array_equal(got, np.broadcast_to(in_order, x.shape))  # bit for bit: deterministic


def test_no_reduction_under_vmap_and_only_an_all_reduce_across_devices():
    tree = worker_tree()
    vmapped = jax.jit(jax.vmap(both("workers"), axis_name="workers")).lower(tree).compile().as_text()
    plain = jax.jit(jax.vmap(lambda t: jax.lax.psum(t["a"], "workers"), axis_name="workers")).lower(tree).compile()
    assert REDUCE.search(plain.as_text())  # the pattern does see what lax.psum becomes
    assert not REDUCE.search(vmapped)
    runner = WorkerRunner(W, "shard_map", devices=jax.devices()[:4])  # ("devices", "workers")
    text = runner.map(both(runner.axis_name)).lower(runner.put(tree)).compile().as_text()
    assert "all-reduce" in text and "all-gather" not in text and not REDUCE.search(text)


def test_gradient_through_the_mean_equals_jax_lax():
    x = worker_tree()["a"]

    def loss(pmean):
        return lambda x: jnp.sum(jax.vmap(lambda a: jnp.sin(pmean(a, "workers")) * a, axis_name="workers")(x))

    np.testing.assert_allclose(jax.grad(loss(collectives.pmean))(x), jax.grad(loss(jax.lax.pmean))(x), rtol=1e-6,
                               atol=1e-7)


def test_data_parallel_step_has_no_worker_reduction_under_vmap():
    params = {"w": np.zeros((W, 16, 4), np.float32)}
    tx = data_parallel(optax.sgd(0.1))
    state = jax.vmap(tx.init)(params)
    text = jax.jit(jax.vmap(tx.update, axis_name="workers")).lower(params, state).compile().as_text()
    assert not REDUCE.search(text)
