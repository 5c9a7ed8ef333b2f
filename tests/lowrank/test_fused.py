"""GaLore / Fira with ``fused=`` (the Pallas kernels, in interpret mode here) equal the unfused transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import fira, galore

RNG = np.random.default_rng(3)
# a wide (left-projected) and a tall (right-projected, read transposed) matrix, a bias, a non-projected matrix
PARAMS = {"wide": jnp.asarray(RNG.standard_normal((12, 20)), jnp.float32),
          "tall": jnp.asarray(RNG.standard_normal((18, 10)), jnp.float32),
          "bias": jnp.zeros((20,), jnp.float32),
          "head": jnp.asarray(RNG.standard_normal((10, 4)), jnp.float32)}
LABELS = {"wide": True, "tall": True, "bias": False, "head": False}


def _trajectory(tx, steps=5, dtype=jnp.float32):
    params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for t in range(steps):
        g = jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape) * (1 + t), dtype), params)
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out, state


@pytest.mark.parametrize("method", [galore, fira])
def test_fused_equals_unfused_across_a_refresh(method):
    kwargs = dict(rank=4, update_proj_gap=3, label_fn=LABELS)
    global RNG
    RNG = np.random.default_rng(3)
    plain, plain_state = _trajectory(method(1e-2, **kwargs))
    RNG = np.random.default_rng(3)
    fused, fused_state = _trajectory(method(1e-2, fused="interpret", **kwargs))
    for a, b in zip(plain, fused):
        for k in PARAMS:
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-5, atol=1e-6)
    assert int(fused_state[0].count) == 5


def test_fused_keeps_bf16_and_rejects_unknown_impl():
    out, _ = _trajectory(fira(1e-2, rank=4, label_fn=LABELS, fused="interpret"), steps=2, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(out[-1]))
    with pytest.raises(ValueError, match="impl must be one of"):
        galore(1e-2, fused="triton")
