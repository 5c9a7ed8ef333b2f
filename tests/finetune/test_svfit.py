"""SVFit: the split against a float64 numpy SVD, identity at the pretrained singular values,
forward with changed singular values against float64, only the singular values train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.finetune import SVFitLinear, apply_svfit, freeze_all_but_singular_values, merge_svfit
from jaxopt_lab.finetune.lora import flatten_with_paths
from jaxopt_lab.lowrank.memory import optimizer_state_bytes


class Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 12, rngs=rngs)
        self.b = nnx.Linear(12, 6, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


X = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)


def ref_forward(params, x, new_s):
    """float64: W' = W - U_r S_r V_r^T + U_r diag(new_s) V_r^T from numpy's SVD of W."""
    h = np.asarray(x, np.float64)
    for i, name in enumerate("ab"):
        w, b = params[name]
        u, s, vt = np.linalg.svd(w)
        r = len(new_s[name])
        w2 = w - (u[:, :r] * s[:r]) @ vt[:r] + (u[:, :r] * new_s[name]) @ vt[:r]
        h = h @ w2 + b
        if i == 0:
            h = np.tanh(h)
    return h


def params64(model):
    return {n: (np.asarray(getattr(model, n).kernel[...], np.float64), np.asarray(getattr(model, n).bias[...], np.float64))
            for n in "ab"}


def test_pretrained_singular_values_give_the_pretrained_model_and_changed_ones_match_float64():
    model = Net(nnx.Rngs(0))
    before = np.asarray(model(X))
    p = params64(model)
    assert apply_svfit(model, ".*", rank=3) == ["a", "b"]
    assert isinstance(model.a, SVFitLinear) and model.a.svfit_s[...].shape == (3,)
    np.testing.assert_allclose(np.asarray(model(X)), before, rtol=1e-5, atol=1e-5)
    s_ref = {n: np.linalg.svd(p[n][0], compute_uv=False)[:3] for n in "ab"}
    np.testing.assert_allclose(np.asarray(model.a.svfit_s[...]), s_ref["a"], rtol=1e-6)
    new_s = {n: s_ref[n] * np.array([1.5, 0.2, -0.7]) for n in "ab"}
    for n in "ab":
        getattr(model, n).svfit_s[...] = jnp.asarray(new_s[n], jnp.float32)
    np.testing.assert_allclose(np.asarray(model(X)), ref_forward(p, X, new_s), rtol=1e-4, atol=1e-5)
    out = np.asarray(model(X))
    assert merge_svfit(model) == ["a", "b"]
    assert type(model.a) is nnx.Linear
    np.testing.assert_allclose(np.asarray(model(X)), out, rtol=1e-5, atol=1e-5)


def test_full_rank_residual_is_zero_and_energy_picks_the_rank():
    model = Net(nnx.Rngs(0))
    w = np.asarray(model.a.kernel[...], np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    expected = int(np.argmax(share >= 0.9)) + 1
    apply_svfit(model, "a", energy=0.9)
    assert model.a.rank == expected
    model2 = Net(nnx.Rngs(0))
    apply_svfit(model2, "a", rank=8)
    np.testing.assert_allclose(np.asarray(model2.a.kernel[...]), 0.0, atol=1e-5)


def test_only_the_singular_values_train_and_hold_optimizer_state():
    model = Net(nnx.Rngs(0))
    apply_svfit(model, ".*", rank=2)
    params = nnx.state(model, nnx.Param)
    tx = freeze_all_but_singular_values(optax.adam(1e-2), train_also="b/bias")
    state = tx.init(params)
    assert optimizer_state_bytes(state) == 2 * 4 * (2 + 2 + 6) + 4  # m, v of 2 x svfit_s (2) and b/bias (6); count

    def loss(p):
        m = nnx.merge(nnx.graphdef(model), p)
        return jnp.sum(m(X) ** 2)

    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, state, params)
    paths, leaves, _ = flatten_with_paths(updates)
    flat = dict(zip(paths, leaves))
    for path, v in flat.items():
        trains = path.endswith("svfit_s") or path == "b/bias"
        assert bool(np.any(np.asarray(v) != 0)) == trains, path


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "positive int"), ({"rank": 9}, "larger than"), ({}, "exactly one"),
    ({"rank": 2, "energy": 0.9}, "exactly one"), ({"energy": 1.5}, "energy"), ({"rank": 2, "targets": "zz"}, "match none")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_svfit(Net(nnx.Rngs(0)), **kwargs)
