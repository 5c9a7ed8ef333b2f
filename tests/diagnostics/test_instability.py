"""Instability monitors (Wortsman et al. 2024) and GPT's qk-layernorm against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_lab.diagnostics import (
    instability_metrics,
    log_partition,
    lr_sensitivity,
    max_attention_logit,
    output_logit_divergence,
)
from jaxopt_lab.models import GPT

# one compiled program per call instead of one per eager op (compilation dominates on 2 cores)
forward = nnx.jit(lambda m, t: m.forward_with_attention_logits(t, attention_logits=True))
plain_forward = nnx.jit(lambda m, t: m(t))
monitors = nnx.jit(instability_metrics)


def _layernorm(x, scale, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale


@pytest.fixture(scope="module")
def models():
    kw = dict(vocab_size=11, layers=2, width=8, heads=2, context=6)
    make = nnx.jit(lambda qk: GPT(**kw, qk_layernorm=qk, rngs=nnx.Rngs(0)), static_argnums=0)
    return make(False), make(True)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(3), (3, 5), 0, 11)


def _reference_logits(model, tokens):
    """float64 numpy: the first block's attention logits from its weights (LN on q, k when asked)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.state(model, nnx.Param))
    t = np.asarray(tokens)
    x = p["token_embed"]["embedding"][...][t] + p["pos_embed"]["embedding"][...][np.arange(t.shape[1])]
    b = p["blocks"][0]
    h = _layernorm(x, b["ln_attn"]["scale"][...], 1e-6) + b["ln_attn"]["bias"][...]
    qkv = (h @ b["qkv"]["kernel"][...] + b["qkv"]["bias"][...]).reshape(*t.shape, 3, 2, 4)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    if model.blocks[0].qk_layernorm:
        q = _layernorm(q, b["q_norm"]["scale"][...], 1e-6)
        k = _layernorm(k, b["k_norm"]["scale"][...], 1e-6)
    return np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0


@pytest.mark.parametrize("which", [0, 1])
def test_attention_logits_match_reference(models, tokens, which):
    model = models[which]
    logits, scores = forward(model, tokens)
    assert len(scores) == 2 and scores[0].shape == (3, 2, 5, 5)
    np.testing.assert_allclose(scores[0], _reference_logits(model, tokens), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, plain_forward(model, tokens), rtol=0, atol=0)  # the monitor does not change the output
    want = [np.abs(np.where(np.tril(np.ones((5, 5))), np.asarray(s, np.float64), 0)).max() for s in scores]
    np.testing.assert_allclose(max_attention_logit(scores), want, rtol=1e-6)


def test_qk_layernorm_params_and_bound(models, tokens):
    plain, qk = models
    assert "q_norm" in nnx.state(qk, nnx.Param)["blocks"][0] and "q_norm" not in nnx.state(plain, nnx.Param)["blocks"][0]
    # with unit LN scales |q.k| <= |q||k| = head_dim, so the logits are bounded by sqrt(head_dim) = 2
    m = monitors(qk, tokens)
    assert float(m["attn_logit_max"]) <= 2.0 + 1e-5


def test_log_z_and_sensitivity():
    logits = np.random.default_rng(0).normal(size=(2, 3, 7)) * 4
    lz = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(log_partition(jnp.asarray(logits, jnp.float32)), lz, rtol=1e-5)
    out = output_logit_divergence(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(out["log_z_mean"], lz.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["log_z_abs_max"], np.abs(lz).max(), rtol=1e-5)
    # Eq. 1: mean over the sweep of min(loss, l0), minus the best loss; NaN counts as l0
    assert lr_sensitivity([1.0, float("nan"), 3.0, 1.5], 2.0) == pytest.approx((1 + 2 + 2 + 1.5) / 4 - 1)
    assert lr_sensitivity([0.5, 0.5], 2.0) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        lr_sensitivity([], 1.0)
    with pytest.raises(ValueError, match="need a GPT"):
        instability_metrics(object(), jnp.zeros((1, 2), jnp.int32))
