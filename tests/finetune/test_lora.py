"""LoRA adapters: identities (alpha = 0, merged = unmerged), targets, frozen base without state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.finetune import (
    LoRALinear,
    apply_lora,
    freeze_base,
    linear_paths,
    lora_pairs,
    merge_lora,
    trainable_report,
    unmerge_lora,
)
from jaxopt_lab.finetune.lora import flatten_with_paths, lora_layers
from jaxopt_lab.lowrank.memory import optimizer_state_bytes


class Tiny(nnx.Module):
    """Blocks of Linear layers named as the GPT's, and a head: small enough to run eagerly."""

    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 6, use_bias=False, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Linear(8, 12, rngs=rngs)
        self.attn_out = nnx.Linear(12, 8, rngs=rngs)
        self.mlp_in = nnx.Linear(8, 16, rngs=rngs)
        self.mlp_out = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn_out(jnp.tanh(self.qkv(x)))
        return x + self.mlp_out(jnp.tanh(self.mlp_in(x)))


TOKENS = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)


def micro(seed=0):
    return Tiny(nnx.Rngs(seed))


def randomize_b(model, seed=1):
    """Non-zero B (LoRA starts with B = 0, which would make every identity trivial)."""
    key = jax.random.key(seed)
    for i, (_, layer) in enumerate(lora_layers(model)):
        b = layer.lora.lora_b
        b[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, i), b.shape)


def test_alpha_zero_leaves_the_model_unchanged():
    model = micro()
    before = model(TOKENS)
    adapted = apply_lora(model, ".*", rank=4, alpha=0.0, rngs=nnx.Rngs(1))
    randomize_b(model)
    assert adapted == linear_paths(model)  # every Linear, head included
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(before))


def test_new_adapters_start_at_the_pretrained_model_and_nonzero_b_changes_it():
    model = micro()
    before = model(TOKENS)
    apply_lora(model, "blocks/.*/qkv", rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(before))  # B = 0
    randomize_b(model)
    assert not np.allclose(np.asarray(model(TOKENS)), np.asarray(before))


def test_merged_equals_unmerged_and_unmerge_restores_the_kernel():
    model = micro()
    apply_lora(model, "blocks/.*/(qkv|mlp_in|mlp_out|attn_out)", rank=4, alpha=16.0, rngs=nnx.Rngs(1))
    randomize_b(model)
    layer = lora_layers(model)[0][1]
    kernel = np.asarray(layer.kernel[...])
    unmerged = np.asarray(model(TOKENS))
    merge_lora(model)
    assert layer.merged
    np.testing.assert_allclose(np.asarray(model(TOKENS)), unmerged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.kernel[...]),
                               kernel + 4.0 * np.asarray(layer.lora.lora_a[...]) @ np.asarray(layer.lora.lora_b[...]),
                               rtol=1e-6, atol=1e-6)
    unmerge_lora(model)
    np.testing.assert_allclose(np.asarray(layer.kernel[...]), kernel, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), unmerged, rtol=1e-5, atol=1e-5)


def test_forward_is_the_formula_in_float64():
    layer = LoRALinear(5, 3, lora_rank=2, alpha=3.0, rngs=nnx.Rngs(0))
    layer.lora.lora_b[...] = jnp.arange(6.0).reshape(2, 3) / 10
    x = np.random.default_rng(0).normal(size=(4, 5))
    w, b = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
    a, bb = np.asarray(layer.lora.lora_a[...], np.float64), np.asarray(layer.lora.lora_b[...], np.float64)
    expected = x @ w + b + 1.5 * x @ a @ bb
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), expected, rtol=1e-5, atol=1e-5)


def test_dropout_acts_in_training_mode_only():
    layer = LoRALinear(8, 8, lora_rank=2, dropout=0.5, rngs=nnx.Rngs(0))
    layer.lora.lora_b[...] = jnp.ones((2, 8))
    x = jnp.ones((4, 8))
    clean = layer(x)
    layer.train()
    dropped = layer(x)
    assert not np.allclose(np.asarray(dropped), np.asarray(clean))
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(clean))


def test_bad_targets_rank_alpha_dropout_are_refused_by_name():
    with pytest.raises(ValueError, match="match none.*blocks/0/qkv"):
        apply_lora(micro(), "nothing", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank 7 is larger"):
        apply_lora(micro(), "head", rank=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(micro(), "head", rank=2, alpha=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(micro(), "head", rank=2, dropout=1.0, rngs=nnx.Rngs(0))


def test_frozen_base_has_no_optimizer_state_and_no_update():
    model = micro()
    apply_lora(model, "blocks/.*/(qkv|mlp_in)", rank=4, rngs=nnx.Rngs(1))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    report = trainable_report(params)
    # two blocks, qkv 8 -> 12 and mlp_in 8 -> 16 at rank 4
    assert report["trainable_params"] == 2 * (4 * (8 + 12) + 4 * (8 + 16))
    assert report["trainable_bytes"] == 4 * report["trainable_params"]
    assert report["params"] == sum(x.size for x in jax.tree.leaves(params))
    tx = freeze_base(optax.adam(1e-2))
    state = tx.init(params)
    # Adam's two moments of the adapters and one step count: nothing for the frozen parameters
    assert optimizer_state_bytes(state) == 2 * report["trainable_bytes"] + 4
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    paths, leaves, _ = flatten_with_paths(updates)
    for path, u in zip(paths, leaves):
        assert bool(jnp.any(u != 0)) == ("/lora/" in path), path


def test_train_also_trains_the_matching_parameters():
    model = micro()
    apply_lora(model, "blocks/.*/qkv", rank=2, rngs=nnx.Rngs(1))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    base = trainable_report(params)["trainable_params"]
    assert trainable_report(params, "head/.*")["trainable_params"] == base + 8 * 6


def test_lora_pairs_by_path():
    model = micro()
    apply_lora(model, "blocks/0/(qkv|mlp_out)", rank=2, rngs=nnx.Rngs(1))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    paths, leaves, _ = flatten_with_paths(params)
    pairs = lora_pairs(paths)
    assert sorted(p.prefix for p in pairs) == ["blocks/0/mlp_out", "blocks/0/qkv"]
    for p in pairs:
        assert leaves[p.a].shape[1] == leaves[p.b].shape[0] == 2
        assert paths[p.kernel] == p.prefix + "/kernel"
    with pytest.raises(ValueError, match="has only A"):
        lora_pairs([p for p in paths if not p.endswith("lora_b")])
