import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed.accounting import ByteCount, add_bytes, communicated_bytes, tree_bytes, zero_bytes


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
