"""kernels_as_matrices: a matrix method on conv kernels equals that method on the reshaped kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import galore, kernels_as_matrices, optimizer_state_bytes


def trees(seed):
    rng = np.random.default_rng(seed)
    shapes = {"conv": (3, 3, 4, 8), "dense": (6, 5), "bias": (8,)}
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def matrices(tree):
    return {k: v.reshape(-1, v.shape[-1]) if v.ndim > 2 else v for k, v in tree.items()}


def run(tx, params, steps=3):
    state = tx.init(params)
    out = []
    for t in range(steps):
        updates, state = tx.update(trees(10 + t) if params["conv"].ndim == 4 else matrices(trees(10 + t)),
                                   state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out, state


@pytest.mark.parametrize("make", [lambda: galore(1e-2, rank=2, update_proj_gap=2, weight_decay=0.1),
                                  lambda: optax.adamw(1e-2)], ids=["galore", "adamw"])
def test_equals_the_method_on_the_reshaped_kernels(make):
    params = trees(0)
    wrapped, state = run(kernels_as_matrices(make()), params)
    plain, plain_state = run(make(), matrices(params))
    for w, p in zip(wrapped, plain):
        assert w["conv"].shape == (3, 3, 4, 8)
        for k in w:
            np.testing.assert_array_equal(np.asarray(w[k]).reshape(p[k].shape), np.asarray(p[k]), err_msg=k)
    assert optimizer_state_bytes(state) == optimizer_state_bytes(plain_state)


def test_galore_projects_the_conv_kernel():
    params = trees(0)
    _, state = run(kernels_as_matrices(galore(1e-2, rank=2, update_proj_gap=2)), params, steps=1)
    _, full = run(optax.adam(1e-2), params, steps=1)
    # the (36 x 8) conv matrix keeps rank-2 moments (2 x 36 after projecting its smaller side), not 288
    assert optimizer_state_bytes(state) < optimizer_state_bytes(full)
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "shape")]
    assert any(x.shape in ((2, 36), (36, 2)) for x in leaves)


def test_needs_a_transformation():
    with pytest.raises(TypeError, match="GradientTransformation as inner, got 3"):
        kernels_as_matrices(3)
