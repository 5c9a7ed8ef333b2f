"""LoRA on conv layers: the forward against a float64 numpy im2col reference, B = 0 and alpha = 0
identities, merging, and what apply_lora does with the CNN."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.finetune import LoRAConv, apply_lora, merge_lora, unmerge_lora
from jaxopt_lab.models import CNN

X = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype(np.float32)


def conv_same_f64(x, kernel):
    """SAME-padded stride-1 conv, channels last, by explicit patches (kh, kw, c_in order), float64."""
    kh, kw, c_in, c_out = kernel.shape
    x = np.pad(np.asarray(x, np.float64), ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    n, h, w = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = np.stack([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=3)
    return patches.reshape(n, h, w, kh * kw * c_in) @ np.asarray(kernel, np.float64).reshape(-1, c_out)


def adapted(alpha=6.0, rank=2, seed=1):
    conv = nnx.Conv(3, 4, kernel_size=(3, 3), padding="SAME", rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(5), conv.bias.shape)
    layer = LoRAConv.from_conv(conv, rank=rank, alpha=alpha, rngs=nnx.Rngs(seed))
    return conv, layer


def randomize_b(layer, seed=2):
    layer.lora.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed), layer.lora.lora_b.shape)


def test_starts_equal_to_the_conv_and_alpha_zero_stays_equal():
    conv, layer = adapted()
    np.testing.assert_allclose(np.asarray(layer(X)), np.asarray(conv(X)), rtol=1e-6, atol=1e-6)  # B = 0
    conv, off = adapted(alpha=0.0)
    randomize_b(off)
    np.testing.assert_allclose(np.asarray(off(X)), np.asarray(conv(X)), rtol=1e-6, atol=1e-6)


def test_forward_is_the_formula_in_float64():
    conv, layer = adapted(alpha=6.0, rank=2)
    randomize_b(layer)
    w = np.asarray(layer.kernel[...], np.float64)
    a, b = (np.asarray(v[...], np.float64) for v in (layer.lora.lora_a, layer.lora.lora_b))
    assert a.shape == (3 * 3 * 3, 2) and b.shape == (2, 4)
    want = conv_same_f64(X, w) + np.asarray(layer.bias[...], np.float64) + (6.0 / 2) * conv_same_f64(
        X, (a @ b).reshape(w.shape))
    np.testing.assert_allclose(np.asarray(layer(X), np.float64), want, rtol=1e-4, atol=1e-4)
    # the base conv agrees with the reference too (the same patch order as nnx.Conv's kernel)
    np.testing.assert_allclose(np.asarray(conv(X), np.float64),
                               conv_same_f64(X, w) + np.asarray(conv.bias[...], np.float64), rtol=1e-4, atol=1e-4)


def test_merge_and_unmerge():
    _, layer = adapted()
    randomize_b(layer)
    kernel, before = np.asarray(layer.kernel[...]), np.asarray(layer(X))
    merge_lora(layer)
    assert layer.merged
    np.testing.assert_allclose(np.asarray(layer(X)), before, rtol=1e-5, atol=1e-5)
    unmerge_lora(layer)
    np.testing.assert_allclose(np.asarray(layer.kernel[...]), kernel, atol=1e-6)


def test_apply_lora_on_the_cnn():
    model = CNN(num_classes=10, channels=(4, 8), rngs=nnx.Rngs(0))
    x = X[..., :1]
    before = np.asarray(model(x))
    paths = apply_lora(model, "convs/.*", rank=2, rngs=nnx.Rngs(1))
    assert paths == ["convs/0", "convs/1"] and isinstance(model.convs[1], LoRAConv)
    np.testing.assert_array_equal(np.asarray(model(x)), before)
    assert apply_lora(CNN(rngs=nnx.Rngs(0)), "", rngs=nnx.Rngs(1)) == []  # a linear probe: no adapter
    with pytest.raises(ValueError, match="match none .* convs/0, convs/1, head"):
        apply_lora(CNN(rngs=nnx.Rngs(0)), "blocks/.*", rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="larger than the layer's smaller side min\\(9, 16\\)"):
        apply_lora(CNN(rngs=nnx.Rngs(0)), "convs/0", rank=10, rngs=nnx.Rngs(1))


def test_refuses_grouped_convs():
    conv = nnx.Conv(4, 4, kernel_size=(3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature_group_count = 1, got 2"):
        LoRAConv.from_conv(conv, rank=2, rngs=nnx.Rngs(1))
