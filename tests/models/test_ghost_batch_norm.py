"""GhostBatchNorm against a float64 numpy re-implementation of Hoffer et al.'s Algorithm 1, and nnx.BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.models import GhostBatchNorm

# one compiled program per layer and shape instead of one per eager op (compilation dominates here)
apply = nnx.jit(lambda layer, x: layer(x))


def reference(x, ghost, gamma, beta, mean, var, momentum, eps):
    """Per ghost batch: normalize with its own biased statistics; EMA of the running stats, one ghost at a time."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    mean, var = np.asarray(mean, np.float64).copy(), np.asarray(var, np.float64).copy()
    axes = tuple(range(x.ndim - 1))
    for start in range(0, x.shape[0], ghost):
        g = x[start:start + ghost]
        mu, v = g.mean(axis=axes), g.var(axis=axes)
        out[start:start + ghost] = gamma * (g - mu) / np.sqrt(v + eps) + beta
        mean = momentum * mean + (1 - momentum) * mu
        var = momentum * var + (1 - momentum) * v
    return out, mean, var


@pytest.mark.parametrize("shape,ghost", [((12, 5), 4), ((8, 3, 3, 6), 2), ((6, 4), 6)])
def test_matches_float64_reference(shape, ghost):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * 3 + rng.normal(size=shape[-1])
    layer = GhostBatchNorm(shape[-1], ghost, momentum=0.9, epsilon=1e-3)
    gamma, beta = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    mean0, var0 = rng.normal(size=shape[-1]), rng.uniform(0.5, 2, size=shape[-1])
    layer.scale[...], layer.bias[...] = jnp.asarray(gamma, jnp.float32), jnp.asarray(beta, jnp.float32)
    layer.mean[...], layer.var[...] = jnp.asarray(mean0, jnp.float32), jnp.asarray(var0, jnp.float32)
    y = apply(layer, jnp.asarray(x, jnp.float32))
    want, want_mean, want_var = reference(x, ghost, gamma, beta, mean0, var0, 0.9, 1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.mean[...], want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.var[...], want_var, rtol=1e-5, atol=1e-5)
    # evaluation: the running statistics, not the batch's
    layer.eval()
    x2 = rng.normal(size=shape)
    want_eval = gamma * (x2 - want_mean) / np.sqrt(want_var + 1e-3) + beta
    np.testing.assert_allclose(apply(layer, jnp.asarray(x2, jnp.float32)), want_eval, rtol=1e-4, atol=1e-4)


def test_equals_batch_norm_per_ghost_batch():
    x = jax.random.normal(jax.random.key(1), (16, 4, 4, 3)) * 2 + 0.5
    gbn = GhostBatchNorm(3, ghost_size=4)
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    y = apply(gbn, x)
    want = jnp.concatenate([apply(bn, x[i:i + 4]) for i in range(0, 16, 4)])
    np.testing.assert_allclose(y, want, atol=2e-6)
    np.testing.assert_allclose(gbn.mean[...], bn.mean[...], atol=1e-6)
    np.testing.assert_allclose(gbn.var[...], bn.var[...], atol=1e-6)
    # ghost_size = batch is batch norm
    full, bn2 = GhostBatchNorm(3, ghost_size=16), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(apply(full, x), apply(bn2, x), atol=2e-6)
    gbn.eval()
    bn.eval()
    np.testing.assert_allclose(apply(gbn, x[:5]), apply(bn, x[:5]), atol=2e-6)  # any batch size in evaluation


def test_under_jit_and_grad():
    layer = GhostBatchNorm(3, ghost_size=2)
    graphdef, params, stats = nnx.split(layer, nnx.Param, nnx.BatchStat)

    @jax.jit
    def f(p, s, x):
        m = nnx.merge(graphdef, p, s, copy=True)
        return jnp.sum(m(x) ** 2 * jnp.arange(3.0)), nnx.state(m, nnx.BatchStat)

    x = jax.random.normal(jax.random.key(0), (4, 3))
    (_, new_stats), g = jax.value_and_grad(f, has_aux=True)(params, stats, x)
    assert not np.allclose(new_stats["mean"][...], 0)
    assert np.all(np.isfinite(g["scale"][...]))


def test_errors():
    with pytest.raises(ValueError, match="ghost_size"):
        GhostBatchNorm(3, ghost_size=0)
    with pytest.raises(ValueError, match="momentum"):
        GhostBatchNorm(3, momentum=1.0)
    with pytest.raises(ValueError, match="not a multiple of ghost_size=4"):
        GhostBatchNorm(3, ghost_size=4)(jnp.ones((6, 3)))
    with pytest.raises(ValueError, match="expected inputs"):
        GhostBatchNorm(3)(jnp.ones((4, 2)))
