import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed.accounting import (
    ByteCount,
    CommBytes,
    add_bytes,
    add_message_bytes,
    add_pmean_bytes,
    communicated_bytes,
    ring_all_reduce_bytes,
    tree_bytes,
    wire_bytes,
    zero_bytes,
    zero_comm,
)


def test_counts_past_int32_exactly():
    count = zero_bytes()
    big = 3 * 2**30 + 12345  # > 2**31 after two adds
    for n in (big, big, 7):
        count = add_bytes(count, n)
    assert communicated_bytes(count) == 2 * big + 7
    traced = add_bytes(zero_bytes(), jnp.int32(2**31 - 1))
    traced = add_bytes(traced, jnp.int32(2**31 - 1))
    assert communicated_bytes(traced) == 2 * (2**31 - 1)


def test_tree_bytes_and_nested_states():
    tree = {"a": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros((5,), jnp.bfloat16)}
    assert tree_bytes(tree) == 3 * 4 * 4 + 5 * 2
    state = (optax.EmptyState(), {"x": add_bytes(zero_bytes(), 10)}, [add_bytes(zero_bytes(), 2**20 + 1)])
    assert communicated_bytes(state) == 10 + 2**20 + 1
    stacked = ByteCount(jnp.array([1, 2], jnp.int32), jnp.array([3, 4], jnp.int32))
    np.testing.assert_array_equal(communicated_bytes(stacked), [2**20 + 3, 2 * 2**20 + 4])


def test_add_bytes_times_is_exact_past_int32():
    for n, times in ((2**31 - 1, 7), (3 * 2**20 + 12345, 1023), (2**20 - 1, 2**21 - 1), (5, 0)):
        for nbytes in (n, jnp.int32(n)):
            assert communicated_bytes(add_bytes(add_bytes(zero_bytes(), 2**20 - 3), nbytes, times)) == 2**20 - 3 + n * times


def test_ring_all_reduce_hand_counts():
    # W chunks of n / W: reduce-scatter sends W - 1 of them, all-gather another W - 1
    assert ring_all_reduce_bytes(1000, 8) == 1750  # 2 * 7 * 125
    assert ring_all_reduce_bytes(24, 4) == 36
    assert ring_all_reduce_bytes(10, 4) == 15
    assert ring_all_reduce_bytes(10, 3) == 14  # 40 / 3 = 13.3, rounded up
    assert ring_all_reduce_bytes(10, 1) == 0  # one worker sends nothing


def _per_worker(fn, w, *args):
    count = jax.vmap(lambda *a: fn(zero_comm(), *a), axis_name="workers")(*args)
    return communicated_bytes(count), wire_bytes(count)


def test_payload_and_wire_per_worker_under_the_stated_model():
    w = 8
    # dense all-reduce of 1000 bytes: payload once, wire 2 (W-1) / W of it
    payload, wire = _per_worker(lambda c, _: add_pmean_bytes(c, 1000, "workers"), w, jnp.zeros(w))
    np.testing.assert_array_equal(payload, [1000] * w)
    np.testing.assert_array_equal(wire, [1750] * w)
    # compressed payloads of different sizes (DGC): all-gathered, W - 1 times each worker's own;
    # the mean over workers is exactly what a worker receives on average (the others' payloads)
    sizes = jnp.arange(1, w + 1, dtype=jnp.int32) * 100
    payload, wire = _per_worker(lambda c, n: add_pmean_bytes(c, n, "workers", compressed=True), w, sizes)
    np.testing.assert_array_equal(payload, np.asarray(sizes))
    np.testing.assert_array_equal(wire, 7 * np.asarray(sizes))
    received = [int(sizes.sum() - s) for s in sizes]
    assert wire.mean() == np.mean(received)
    # gossip: 2 messages of 1000 bytes, payload = wire; 2000 / 1750 = 1.14x DDP on the wire, not 2x
    payload, wire = _per_worker(lambda c, _: add_message_bytes(c, 1000, times=2), w, jnp.zeros(w))
    np.testing.assert_array_equal(payload, [2000] * w)
    np.testing.assert_array_equal(wire, [2000] * w)
    # several workers per device: the axis is a tuple of names, W their product
    count = jax.vmap(jax.vmap(lambda _: add_pmean_bytes(zero_comm(), 1000, ("devices", "workers")),
                              axis_name="workers"), axis_name="devices")(jnp.zeros((2, 4)))
    np.testing.assert_array_equal(wire_bytes(count), np.full((2, 4), 1750))


def test_comm_counts_in_nested_states_are_not_counted_twice():
    comm = add_message_bytes(zero_comm(), 10)
    comm = CommBytes(comm.payload, add_bytes(comm.wire, 5))
    state = (optax.EmptyState(), {"x": comm}, [add_bytes(zero_bytes(), 7)])
    assert communicated_bytes(state) == 10 + 7  # a bare ByteCount is payload
    assert wire_bytes(state) == 15
    with pytest.raises(TypeError, match="static bytes"):
        jax.vmap(lambda n: add_pmean_bytes(zero_comm(), n, "workers"), axis_name="workers")(jnp.ones(2, jnp.int32))
    with pytest.raises(ValueError, match=r"times must be an int in \[0, 2\*\*21\), got -1"):
        add_bytes(zero_bytes(), 3, times=-1)
