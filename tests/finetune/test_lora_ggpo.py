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


def _sd_scripts_std(w0, a, b, ga, gb, s, sigma, beta, norm_dim, grad_power):
    """The per-output-unit std of sd-scripts' ``LoRAModule`` (networks/lora_flux.py) in float64 numpy,
    in its PyTorch orientation (weights out x in: lora_down = Aᵀ (r x in), lora_up = Bᵀ (out x r)),
    with the exact merged-weight norm in place of its sampled estimate."""
    down, up, down_grad, up_grad = a.T, b.T, ga.T, gb.T
    weight = w0.T + s * up @ down  # W' (out x in)
    approx_grad = s * (up @ down_grad + up_grad @ down)  # update_grad_norms
    weight_norms = np.linalg.norm(weight, axis=1)  # dim=1: one per output unit
    grad_norms = np.linalg.norm(approx_grad, axis=1)
    n = weight.shape[0] if norm_dim == "out" else weight.shape[1]  # perturbation_norm_factor: 1/sqrt(shape[0])
    return (sigma * weight_norms + beta * grad_norms**grad_power) / np.sqrt(n)


@pytest.mark.parametrize("norm_dim,grad_power", [("out", 2), ("in", 1)], ids=["default", "in_p1"])
def test_two_steps_match_the_float64_rule_and_the_perturbation_is_removed_exactly(norm_dim, grad_power):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = _params(rng)
        w0 = np.asarray(params["layer"]["kernel"])
        kw = {} if (norm_dim, grad_power) == ("out", 2) else dict(norm_dim=norm_dim, grad_power=grad_power)
        tx = lora_ggpo(freeze_base(optax.sgd(LR)), sigma=SIGMA, beta=BETA, scale=S, seed=SEED, **kw)
        state = tx.init(params)
        a, b = np.asarray(params["layer"]["lora"]["lora_a"]), np.asarray(params["layer"]["lora"]["lora_b"])
        eps_old = np.zeros_like(w0)
        for step in range(2):
            grads = _grads(rng, params)
            ga, gb = np.asarray(grads["layer"]["lora"]["lora_a"]), np.asarray(grads["layer"]["lora"]["lora_b"])
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            # the reference: SGD on the adapters; the frozen kernel moved from W + eps_t to W + eps_{t+1}, eps_{t+1}
            # scaled by the norms of the step's pre-update merged weight and equivalent gradient (as sd-scripts)
            std = _sd_scripts_std(w0, a, b, ga, gb, S, SIGMA, BETA, norm_dim, grad_power)
            noise = np.asarray(_noise(SEED, jnp.asarray(step + 1), 0, w0.shape, jnp.float64))
            eps_new = std[None, :] * noise  # flax kernel (in x out): one std per column = output unit
            np.testing.assert_allclose(np.asarray(state.std[0]), std, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(params["layer"]["kernel"]), w0 + eps_new, rtol=1e-12, atol=1e-12)
            a1, b1 = a - LR * ga, b - LR * gb
            np.testing.assert_allclose(np.asarray(params["layer"]["lora"]["lora_a"]), a1, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(params["layer"]["lora"]["lora_b"]), b1, rtol=1e-12)
            np.testing.assert_array_equal(np.asarray(params["layer"]["bias"]), 0.0)  # frozen, not perturbed
            assert not np.allclose(eps_new, eps_old)  # fresh noise every step
            a, b, eps_old = a1, b1, eps_new
        clean = remove_perturbation(params, state, seed=SEED)
        np.testing.assert_allclose(np.asarray(clean["layer"]["kernel"]), w0, atol=1e-12)


def test_the_perturbation_is_gaussian_with_one_std_per_output_unit():
    """Over a tall kernel, each column of the perturbation (an output unit) has mean ~0 and the
    std the state reports, and the columns' stds differ as the norms do."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        n_in, n_out = 4000, 3
        w0 = rng.normal(size=(n_in, n_out)) * np.array([1.0, 3.0, 10.0])
        params = {"layer": {"kernel": jnp.asarray(w0), "lora": {"lora_a": jnp.asarray(rng.normal(size=(n_in, 2))),
                                                                "lora_b": jnp.zeros((2, n_out))}}}
        tx = lora_ggpo(freeze_base(optax.sgd(LR)), sigma=0.1, beta=0.0, scale=S)
        state = tx.init(params)
        updates, state = tx.update(_grads(rng, params), state, params)
        eps = np.asarray(optax.apply_updates(params, updates)["layer"]["kernel"]) - w0
        std = np.asarray(state.std[0])
        np.testing.assert_allclose(std, 0.1 * np.linalg.norm(w0, axis=0) / np.sqrt(n_out), rtol=1e-12)
        np.testing.assert_allclose(eps.std(axis=0) / std, 1.0, atol=0.05)  # 4000 draws: sd error ~1.1%
        assert np.all(np.abs(eps.mean(axis=0)) < 0.1 * std)


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
                         (dict(norm_dim="rows"), "norm_dim"), (dict(seed=-1), "seed"), (dict(grad_power=0), "grad_power"),
                         (dict(grad_power=True), "grad_power")):
        with pytest.raises(ValueError, match=word):
            lora_ggpo(optax.sgd(0.1), **kwargs)
    tx = freeze_base(lora_ggpo(optax.sgd(0.1)))  # inside the freeze: the kernels never reach it
    with pytest.raises(ValueError, match="outside freeze_base"):
        tx.init(_params(np.random.default_rng(0)))
