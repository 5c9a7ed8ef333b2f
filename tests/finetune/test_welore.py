"""WeLore: ranks from the normalized spectra against float64 numpy, full rank equals the model,
the factors are the truncated SVD, compression targets are met, only the LRCs train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.finetune import WeLoreLinear, apply_welore, freeze_all_but_low_rank
from jaxopt_lab.finetune.lora import flatten_with_paths
from jaxopt_lab.finetune.welore import compression, spectra, threshold_for, welore_ranks
from jaxopt_lab.lowrank.memory import optimizer_state_bytes


class Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(16, 24, rngs=rngs)
        self.b = nnx.Linear(24, 16, rngs=rngs)
        self.c = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.c(jnp.tanh(self.b(jnp.tanh(self.a(x)))))


X = jnp.asarray(np.random.default_rng(0).normal(size=(5, 16)), jnp.float32)


def decayed(seed=0):
    """``a`` with a fast-decaying spectrum (low rank), ``b`` flat: different ranks expected."""
    model = Net(nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    v, _ = np.linalg.qr(rng.normal(size=(24, 16)))
    model.a.kernel[...] = jnp.asarray((u * (0.5 ** np.arange(16))) @ v.T, jnp.float32)
    return model


def ref_ranks(model, theta):
    """VITA-Group/WeLore: min-max normalized spectrum, prune < θ, LRC when RRR > 0.4999."""
    out = {}
    for n in "abc":
        w = np.asarray(getattr(model, n).kernel[...], np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        k = len(s) - int(np.sum((s - s.min()) / (s.max() - s.min()) < theta))
        out[n] = k if (len(s) - k) / len(s) > 0.4999 else None
    return out


def test_ranks_are_non_uniform_and_match_float64():
    model = decayed()
    spec = spectra(model)
    for theta in (0.05, 0.2, 0.6):
        assert welore_ranks(spec, theta) == ref_ranks(model, theta)
    r = welore_ranks(spec, 0.2)
    assert r["a"] is not None and r["a"] <= 3  # 0.5^i >= 0.2: i <= 2
    assert r["b"] is None  # flat random spectrum: no saving at this θ


def test_tiny_threshold_drops_only_the_smallest_component():
    model = decayed()
    best = {}  # each kernel's best rank-(n - 1) approximation: the smallest singular value normalizes to 0 < θ
    for n in "abc":
        layer = getattr(model, n)
        u, s, vt = np.linalg.svd(np.asarray(layer.kernel[...], np.float64), full_matrices=False)
        best[n] = (u[:, :-1] * s[:-1]) @ vt[:-1]
    rep = apply_welore(model, threshold=1e-9, min_reduction=0.0)
    assert rep.dense == [] and rep.ranks == {"a": 15, "b": 15, "c": 3}
    assert all(isinstance(getattr(model, n), WeLoreLinear) for n in "abc")
    for n in "abc":
        layer = getattr(model, n)
        ab = np.asarray(layer.welore_a[...], np.float64) @ np.asarray(layer.welore_b[...], np.float64)
        np.testing.assert_allclose(ab, best[n], atol=1e-5)


def test_factors_are_the_truncated_svd():
    model = decayed()
    w = np.asarray(model.a.kernel[...], np.float64)
    rep = apply_welore(model, "a", threshold=0.1)
    k = rep.ranks["a"]
    u, s, vt = np.linalg.svd(w)
    ab = np.asarray(model.a.welore_a[...], np.float64) @ np.asarray(model.a.welore_b[...], np.float64)
    np.testing.assert_allclose(ab, (u[:, :k] * s[:k]) @ vt[:k], atol=1e-5)
    assert rep.compression == pytest.approx(1 - k * 40 / (16 * 24))


def test_compression_target_is_met_with_the_smallest_threshold():
    model = decayed()
    spec = spectra(model)
    for target in (0.1, 0.3, 0.5):
        theta = threshold_for(spec, target)
        assert compression(spec, welore_ranks(spec, theta)) >= target
        smaller = [x for s, _ in spec.values() for x in (s - s.min()) / (s.max() - s.min()) if x < theta]
        if smaller:  # the next smaller candidate misses the target
            assert compression(spec, welore_ranks(spec, max(smaller))) < target
    rep = apply_welore(model, compression_target=0.3)
    assert rep.compression >= 0.3 and rep.params_after < rep.params_before


def test_only_the_low_rank_factors_train():
    model = decayed()
    apply_welore(model, threshold=0.2)
    assert isinstance(model.a, WeLoreLinear) and type(model.b) is nnx.Linear
    params = nnx.state(model, nnx.Param)
    tx = freeze_all_but_low_rank(optax.sgd(0.1))
    state = tx.init(params)
    assert optimizer_state_bytes(state) == 0  # plain SGD: no state at all

    def loss(p):
        return jnp.sum(nnx.merge(nnx.graphdef(model), p)(X) ** 2)

    updates, _ = tx.update(jax.grad(loss)(params), state, params)
    paths, leaves, _ = flatten_with_paths(updates)
    for p, v in zip(paths, leaves):
        assert bool(np.any(np.asarray(v) != 0)) == p.split("/")[-1].startswith("welore_"), p


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"), ({"threshold": 0.1, "compression_target": 0.2}, "exactly one"),
    ({"threshold": 1.5}, "threshold"), ({"compression_target": -0.1}, "compression"),
    ({"threshold": 0.1, "min_reduction": 2}, "min_reduction"), ({"threshold": 0.1, "targets": "zz"}, "match none"),
    ({"compression_target": 0.99}, "out of reach")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_welore(decayed(), **kwargs)
