"""TrAct against float64 numpy references of the paper's closed form and the official code's two forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.transforms.tract import conv_patches, scale_by_tract, tract


def _official_linear(x, g_out, lam):
    """The official TrActLinearFunction's weight gradient (torch layout (out, in)), both branches, float64."""
    b, n = x.shape
    if b < n:  # Woodbury branch
        aat = x @ x.T / b
        inner = aat @ np.linalg.inv(aat / lam + np.eye(b))
        return g_out.T @ (np.eye(b) - inner / lam) @ x / lam
    return g_out.T @ x @ np.linalg.inv(x.T @ x / b + lam * np.eye(n))


@pytest.mark.parametrize("b,n", [(7, 3), (2, 5)])  # both of the official code's branches
def test_dense_first_layer_matches_the_official_closed_form(b, n):
    rng = np.random.default_rng(b)
    x = rng.normal(size=(b, n))
    g_out = rng.normal(size=(b, 4))  # dL/dZ
    params = {"first": {"kernel": jnp.zeros((n, 4)), "bias": jnp.zeros(4)}, "head": jnp.zeros((4, 2))}
    grads = {"first": {"kernel": jnp.asarray(x.T @ g_out, jnp.float32), "bias": jnp.ones(4)},
             "head": jnp.full((4, 2), 3.0)}
    tx = scale_by_tract("first/kernel", l=0.1)
    out, _ = tx.update(grads, tx.init(params), params, first_layer_input=x.astype(np.float32))
    expected = _official_linear(x, g_out, 0.1).T  # flax layout (in, out)
    np.testing.assert_allclose(np.asarray(out["first"]["kernel"]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["first"]["bias"]), 1.0)  # bias gradient unchanged
    np.testing.assert_array_equal(np.asarray(out["head"]), 3.0)


def test_conv_patches_give_the_convolution_and_tract_conv_matches_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 5, 2)).astype(np.float32)
    k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    conv = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    p = np.asarray(conv_patches(x, (3, 3), 1, "SAME"), np.float64)
    np.testing.assert_allclose(p @ k.reshape(-1, 4), np.asarray(conv).reshape(-1, 4), rtol=1e-4, atol=1e-4)
    g = rng.normal(size=k.shape)
    params = {"conv": jnp.asarray(k)}
    tx = tract(1.0, "conv", l=0.5)
    out, _ = tx.update({"conv": jnp.asarray(g, jnp.float32)}, tx.init(params), params, first_layer_input=p)
    a = p.T @ p / p.shape[0] + 0.5 * np.eye(18)
    expected = -np.linalg.solve(a, g.reshape(18, 4)).reshape(k.shape)  # sgd: minus lr times the direction
    np.testing.assert_allclose(np.asarray(out["conv"]), expected, rtol=1e-4, atol=1e-5)


def test_activation_proposal_is_reached_in_the_limit_of_small_lambda():
    # TrAct's derivation: the weight step that best reaches Z - eta G. For lambda -> 0 and b >= n,
    # X (W - eta g~) equals the least-squares projection of the proposal onto the inputs' span.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3))
    w = rng.normal(size=(3, 2))
    g_out = rng.normal(size=(20, 2))
    params = {"w": jnp.asarray(w, jnp.float32)}
    tx = scale_by_tract("w", l=1e-6)
    gt, _ = tx.update({"w": jnp.asarray(x.T @ g_out, jnp.float32)}, tx.init(params), params, first_layer_input=x)
    eta = 0.3
    z_new = x @ (w - eta * np.asarray(gt["w"], np.float64))
    proposal = x @ w - eta * 20 * g_out  # the step on the activations (the mean loss's gradient is G/b)
    best = x @ np.linalg.lstsq(x, proposal, rcond=None)[0]
    np.testing.assert_allclose(z_new, best, rtol=1e-3, atol=1e-3)


def test_errors_name_the_problem():
    params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match="at most one leaf"):
        scale_by_tract(lambda p: {"a": True, "b": True}).init(params)
    with pytest.raises(ValueError, match="l must be > 0"):
        scale_by_tract("a", l=0.0)
    tx = scale_by_tract("a")
    with pytest.raises(ValueError, match="first_layer_input"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="has 4 features per row.*needs 3"):
        tx.update(params, tx.init(params), params, first_layer_input=np.ones((5, 4)))
    with pytest.raises(ValueError, match="2-D dense or 4-D conv"):
        scale_by_tract("v").init({"v": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"first_layer 'layers/0/kernel' matches no parameter; the paths are \['a', 'b'\]"):
        scale_by_tract("layers/0/kernel").init(params)
    with pytest.raises(ValueError, match=r"TrAct's first layer \['a'\] is complex64: only real kernels"):
        scale_by_tract("a").init({"a": jnp.zeros((3, 2), jnp.complex64)})


def test_under_jit_in_a_chain_with_adam():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = optax.chain(scale_by_tract("w"), optax.adam(1e-2))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    step = jax.jit(lambda g, s, p, x: tx.update(g, s, p, first_layer_input=x))
    u, _ = step(params, tx.init(params), params, x)
    assert np.isfinite(np.asarray(u["w"])).all()


def test_embedding_token_ids_equal_the_one_hot_closed_form():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, size=(4, 5))  # (batch, sequence) of a vocab of 6 (token 5 may be absent)
    g = rng.normal(size=(6, 3))
    params = {"embed": jnp.zeros((6, 3))}
    tx = scale_by_tract("embed", l=0.1)
    out, _ = tx.update({"embed": jnp.asarray(g, jnp.float32)}, tx.init(params), params, first_layer_input=ids)
    x = np.eye(6)[ids.reshape(-1)]  # one-hot rows
    expected = np.linalg.solve(x.T @ x / x.shape[0] + 0.1 * np.eye(6), g)
    np.testing.assert_allclose(np.asarray(out["embed"]), expected, rtol=1e-5, atol=1e-6)
