"""tpSGD against a float64 numpy re-implementation of the local target-projection gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.transforms.tpsgd import scale_by_target_projection, tpsgd


def _mlp_params(rng):
    return {"layers": [{"kernel": jnp.asarray(rng.normal(size=(5, 6)) * 0.5, jnp.float32), "bias": jnp.zeros(6)},
                       {"kernel": jnp.asarray(rng.normal(size=(6, 4)) * 0.5, jnp.float32), "bias": jnp.zeros(4)},
                       {"kernel": jnp.asarray(rng.normal(size=(4, 3)) * 0.5, jnp.float32), "bias": jnp.zeros(3)}]}


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_local_gradients_match_reference(activation):
    rng = np.random.default_rng(0)
    params = _mlp_params(rng)
    x = rng.normal(size=(7, 5))
    y = rng.integers(0, 3, size=7)
    tx = scale_by_target_projection(["layers/0", "layers/1"], num_classes=3, activation=activation, seed=3)
    state = tx.init(params)
    act = (lambda a: np.maximum(a, 0)) if activation == "relu" else np.tanh
    dact = (lambda a: (a > 0).astype(float)) if activation == "relu" else (lambda a: 1 - np.tanh(a) ** 2)
    h, inputs, preacts, expected = x, [], [], []
    onehot = np.eye(3)[y]
    for i in range(2):
        w = np.asarray(params["layers"][i]["kernel"], np.float64)
        a = h @ w
        b_l = np.asarray(state.projections["layers"][i]["kernel"], np.float64)
        np.testing.assert_array_equal(b_l, np.asarray(state.projections["layers"][i]["bias"]))  # one B per layer
        delta = (act(a) - onehot @ b_l) * dact(a) / 7
        expected.append((h.T @ delta, delta.sum(0)))
        inputs.append(h.astype(np.float32))
        preacts.append(a.astype(np.float32))
        h = act(a)
    head = {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full(3, -1.0)}  # the output layer's (local) gradient
    grads = {"layers": [jax.tree.map(jnp.ones_like, params["layers"][0]),
                        jax.tree.map(jnp.ones_like, params["layers"][1]), head]}
    out, new_state = tx.update(grads, state, params, layer_inputs=inputs, layer_preacts=preacts, labels=y)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(out["layers"][i]["kernel"]), expected[i][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["layers"][i]["bias"]), expected[i][1], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["layers"][2]["kernel"]), 2.0)
    np.testing.assert_array_equal(np.asarray(out["layers"][2]["bias"]), -1.0)
    assert new_state is state  # the projections are fixed


def test_projections_differ_by_layer_and_seed():
    params = _mlp_params(np.random.default_rng(0))
    s0 = scale_by_target_projection(["layers/0", "layers/1"], 3, seed=0).init(params)
    s1 = scale_by_target_projection(["layers/0", "layers/1"], 3, seed=1).init(params)
    b00 = np.asarray(s0.projections["layers"][0]["kernel"])
    assert b00.shape == (3, 6) and s0.projections["layers"][2]["kernel"].shape == (0,)
    assert not np.allclose(b00[:, :4], np.asarray(s0.projections["layers"][1]["kernel"]))
    assert not np.allclose(b00, np.asarray(s1.projections["layers"][0]["kernel"]))


def test_sgd_step_and_errors():
    params = _mlp_params(np.random.default_rng(0))
    tx = tpsgd(0.5, ["layers/0"], 3)
    state = tx.init(params)
    g = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="layer_inputs"):
        tx.update(g, state, params)
    with pytest.raises(ValueError, match="activation must be one of"):
        tpsgd(0.1, ["layers/0"], 3, activation="swish")
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        tpsgd(0.1, ["layers/0"], 0)
    x = np.ones((2, 5), np.float32)
    a = x @ np.asarray(params["layers"][0]["kernel"])
    u, _ = tx.update(g, state, params, layer_inputs=[x], layer_preacts=[a], labels=np.array([0, 1]))
    ref, _ = scale_by_target_projection(["layers/0"], 3).update(
        g, scale_by_target_projection(["layers/0"], 3).init(params), params, layer_inputs=[x], layer_preacts=[a],
        labels=np.array([0, 1]))
    np.testing.assert_allclose(np.asarray(u["layers"][0]["kernel"]), -0.5 * np.asarray(ref["layers"][0]["kernel"]))


def test_layer_rule_is_the_transforms():
    from jaxopt_lab.transforms.tpsgd import target_projection_grad

    rng = np.random.default_rng(2)
    params = _mlp_params(rng)
    tx = scale_by_target_projection(["layers/0"], 3, activation="tanh")
    state = tx.init(params)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    a = x @ np.asarray(params["layers"][0]["kernel"])
    y = np.array([0, 2, 1, 2])
    out, _ = tx.update(params, state, params, layer_inputs=[x], layer_preacts=[a], labels=y)
    g_w, g_b = target_projection_grad(x, a, y, state.projections["layers"][0]["kernel"], "tanh")
    np.testing.assert_array_equal(np.asarray(out["layers"][0]["kernel"]), np.asarray(g_w))
    np.testing.assert_array_equal(np.asarray(out["layers"][0]["bias"]), np.asarray(g_b))


def test_conv_layer_local_gradient_matches_reference():
    from jaxopt_lab.transforms.tract import conv_patches

    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5, 4, 2)).astype(np.float32)
    k = (rng.normal(size=(3, 3, 2, 4)) * 0.5).astype(np.float32)
    params = {"conv": {"kernel": jnp.asarray(k), "bias": jnp.zeros(4)}, "head": jnp.zeros((4, 3))}
    tx = scale_by_target_projection(["conv"], 3, activation="tanh", seed=1)
    state = tx.init(params)
    patches = np.asarray(conv_patches(x, (3, 3), 1, "SAME"), np.float64)
    a = (patches @ k.reshape(-1, 4).astype(np.float64)).reshape(3, 5, 4, 4)
    y = np.array([2, 0, 1])
    out, _ = tx.update(params, state, params, layer_inputs=[patches.astype(np.float32)],
                       layer_preacts=[a.astype(np.float32)], labels=y)
    from jaxopt_lab.transforms.tpsgd import conv_projection

    b_l = np.asarray(conv_projection(1, 0, 3, (5, 4, 4)), np.float64)  # DRTP: a target per unit and position
    t = (np.eye(3)[y] @ b_l).reshape(a.shape)
    delta = ((np.tanh(a) - t) * (1 - np.tanh(a) ** 2) / 3).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(out["conv"]["kernel"]), (patches.T @ delta).reshape(k.shape),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["conv"]["bias"]), delta.sum(0), rtol=1e-4, atol=1e-6)
