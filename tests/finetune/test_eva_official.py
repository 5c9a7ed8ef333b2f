"""EVA against a float64 replay of PEFT's loop (``peft/tuners/lora/eva.py``: ``SVDHook``,
``_get_eva_state_dict``, ``_load_eva_state_dict``), with scikit-learn's ``IncrementalPCA`` as the
incremental SVD: per minibatch, first each layer's hook is switched off once the components its
current rank needs have cosine similarity >= tau with the previous step's, and back on if the
rank grows past them; the loop ends when all are off; then the forward updates the active
layers' PCA; then the ranks are redistributed over the top ``r * L`` explained-variance ratios
of ``round(rho * r)`` components per layer. The loaded adapter has ``A = components[:r_l]`` and,
with ``adjust_scaling_factors`` (PEFT's default True), ``alpha * r_l / r``."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.finetune import apply_lora, eva_init
from jaxopt_lab.finetune.lora import LoRALinear

sklearn_decomposition = pytest.importorskip("sklearn.decomposition")

R, RHO, TAU, ALPHA = 2, 2.0, 0.99, 4.0


class Net(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 12, param_dtype=jnp.float64, rngs=rngs)
        self.b = nnx.Linear(12, 10, param_dtype=jnp.float64, rngs=rngs)
        self.c = nnx.Linear(10, 6, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.c(jnp.tanh(self.b(jnp.tanh(self.a(x)))))


def layer_inputs(model, x):
    k = {n: np.asarray(getattr(model, n).kernel[...], np.float64) for n in "abc"}
    b = {n: np.asarray(getattr(model, n).bias[...], np.float64) for n in "abc"}
    h1 = np.tanh(x @ k["a"] + b["a"])
    return {"a": x, "b": h1, "c": np.tanh(h1 @ k["b"] + b["b"])}


def peft_replay(inputs, names, n_comp, budget, tau, max_forwards=100):
    """PEFT's _get_eva_state_dict loop (no equal-input layers), written from its code."""
    pcas = {n: sklearn_decomposition.IncrementalPCA(n_components=n_comp) for n in names}
    converged = {n: np.zeros(n_comp, bool) for n in names}
    convergence_dict = {n: False for n in names}
    rank_dist = {n: n_comp for n in names}
    forwards = 0
    for batch in itertools.cycle(range(len(inputs))):
        for n in names:
            conv = bool(np.all(converged[n][: rank_dist[n]]))
            if not convergence_dict[n] and conv:
                convergence_dict[n] = True
            elif convergence_dict[n] and not conv:
                convergence_dict[n] = False
        if all(convergence_dict.values()) or forwards == max_forwards:
            break
        for n in names:
            if convergence_dict[n]:
                continue  # hook removed
            pca = pcas[n]
            prev = pca.components_.copy() if hasattr(pca, "components_") else None
            pca.partial_fit(inputs[batch][n])
            if prev is not None:
                c = pca.components_
                sim = np.sum(c * prev, 1) / (np.linalg.norm(c, axis=1) * np.linalg.norm(prev, axis=1))
                converged[n] = sim >= tau
        forwards += 1
        values = [(v, n) for n in names for v in pcas[n].explained_variance_ratio_[:n_comp]]
        order = sorted(range(len(values)), key=lambda i: -values[i][0])[:budget]
        rank_dist = {n: sum(1 for i in order if values[i][1] == n) for n in names}
    return rank_dist, {n: pcas[n].components_ for n in names}, forwards, all(convergence_dict.values())


@pytest.fixture(scope="module")
def runs():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        scales = np.array([3.0, 2.8, 2.6, 2.4, 0.3, 0.2, 0.1, 0.05])
        xs = [rng.normal(size=(40, 8)) * scales for _ in range(4)]
        out = {}
        for adjust in (True, False):
            model = Net(nnx.Rngs(0))
            inputs = [layer_inputs(model, x) for x in xs]
            apply_lora(model, ".*", rank=R, alpha=ALPHA, rngs=nnx.Rngs(1))
            res = eva_init(model, [jnp.asarray(x) for x in xs], rho=RHO, tau=TAU, adjust_scaling_factors=adjust)
            out[adjust] = (model, res, inputs)
        return out


def test_ranks_steps_and_a_match_the_peft_loop(runs):
    model, res, inputs = runs[True]
    ranks, comps, forwards, done = peft_replay(inputs, "abc", round(R * RHO), R * 3, TAU)
    assert done and res.converged
    assert res.ranks == ranks and res.steps == forwards
    assert len(set(ranks.values())) > 1  # the redistribution did move ranks
    for n in "abc":
        layer = getattr(model, n)
        if ranks[n] == 0:
            assert not isinstance(layer, LoRALinear)
            continue
        a = np.asarray(layer.lora.lora_a[...], np.float64)  # (in, r_l): PEFT's lora_A.weight transposed
        np.testing.assert_allclose(a.T, comps[n][: ranks[n]], rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(np.asarray(layer.lora.lora_b[...]), 0.0)


def test_adjust_scaling_factors_keeps_alpha_over_r(runs):
    for adjust, (model, res, _) in runs.items():
        for n in "abc":
            layer = getattr(model, n)
            if res.ranks[n] == 0:
                continue
            expected = ALPHA * res.ranks[n] / R if adjust else ALPHA  # PEFT: alpha *= new_rank / r
            assert layer.alpha == pytest.approx(expected)
            if adjust:
                assert layer.scale == pytest.approx(ALPHA / R)


def test_adjust_scaling_factors_must_be_a_bool():
    model = Net(nnx.Rngs(0))
    apply_lora(model, ".*", rank=R, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="adjust_scaling_factors must be True or False, got 1"):
        eva_init(model, [np.zeros((8, 8), np.float32)], adjust_scaling_factors=1)
