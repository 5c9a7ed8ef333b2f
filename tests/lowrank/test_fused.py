"""GaLore / Fira with ``fused=`` (the Pallas kernels in interpret mode, or their XLA reference) equal the unfused
transforms; Fira's two-pass default keeps the limiter norm exact when the residual is a sliver of the gradient."""

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


@pytest.mark.parametrize("method,impl", [(galore, "interpret"), (fira, "interpret"), (fira, "reference")])
def test_fused_equals_unfused_across_a_refresh(method, impl):
    kwargs = dict(rank=4, update_proj_gap=3, label_fn=LABELS)
    global RNG
    RNG = np.random.default_rng(3)
    plain, plain_state = _trajectory(method(1e-2, fused=False, **kwargs))
    RNG = np.random.default_rng(3)
    fused, fused_state = _trajectory(method(1e-2, fused=impl, **kwargs))
    for a, b in zip(plain, fused):
        for k in PARAMS:
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-5, atol=1e-6)
    assert int(fused_state[0].count) == 5


def test_fused_keeps_bf16_and_rejects_unknown_impl():
    out, _ = _trajectory(fira(1e-2, rank=4, label_fn=LABELS, fused="interpret"), steps=2, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(out[-1]))
    with pytest.raises(ValueError, match="impl must be one of"):
        galore(1e-2, fused="triton")


def _official_limiter_norms(grads, rank, b1=0.9, b2=0.999, eps=1e-6, gamma=1.01):
    """‖S_t‖ after limiting, as the official Fira computes it (S formed explicitly), in float64."""
    g0 = grads[0].astype(np.float64)
    p = np.linalg.svd(g0, full_matrices=False)[0][:, :rank]
    m = v = 0.0
    previous, out = 0.0, []
    for g in grads:
        g = g.astype(np.float64)
        r = p.T @ g
        m, v = b1 * m + (1 - b1) * r, b2 * v + (1 - b2) * r * r
        phi = np.linalg.norm(m / (np.sqrt(v) + eps), axis=0) / (np.linalg.norm(r, axis=0) + 1e-8)
        norm = np.linalg.norm((g - p @ r) * phi)
        limiter = max(norm / (previous + 1e-8), gamma) / gamma if previous > 0 else 1.0
        previous = norm / limiter
        out.append(previous)
    return np.array(out)


def test_fira_default_limiter_norm_is_exact_for_a_gradient_nearly_inside_the_projection():
    # rank-4 gradients plus a residual of 1e-3 of their size: the identity for ‖S‖² would cancel to ~2e-2 error
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((24, 4)), rng.standard_normal((4, 40))
    grads = [((a @ b) * (1 + 0.3 * t) + 1e-3 * (1 + t) ** 2 * rng.standard_normal((24, 40))).astype(np.float32)
             for t in range(4)]
    tx = fira(1e-2, rank=4, update_proj_gap=100, label_fn={"w": True})  # the default: two passes
    params = {"w": jnp.zeros((24, 40), jnp.float32)}
    state, step, norms = tx.init(params), jax.jit(tx.update), []
    for g in grads:
        _, state = step({"w": jnp.asarray(g)}, state, params)
        norms.append(float(jax.tree.leaves(state[0].extra)[0]))
    np.testing.assert_allclose(norms, _official_limiter_norms(grads, 4), rtol=1e-4)
