"""LoRA-GGPO against a float64 numpy re-implementation of its perturbation rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.finetune import freeze_base, lora_ggpo, remove_perturbation
from jaxopt_lab.finetune.lora_ggpo import _noise

S, SIGMA, BETA, SEED, LR = 2.0, 0.05, 0.5, 3, 0.1


def _params(rng):
    return {"layer": {"kernel": jnp.asarray(rng.normal(size=(6, 5))), "bias": jnp.zeros(5),
                      "lora": {"lora_a": jnp.asarray(rng.normal(size=(6, 2))),
                               "lora_b": jnp.asarray(0.1 * rng.normal(size=(2, 5)))}}}


def _grads(rng, params):
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)


def test_two_steps_match_the_float64_rule_and_the_perturbation_is_removed_exactly():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = _params(rng)
        w0 = np.asarray(params["layer"]["kernel"])
        tx = lora_ggpo(freeze_base(optax.sgd(LR)), sigma=SIGMA, beta=BETA, scale=S, seed=SEED)
        state = tx.init(params)
        a, b = np.asarray(params["layer"]["lora"]["lora_a"]), np.asarray(params["layer"]["lora"]["lora_b"])
        eps_old = np.zeros_like(w0)
        for step in range(2):
            grads = _grads(rng, params)
            ga, gb = np.asarray(grads["layer"]["lora"]["lora_a"]), np.asarray(grads["layer"]["lora"]["lora_b"])
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            # the reference: SGD on the adapters, the frozen kernel moved from W + eps_t to W + eps_{t+1}
            a1, b1 = a - LR * ga, b - LR * gb
            g = S * (a @ gb + ga @ b)
            merged = w0 + S * a1 @ b1
            std = (SIGMA * np.linalg.norm(merged, axis=0) + BETA * np.linalg.norm(g, axis=0)) / np.sqrt(6)
            noise = np.asarray(_noise(SEED, jnp.asarray(step + 1), 0, w0.shape, jnp.float64))
            eps_new = std[None, :] * noise
            np.testing.assert_allclose(np.asarray(state.std[0]), std, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(params["layer"]["kernel"]), w0 + eps_new, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(params["layer"]["lora"]["lora_a"]), a1, rtol=1e-12)
            np.testing.assert_array_equal(np.asarray(params["layer"]["bias"]), 0.0)  # frozen, not perturbed
            assert not np.allclose(eps_new, eps_old)  # fresh noise every step
            a, b, eps_old = a1, b1, eps_new
        clean = remove_perturbation(params, state, seed=SEED)
        np.testing.assert_allclose(np.asarray(clean["layer"]["kernel"]), w0, atol=1e-12)


def test_zero_sigma_and_beta_is_the_inner_method_exactly():
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), _params(rng))
    grads = jax.tree.map(lambda x: x.astype(jnp.float32), _grads(rng, params))
    inner = freeze_base(optax.adam(1e-2))
    tx = lora_ggpo(inner, sigma=0.0, beta=0.0, scale=S)
    u, _ = tx.update(grads, tx.init(params), params)
    v, _ = inner.update(grads, inner.init(params), params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), u, v)


def test_bad_arguments_and_a_frozen_kernel_it_cannot_see_are_refused():
    for kwargs, word in ((dict(sigma=-1.0), "sigma"), (dict(beta=-1.0), "beta"), (dict(scale=0.0), "scale"),
                         (dict(norm_dim="rows"), "norm_dim"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=word):
            lora_ggpo(optax.sgd(0.1), **kwargs)
    tx = freeze_base(lora_ggpo(optax.sgd(0.1)))  # inside the freeze: the kernels never reach it
    with pytest.raises(ValueError, match="outside freeze_base"):
        tx.init(_params(np.random.default_rng(0)))
