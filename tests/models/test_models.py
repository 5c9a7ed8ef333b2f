"""Tests of jaxopt_lab.models: shapes, masks, trainability, errors, sizes.

On a 2-core CPU, compiling dominates (even each parameter initialiser of a new
shape compiles), so: tiny shapes, one model of each kind built once per module
and shared through fixtures, forward passes jitted once, and pure shape or size
checks done abstractly with ``jax.eval_shape`` / ``nnx.eval_shape``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_lab.models import (
    KAT,
    CNN,
    GPT,
    GPT_PRESETS,
    MLP,
    MODELS,
    ModularTransformer,
    TransformerBlock,
)

VOCAB = 32  # a small vocabulary keeps the micro GPT cheap


def n_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def fit(model, inputs, labels, steps: int, lr: float) -> list[float]:
    """Adam on one fixed batch through nnx.split/merge + jax.jit; the losses."""
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @jax.jit
    def step(state):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(m):
            logits = m(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    losses = []
    for _ in range(steps):
        state, loss = step(state)
        losses.append(float(loss))
    return losses


def abstract(build):
    """The model ``build()`` returns, with shapes only (nothing is compiled)."""
    return nnx.eval_shape(build)


def jitted(model):
    """``model``'s forward pass as a jitted function of its input."""
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    return lambda x: fn(params, x)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gpt():
    return GPT.from_preset("micro", vocab_size=VOCAB, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gpt_forward(gpt):
    return jitted(gpt)


@pytest.fixture(scope="module")
def tokens():
    ctx = GPT_PRESETS["micro"]["context"]
    return jax.random.randint(jax.random.key(1), (2, ctx), 0, VOCAB, dtype=jnp.int32)


@pytest.fixture(scope="module")
def mlp():
    return MLP(64, hidden=(32,), out_features=4, activation="gelu", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def cnn():
    return CNN(num_classes=4, in_channels=1, channels=(8, 16), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def modular():
    # width/heads of the micro GPT: its initialisers are compiled already
    return ModularTransformer(p=7, layers=1, width=32, heads=2, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------- shapes


def test_mlp_accepts_images_and_vectors(mlp):
    forward = jitted(mlp)
    images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    vectors = images.reshape(3, 64)
    out = forward(images)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(forward(vectors), out, rtol=1e-6, atol=1e-6)


def test_cnn_shapes(cnn):
    assert jitted(cnn)(jnp.ones((3, 8, 8, 1))).shape == (3, 4)
    # more pools than log2(8): the SAME pooling keeps a 1x1 map alive
    deep = jax.eval_shape(
        lambda x: CNN(num_classes=3, in_channels=2, channels=(2, 2, 2, 2), rngs=nnx.Rngs(0))(x),
        jax.ShapeDtypeStruct((2, 8, 8, 2), jnp.float32),
    )
    assert deep.shape == (2, 3)


def test_gpt_shapes(gpt_forward, tokens):
    assert gpt_forward(tokens).shape == (2, 16, VOCAB)
    # sequences shorter than the context are fine
    assert gpt_forward(tokens[:, :5]).shape == (2, 5, VOCAB)


def test_modular_transformer_shape(modular):
    pairs = jnp.array([[1, 2], [3, 4], [6, 0]], dtype=jnp.int32)
    assert jitted(modular)(pairs).shape == (3, 7)


def test_transformer_block_shape():
    out = jax.eval_shape(
        lambda x: TransformerBlock(16, 4, causal=True, rngs=nnx.Rngs(0))(x),
        jax.ShapeDtypeStruct((2, 5, 16), jnp.float32),
    )
    assert out.shape == (2, 5, 16)


# ------------------------------------------------------------ attention masks


def test_gpt_is_causal(gpt_forward, tokens):
    t = 7
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    before, after = gpt_forward(tokens), gpt_forward(changed)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=1e-6, atol=1e-6)
    # position t (and later ones) sees the changed token
    assert float(jnp.max(jnp.abs(after[:, t] - before[:, t]))) > 1e-4
    assert float(jnp.max(jnp.abs(after[:, -1] - before[:, -1]))) > 1e-4


def test_non_causal_block_sees_the_future():
    x = jax.random.normal(jax.random.key(0), (1, 4, 32))
    # change the last position's features (not by a constant: LayerNorm removes that)
    x2 = x.at[:, -1].set(jax.random.normal(jax.random.key(1), (1, 32)))
    both = jnp.concatenate([x, x2])
    out = jitted(TransformerBlock(32, 2, causal=False, rngs=nnx.Rngs(0)))(both)
    assert float(jnp.max(jnp.abs(out[1, 0] - out[0, 0]))) > 1e-5
    out = jitted(TransformerBlock(32, 2, causal=True, rngs=nnx.Rngs(0)))(both)
    np.testing.assert_allclose(out[1, :-1], out[0, :-1], rtol=1e-6, atol=1e-6)


def test_modular_transformer_uses_both_operands_in_order(modular):
    assert all(not block.causal for block in modular.blocks)
    # base, change a (position 0), change b, swap a and b
    pairs = jnp.array([[2, 5], [3, 5], [2, 6], [5, 2]], dtype=jnp.int32)
    out = jitted(modular)(pairs)
    for i in (1, 2, 3):
        assert float(jnp.max(jnp.abs(out[i] - out[0]))) > 1e-5, pairs[i]


# -------------------------------------------------------------- trainability


def test_gpt_micro_overfits_one_batch(gpt):
    seq = jax.random.randint(jax.random.key(2), (4, 17), 0, VOCAB, dtype=jnp.int32)
    losses = fit(gpt, seq[:, :-1], seq[:, 1:], steps=30, lr=1e-2)
    assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.1)  # near-uniform at init
    assert losses[-1] < 0.5 * losses[0], losses


def test_mlp_overfits_one_batch(mlp):
    x = jax.random.normal(jax.random.key(3), (32, 8, 8, 1))
    y = jax.random.randint(jax.random.key(4), (32,), 0, 4)
    losses = fit(mlp, x, y, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_cnn_overfits_one_batch(cnn):
    x = jax.random.normal(jax.random.key(5), (16, 8, 8, 1))
    y = jax.random.randint(jax.random.key(6), (16,), 0, 4)
    losses = fit(cnn, x, y, steps=30, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------- linearity


def test_mlp_without_hidden_layers_is_affine():
    model = MLP(6, hidden=(), out_features=3, rngs=nnx.Rngs(0))
    assert len(model.layers) == 1
    assert n_params(model) == 6 * 3 + 3
    kernel, bias = model.layers[0].kernel[...], model.layers[0].bias[...]
    x = jax.random.normal(jax.random.key(7), (4, 6))
    a = 2.5
    mixed = a * x[:2] + (1 - a) * x[2:]
    out = jitted(model)(jnp.concatenate([x, mixed]))
    np.testing.assert_allclose(out[:4], x @ kernel + bias, rtol=1e-5, atol=1e-5)
    # f(a x1 + (1 - a) x2) = a f(x1) + (1 - a) f(x2)
    np.testing.assert_allclose(out[4:], a * out[:2] + (1 - a) * out[2:4], rtol=1e-4, atol=1e-4)


def test_mlp_with_hidden_layer_is_not_affine(mlp):
    x1, x2 = jax.random.normal(jax.random.key(8), (2, 1, 64))
    out = jitted(mlp)(jnp.concatenate([x1, x2, 0.5 * x1 + 0.5 * x2]))
    gap = out[2] - 0.5 * (out[0] + out[1])
    assert float(jnp.max(jnp.abs(gap))) > 1e-3


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build",
    [
        lambda: GPT(width=30, heads=4, rngs=nnx.Rngs(0)),
        lambda: TransformerBlock(30, 4, causal=True, rngs=nnx.Rngs(0)),
        lambda: ModularTransformer(p=7, width=30, heads=4, rngs=nnx.Rngs(0)),
    ],
    ids=["gpt", "block", "modular"],
)
def test_width_not_divisible_by_heads(build):
    with pytest.raises(ValueError, match=r"width=30 .*heads=4"):
        build()


def test_sequence_longer_than_context(gpt):
    with pytest.raises(ValueError, match=r"T=17.*context=16"):
        gpt(jnp.zeros((1, 17), dtype=jnp.int32))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"'huge'.*micro.*nano.*small"):
        GPT.from_preset("huge", rngs=nnx.Rngs(0))


def test_bad_activation():
    with pytest.raises(ValueError, match=r"'swish'"):
        MLP(4, activation="swish", rngs=nnx.Rngs(0))


def test_bad_dropout():
    with pytest.raises(ValueError, match=r"dropout.*1\.5"):
        GPT.from_preset("micro", dropout=1.5, rngs=nnx.Rngs(0))


def test_wrong_input_shapes(modular, mlp, cnn):
    with pytest.raises(ValueError, match=r"\(B, 2\).*\(4, 3\)"):
        modular(jnp.zeros((4, 3), dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"63 features.*in_features=64"):
        mlp(jnp.zeros((2, 63)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\).*\(2, 8, 8, 3\)"):
        cnn(jnp.zeros((2, 8, 8, 3)))


# ---------------------------------------------------------- sizes and presets


def test_micro_gpt_param_count():
    v, c = 256, 16  # default vocabulary, micro context
    w, layers = 32, 1
    embeddings = v * w + c * w
    block = (
        2 * (2 * w)  # two LayerNorms: scale + bias
        + (w * 3 * w + 3 * w)  # fused q, k, v
        + (w * w + w)  # attention output projection
        + (w * 4 * w + 4 * w)  # MLP in
        + (4 * w * w + w)  # MLP out
    )
    final = 2 * w + w * v  # final LayerNorm + bias-free untied head
    expected = embeddings + layers * block + final
    assert expected == 29_664
    assert n_params(abstract(lambda: GPT.from_preset("micro", rngs=nnx.Rngs(0)))) == expected
    # two layers add exactly one more block
    two = abstract(lambda: GPT.from_preset("micro", layers=2, rngs=nnx.Rngs(0)))
    assert n_params(two) == expected + block


def test_presets_and_overrides():
    assert {"micro", "nano", "small"} <= set(GPT_PRESETS)
    for name in GPT_PRESETS:
        model = abstract(lambda: GPT.from_preset(name, rngs=nnx.Rngs(0)))
        assert (model.width, model.heads, model.context) == tuple(
            GPT_PRESETS[name][k] for k in ("width", "heads", "context")
        )
    model = abstract(lambda: GPT.from_preset("micro", vocab_size=11, layers=2, rngs=nnx.Rngs(0)))
    assert (model.vocab_size, len(model.blocks), model.width) == (11, 2, 32)
    assert GPT_PRESETS["micro"]["layers"] == 1  # overrides do not leak into the preset


def test_registry():
    assert MODELS == {"mlp": MLP, "cnn": CNN, "gpt": GPT, "modular_transformer": ModularTransformer, "kat": KAT}


# ----------------------------------------------------------- nnx plumbing


@pytest.mark.parametrize(
    "build",
    [
        lambda: MLP(4, rngs=nnx.Rngs(0)),
        lambda: CNN(rngs=nnx.Rngs(0)),
        lambda: GPT(rngs=nnx.Rngs(0)),
        lambda: ModularTransformer(p=5, rngs=nnx.Rngs(0)),
    ],
    ids=["mlp", "cnn", "gpt", "modular"],
)
def test_state_is_float32_params_only(build):
    model = abstract(build)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(x.dtype == jnp.float32 for x in leaves)


def test_split_merge_round_trip(gpt, gpt_forward, tokens):
    graphdef, params, rest = nnx.split(gpt, nnx.Param, ...)
    rebuilt = jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t))(params, rest, tokens)
    np.testing.assert_allclose(rebuilt, gpt_forward(tokens), rtol=1e-6, atol=1e-6)


def test_dropout_only_when_not_deterministic(tokens):
    model = GPT.from_preset("micro", vocab_size=VOCAB, dropout=0.5, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: (m(t), m(t, deterministic=False)))
    evaluation, train = forward(model, tokens)  # deterministic by default
    assert float(jnp.max(jnp.abs(train - evaluation))) > 1e-3


def test_small_preset_is_gpt2_small():
    # GPT-2 small (nanoGPT's "gpt2"): 12 x 768, 12 heads, context 1024, tied embeddings: 124,439,808
    # parameters at GPT-2's vocabulary of 50257, counted from shapes only
    model = abstract(lambda: GPT.from_preset("small", vocab_size=50257, rngs=nnx.Rngs(0)))
    assert n_params(model) == 124_439_808
    assert model.head is None and model.tie_embeddings
    # untied, as the other presets: one more vocab x width matrix
    untied = abstract(lambda: GPT.from_preset("small", vocab_size=50257, tie_embeddings=False, rngs=nnx.Rngs(0)))
    assert n_params(untied) == 124_439_808 + 50257 * 768


def test_tied_embeddings_compute_logits_with_the_token_embedding():
    model = GPT.from_preset("micro", vocab_size=11, tie_embeddings=True, rngs=nnx.Rngs(0))
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(2, 4) % 11
    logits = model(tokens)
    assert logits.shape == (2, 4, 11)
    hidden = model.token_embed(tokens) + model.pos_embed(jnp.arange(4))
    for block in model.blocks:
        hidden = block(hidden)
    np.testing.assert_allclose(logits, model.ln_final(hidden) @ model.token_embed.embedding[...].T, rtol=1e-5, atol=1e-6)
