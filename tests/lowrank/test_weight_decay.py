"""The official GaLore/APOLLO/Fira weight-decay order, W ← (1 − η_t λ)(W + u), against a float64 replay."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank._weight_decay import decay_updated_weights

WD = 0.3


def _schedule(count):
    return 0.1 / (1.0 + count)  # 0.1, 0.05, 0.0333...


def test_decay_applies_to_the_updated_weights_with_the_schedule_of_the_step():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": None}
    tx = optax.chain(optax.scale_by_learning_rate(_schedule), decay_updated_weights(_schedule, WD))
    state = tx.init(params)
    w = optax_order = np.asarray(params["w"], np.float64)
    for t in range(3):
        g = rng.standard_normal((3, 2))
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32), "b": None}, state, params)
        assert updates["b"] is None
        params = optax.apply_updates(params, updates)
        lr = 0.1 / (1.0 + t)
        w = (1 - lr * WD) * (w - lr * g)  # GaLoreAdamW: p.add_(u, alpha=-lr); p.add_(p, alpha=-lr*wd)
        optax_order = optax_order - lr * (g + WD * optax_order)
        np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-6, atol=1e-6)
    assert np.abs(optax_order - w).max() > 1e-3  # optax's AdamW order differs by η²λg per step


def test_decay_needs_params():
    tx = decay_updated_weights(0.1, WD)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


def test_decay_takes_complex_hyperparameters_and_complex_leaves():
    # inject_hyperparams casts lr and λ to complex64 when the params' first leaf is complex: a real leaf
    # keeps its dtype and takes no ComplexWarning, a complex leaf is decayed as a complex number
    params = {"a": jnp.asarray([1.0 + 2j, -1j], jnp.complex64), "w": jnp.asarray([[1.0, -2.0]], jnp.float32)}
    updates = {"a": jnp.asarray([0.5j, 1.0], jnp.complex64), "w": jnp.asarray([[0.25, 0.5]], jnp.float32)}
    tx = optax.inject_hyperparams(decay_updated_weights)(learning_rate=0.1, weight_decay=WD)
    state = tx.init(params)
    assert state.hyperparams["weight_decay"].dtype == jnp.complex64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = jax.jit(tx.update)(updates, state, params)
    assert out["a"].dtype == jnp.complex64 and out["w"].dtype == jnp.float32
    for k in params:
        p, u = np.asarray(params[k], np.complex128), np.asarray(updates[k], np.complex128)
        np.testing.assert_allclose(np.asarray(out[k]), u - 0.1 * WD * (p + u), rtol=1e-6)
