"""SNELLA against float64 numpy re-implementations of its kernels, mask and sparsity allocation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.finetune import (
    SNELLA_TRAIN_ALSO,
    LoRALinear,
    SNELLALinear,
    apply_snella,
    freeze_base,
    snella_allocation,
    snella_kernel,
)
from jaxopt_lab.finetune.snella import sparsify


def _kernel_np(a, b, kernel, heads=2, alpha=1.0, gamma=1.0, beta=0.0):
    if kernel == "linear":
        return a @ b
    d = a.shape[1] // heads
    out = np.zeros((a.shape[0], b.shape[1]))
    for h in range(heads):
        ah, bh = a[:, h * d:(h + 1) * d], b[h * d:(h + 1) * d, :]
        dist = np.sqrt(((ah[:, None, :] - bh.T[None, :, :]) ** 2).sum(-1))  # torch.cdist, p=2
        out += 0.1 * (-1) ** h * dist
    if kernel == "mixk":
        z = out / gamma
        e = np.exp(z - z.max(-1, keepdims=True))
        out = out + alpha * e / e.sum(-1, keepdims=True) + beta
    return out


def _sparsify_np(k, ratio, weighted=True):
    mag = np.abs(k)
    keep = mag > np.quantile(mag, ratio) if ratio > 0 or weighted else np.ones_like(mag, bool)  # official: always
    return k * np.where(keep, mag if weighted else 1.0, 0.0)


@pytest.mark.parametrize("kernel", ["distance", "mixk"])
def test_kernels_and_the_mask_match_float64(kernel):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 4)), rng.normal(size=(4, 5))
    with jax.enable_x64(True):
        k = np.asarray(snella_kernel(jnp.asarray(a), jnp.asarray(b), kernel, alpha=0.7, gamma=1.3, beta=0.2))
        np.testing.assert_allclose(k, _kernel_np(a, b, kernel, alpha=0.7, gamma=1.3, beta=0.2), rtol=1e-6, atol=1e-8)
        for ratio in (0.0, 0.3, 0.8):
            for weighted in (True, False):
                s = np.asarray(sparsify(jnp.asarray(k), jnp.asarray(ratio), weighted))
                np.testing.assert_allclose(s, _sparsify_np(k, ratio, weighted), rtol=1e-12)
        assert np.linalg.matrix_rank(k) > 4  # the nonlinear kernel lifts the rank above r


def test_linear_kernel_with_a_full_mask_is_lora():
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(1), (3, 6))
    snella = SNELLALinear(6, 5, rank=2, heads=1, kernel="linear", ratio=0.0, scale=8.0, magnitude_weighted=False,
                          rngs=rngs)
    lora = LoRALinear(6, 5, lora_rank=2, alpha=16.0, rngs=nnx.Rngs(0))
    lora.kernel[...], lora.bias[...] = snella.kernel[...], snella.bias[...]
    b = jax.random.normal(jax.random.key(2), (2, 5))
    snella.lora.lora_b[...] = b
    lora.lora.lora_a[...], lora.lora.lora_b[...] = snella.lora.lora_a[...], b
    np.testing.assert_allclose(np.asarray(snella.delta()), np.asarray(lora.delta()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(snella(x)), np.asarray(lora(x)), rtol=1e-5, atol=1e-6)
    fresh = SNELLALinear(6, 5, rank=2, kernel="linear", rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(np.asarray(fresh.delta()), 0.0)  # LoRA's start: B = 0


def _tree(rng, layers):
    return {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(n, m))),
                      "lora": {"lora_a": jnp.asarray(rng.normal(size=(n, 2))),
                               "lora_b": jnp.asarray(rng.normal(size=(2, m))),
                               "snella_ratio": jnp.asarray(0.01)}} for i, (n, m) in enumerate(layers)}


def _alloc_np(scores, volume, sizes):
    alloc = np.minimum(volume * scores, sizes)
    while volume - alloc.sum() > 1e-9 * volume:
        remain = sizes - alloc
        w = np.where(remain > 0, scores, 0.0)
        alloc = alloc + np.minimum((volume - alloc.sum()) * w / w.sum(), remain)
    return alloc


def test_allocation_matches_the_float64_rule():
    shapes = [(6, 5), (4, 4), (8, 3)]
    T, B1, B2, R0, RT, LR = 6, 0.85, 0.7, 0.01, 0.8, 0.1
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        params = _tree(rng, shapes)
        tx = snella_allocation(freeze_base(optax.sgd(LR)), total_steps=T, target_ratio=RT, init_ratio=R0,
                               init_warmup=1, final_warmup=1, mask_interval=2, beta1=B1, beta2=B2)
        state = tx.init(params)
        sizes = np.array([n * m for n, m in shapes], float)
        ema = {(i, f): 0.0 for i in range(3) for f in ("lora_a", "lora_b")}
        unc = dict(ema)
        ratios = np.full(3, R0)
        for t in range(1, T + 2):
            grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
            updates, state = tx.update(grads, state, params)
            raw = np.zeros(3)
            for i in range(3):
                for f in ("lora_a", "lora_b"):
                    sens = np.abs(np.asarray(params[f"l{i}"]["lora"][f]) * np.asarray(grads[f"l{i}"]["lora"][f]))
                    ema[i, f] = B1 * ema[i, f] + (1 - B1) * sens
                    unc[i, f] = B2 * unc[i, f] + (1 - B2) * np.abs(sens - ema[i, f])
                    raw[i] += np.mean(ema[i, f] * unc[i, f])
            scores = raw / raw.sum()
            v0, vt = ((1 - R0) * sizes).sum(), ((1 - RT) * sizes).sum()
            if t <= 1:
                volume = v0
            elif t > T - 1:
                volume = vt
            else:
                volume = vt + (v0 - vt) * (1 - (t - 1) / (T - 2)) ** 3
            due = t > 1 and t < T and (t > T - 1 or t % 2 == 0)
            if due:
                ratios = np.clip(1 - _alloc_np(scores, volume, sizes) / sizes, 0, 1)
            params = optax.apply_updates(params, updates)
            got = np.array([float(params[f"l{i}"]["lora"]["snella_ratio"]) for i in range(3)])
            np.testing.assert_allclose(got, ratios, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(np.asarray(state.scores), scores, rtol=1e-9)
            if due:
                np.testing.assert_allclose(((1 - got) * sizes).sum(), volume, rtol=1e-9)  # the budget is spent
            np.testing.assert_array_equal(np.asarray(updates["l0"]["kernel"]), 0.0)  # the base stays frozen
        assert not np.allclose(ratios, ratios[0])  # the layers competed


def test_a_model_trains_with_snella_and_its_allocation():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(6, 8, rngs=rngs)
            self.b = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    model = Net(nnx.Rngs(0))
    assert apply_snella(model, "a|b", rank=4, rngs=nnx.Rngs(1)) == ["a", "b"]
    x, y = jax.random.normal(jax.random.key(0), (16, 6)), jax.random.normal(jax.random.key(1), (16, 2))
    graph, params = nnx.split(model, nnx.Param)
    tx = snella_allocation(freeze_base(optax.adam(1e-2), train_also=SNELLA_TRAIN_ALSO), total_steps=20, target_ratio=0.5)
    state = tx.init(params)

    def loss(p):
        return jnp.mean((nnx.merge(graph, p)(x) - y) ** 2)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    k0 = np.asarray(params["a"]["kernel"][...])
    losses = []
    for _ in range(10):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(np.asarray(params["a"]["kernel"][...]), k0)
    assert float(params["a"]["lora"]["snella_alpha"][...]) != 1.0  # trained through train_also
    assert 0.01 < float(params["a"]["lora"]["snella_ratio"][...]) < 1.0


def test_clear_errors():
    for kwargs, match in [(dict(kernel="rbf"), "kernel"), (dict(rank=0), "rank"), (dict(rank=4, heads=3), "heads"),
                          (dict(ratio=1.5), "ratio")]:
        with pytest.raises(ValueError, match=match):
            SNELLALinear(4, 4, rngs=nnx.Rngs(0), **kwargs)
    with pytest.raises(ValueError, match="match none"):
        apply_snella(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), "nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="total_steps"):
        snella_allocation(optax.sgd(0.1), total_steps=4, init_warmup=2, final_warmup=2)
    with pytest.raises(ValueError, match="beta1"):
        snella_allocation(optax.sgd(0.1), total_steps=4, beta1=1.0)
