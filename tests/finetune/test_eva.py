"""EVA: incremental PCA against batch PCA (float64 numpy), the rank redistribution against an
independent re-implementation, the adapters' A against the SVD of each layer's inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.finetune import IncrementalPCA, apply_lora, distribute_ranks, eva_init
from jaxopt_lab.finetune.lora import LoRALinear, lora_layers


class Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 12, rngs=rngs)
        self.b = nnx.Linear(12, 10, rngs=rngs)
        self.c = nnx.Linear(10, 6, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.a(x))
        h = jnp.tanh(self.b(h))
        return self.c(h)


rng = np.random.default_rng(0)
# anisotropic inputs so the explained variances differ across components and layers
X = (rng.normal(size=(96, 8)) * np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.3, 0.2, 0.1])).astype(np.float32)


def batch_pca(x):
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return s, vt, s ** 2 / np.sum(xc ** 2)


def test_incremental_pca_with_all_components_is_batch_pca():
    x = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)
    pca = IncrementalPCA(5)
    for chunk in np.split(x, [17, 30, 48]):
        pca.partial_fit(chunk)
    s, vt, ratio = batch_pca(x)
    np.testing.assert_allclose(pca.singular_values, s, rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(pca.components * vt, 1)), 1.0, rtol=1e-10)
    np.testing.assert_allclose(pca.explained_variance_ratio, ratio, rtol=1e-10)
    np.testing.assert_allclose(pca.mean, x.mean(0), rtol=1e-10)


def test_distribute_ranks_against_a_sort():
    ratios = {"x": np.array([0.5, 0.2, 0.01]), "y": np.array([0.3, 0.25, 0.2]), "z": np.array([0.05, 0.04, 0.03])}
    flat = sorted(((v, k) for k, vs in ratios.items() for v in vs), reverse=True)[:5]
    expected = {k: sum(1 for _, kk in flat if kk == k) for k in ratios}
    assert distribute_ranks(ratios, 5) == expected == {"x": 2, "y": 3, "z": 0}


def layer_inputs(model, x):
    """The inputs of a, b, c computed in float64 numpy from the model's parameters."""
    k = {n: np.asarray(getattr(model, n).kernel[...], np.float64) for n in "abc"}
    b = {n: np.asarray(getattr(model, n).bias[...], np.float64) for n in "abc"}
    x = np.asarray(x, np.float64)
    h1 = np.tanh(x @ k["a"] + b["a"])
    h2 = np.tanh(h1 @ k["b"] + b["b"])
    return {"a": x, "b": h1, "c": h2}


def test_eva_init_matches_the_svd_of_each_layers_inputs_and_keeps_the_model():
    model = Net(nnx.Rngs(0))
    before = np.asarray(model(X))
    inputs = layer_inputs(model, X)
    r, rho = 2, 2.0
    apply_lora(model, ".*", rank=r, alpha=4.0, rngs=nnx.Rngs(1))
    res = eva_init(model, [X], rho=rho, tau=0.99)
    # one batch repeated: the second incremental step has the same components -> converged after 2
    assert res.converged and res.steps == 2
    ratios = {}
    comps = {}
    for name, x in inputs.items():
        _, vt, ratio = batch_pca(x)
        ratios[name], comps[name] = ratio[:4], vt[:4]
    flat = sorted(((v, k) for k, vs in ratios.items() for v in vs), reverse=True)[: r * 3]
    expected = {k: sum(1 for _, kk in flat if kk == k) for k in ratios}
    assert res.ranks == expected and sum(expected.values()) == 6
    for name, layer in lora_layers(model):
        rk = expected[name]
        assert layer.lora_rank == rk and layer.alpha == 4.0 * rk / r  # PEFT adjust_scaling_factors: scale stays 4 / r
        a = np.asarray(layer.lora.lora_a[...], np.float64)
        np.testing.assert_allclose(np.abs(np.sum(a.T * comps[name][:rk], 1)), 1.0, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(layer.lora.lora_b[...]), 0.0)
    for name in "abc":  # rank 0: the adapter is gone
        assert isinstance(getattr(model, name), LoRALinear) == (expected[name] > 0)
    np.testing.assert_allclose(np.asarray(model(X)), before, rtol=1e-6, atol=1e-6)


def test_whiten_divides_by_the_square_root_of_the_singular_values():
    model = Net(nnx.Rngs(0))
    inputs = layer_inputs(model, X)
    apply_lora(model, "a", rank=2, rngs=nnx.Rngs(1))
    eva_init(model, [X], rho=1.0, whiten=True)
    s, vt, _ = batch_pca(inputs["a"])
    a = np.asarray(model.a.lora.lora_a[...], np.float64)
    s2 = np.sqrt(2.0) * s[:2]  # two incremental steps on the same batch: the singular values of [X; X]
    np.testing.assert_allclose(np.abs(a.T), np.abs(vt[:2] / np.sqrt(s2)[:, None]), rtol=1e-4, atol=1e-6)


def test_max_steps_warns_when_not_converged():
    model = Net(nnx.Rngs(0))
    apply_lora(model, ".*", rank=2, rngs=nnx.Rngs(1))
    batches = [rng.normal(size=(8, 8)).astype(np.float32) for _ in range(3)]
    with pytest.warns(UserWarning, match="had not converged"):
        res = eva_init(model, batches, tau=1.0, max_steps=3)
    assert not res.converged and res.steps == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 0.5}, "rho"), ({"tau": 0.0}, "tau"), ({"tau": 1.5}, "tau"), ({"max_steps": 0}, "max_steps")])
def test_bad_arguments(kwargs, match):
    model = Net(nnx.Rngs(0))
    apply_lora(model, ".*", rank=2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=match):
        eva_init(model, [X], **kwargs)


def test_needs_adapters_and_batches():
    with pytest.raises(ValueError, match="apply_lora first"):
        eva_init(Net(nnx.Rngs(0)), [X])
    model = Net(nnx.Rngs(0))
    apply_lora(model, ".*", rank=2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="non-empty"):
        eva_init(model, [])
