"""A decoder-only transformer language model (GPT-2 style, pre-LayerNorm)."""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# GPT-2 style initialisation: small normal weights, zero biases.
_INIT = nnx.initializers.normal(stddev=0.02)


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    The attention is multi-head self-attention over a fused query/key/value
    projection; with ``causal=True`` position ``t`` attends only to positions
    ``<= t``. The MLP is ``Linear(width, 4 * width) -> gelu -> Linear(4 * width,
    width)``. Dropout (when ``dropout > 0`` and ``deterministic=False``) is
    applied to the output of each residual branch.

    Args:
        width: model (residual stream) width; must be divisible by ``heads``.
        heads: number of attention heads.
        causal: whether to apply a causal (lower triangular) attention mask.
        dropout: dropout rate on the residual branches, in ``[0, 1)``.
        qk_layernorm: apply a LayerNorm (over the head dimension, scale only,
            shared by the heads, as flax's ``normalize_qk``) to the queries and
            the keys before their dot product: Dehghani et al., "Scaling Vision
            Transformers to 22 Billion Parameters" (2023), the mitigation of
            attention-logit growth studied by Wortsman et al., "Small-scale
            proxies for large-scale Transformer training instabilities" (ICLR
            2024), https://arxiv.org/abs/2309.14322. Off by default.
        rngs: random streams for the parameter initialisation (and the
            ``dropout`` stream, or ``default``, when ``dropout > 0``).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        causal: bool,
        dropout: float = 0.0,
        qk_layernorm: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        _check_positive(width=width, heads=heads)
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        _check_dropout(dropout)
        self.width = width
        self.heads = heads
        self.head_dim = width // heads
        self.causal = bool(causal)
        self.dropout_rate = float(dropout)

        self.ln_attn = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, kernel_init=_INIT, rngs=rngs)
        self.attn_out = nnx.Linear(width, width, kernel_init=_INIT, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, kernel_init=_INIT, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, kernel_init=_INIT, rngs=rngs)
        # Without dropout the block holds no random state: only nnx.Param.
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.qk_layernorm = bool(qk_layernorm)
        if self.qk_layernorm:
            self.q_norm = nnx.LayerNorm(self.head_dim, use_bias=False, rngs=rngs)
            self.k_norm = nnx.LayerNorm(self.head_dim, use_bias=False, rngs=rngs)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def attention_logits(self, x: jax.Array) -> jax.Array:
        """The pre-softmax, unmasked attention logits ``q.k / sqrt(head_dim)``, ``(B, heads, T, T)``,
        of the block's (already normalized) attention input ``x``."""
        q, k, _ = self._qkv(x)
        return jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)

    def attention(self, x: jax.Array) -> jax.Array:
        """Multi-head self-attention of ``(B, T, width)`` to ``(B, T, width)``."""
        batch, length, _ = x.shape
        q, k, v = self._qkv(x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        if self.causal:
            mask = jnp.tril(jnp.ones((length, length), dtype=bool))
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.attn_out(out.reshape(batch, length, self.width))

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Applies the block to ``(B, T, width)`` activations."""
        x = x + self.dropout(self.attention(self.ln_attn(x)), deterministic=deterministic)
        h = self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln_mlp(x))))
        return x + self.dropout(h, deterministic=deterministic)


# Architecture presets (vocab_size comes from the data; pass it as an override).
# "nano" (~0.47M parameters at vocab 256) trains on 2 CPU cores in about a
# minute: 0.11-0.14 s per jitted adamw step at batch 32 x 64 tokens (after
# warm-up, idle machine), so 300 steps take 32-42 s. "micro" is for tests.
# "mini" (4.8M at vocab 256) is the largest that is still practical on a CPU.
# "small" is GPT-2 small's shape (Radford et al. 2019; nanoGPT's gpt2 config):
# 12 layers, width 768, 12 heads, context 1024, embeddings tied to the output
# head: 124.4M parameters at GPT-2's vocab of 50257 (85.9M at vocab 256). It is
# meant for a GPU or a pod (experiments/diloco_gpt_small.toml).
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "micro": dict(layers=1, width=32, heads=2, context=16),
    "nano": dict(layers=2, width=128, heads=4, context=64),
    "mini": dict(layers=6, width=256, heads=8, context=128),
    "small": dict(layers=12, width=768, heads=12, context=1024, tie_embeddings=True),
}


class GPT(nnx.Module):
    """Decoder-only transformer over integer tokens.

    Token embedding plus learned positional embedding, ``layers`` causal
    :class:`TransformerBlock` s, a final LayerNorm and an untied, bias-free
    output head producing next-token logits.

    Args:
        vocab_size: number of distinct tokens (ids in ``[0, vocab_size)``).
        layers: number of transformer blocks.
        width: model width; must be divisible by ``heads``.
        heads: number of attention heads per block.
        context: maximum sequence length (size of the positional embedding).
        dropout: dropout rate on the embeddings and residual branches.
        tie_embeddings: compute the logits with the token embedding
            (``token_embed.attend``) instead of a separate head, as GPT-2 does.
        qk_layernorm: LayerNorm on queries and keys in every block (see
            :class:`TransformerBlock`); with ``train.loss`` z-loss it is the
            pair of mitigations of Wortsman et al. (2024).
        rngs: random streams for the parameter initialisation (and dropout).
    """

    PRESETS = GPT_PRESETS

    def __init__(
        self,
        vocab_size: int = 256,
        layers: int = 4,
        width: int = 128,
        heads: int = 4,
        context: int = 64,
        dropout: float = 0.0,
        tie_embeddings: bool = False,
        qk_layernorm: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        _check_positive(vocab_size=vocab_size, layers=layers, width=width, heads=heads,
                        context=context)
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        _check_dropout(dropout)
        self.vocab_size = vocab_size
        self.num_layers = layers
        self.width = width
        self.heads = heads
        self.context = context

        self.token_embed = nnx.Embed(vocab_size, width, embedding_init=_INIT, rngs=rngs)
        self.pos_embed = nnx.Embed(context, width, embedding_init=_INIT, rngs=rngs)
        self.embed_dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.blocks = nnx.List(
            [TransformerBlock(width, heads, causal=True, dropout=dropout, qk_layernorm=qk_layernorm, rngs=rngs)
             for _ in range(layers)]
        )
        self.ln_final = nnx.LayerNorm(width, rngs=rngs)
        self.tie_embeddings = bool(tie_embeddings)
        self.head = None if tie_embeddings else nnx.Linear(width, vocab_size, use_bias=False, kernel_init=_INIT,
                                                           rngs=rngs)

    @classmethod
    def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides: Any) -> "GPT":
        """Builds the model of ``GPT_PRESETS[name]``, with ``overrides`` on top.

        Example: ``GPT.from_preset("nano", vocab_size=65, rngs=nnx.Rngs(0))``.
        """
        if name not in GPT_PRESETS:
            raise ValueError(
                f"unknown GPT preset {name!r}; known presets: {sorted(GPT_PRESETS)}"
            )
        return cls(**{**GPT_PRESETS[name], **overrides}, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Maps int tokens ``(B, T)``, ``T <= context``, to logits ``(B, T, vocab_size)``."""
        return self.forward_with_attention_logits(tokens, deterministic=deterministic)[0]

    def forward_with_attention_logits(self, tokens: jax.Array, *, deterministic: bool = True,
                                      attention_logits: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        """``(logits, per-block attention logits)``; the list is empty unless ``attention_logits``
        (each entry ``(B, heads, T, T)``, pre-softmax and unmasked: see
        :func:`jaxopt_lab.diagnostics.instability.max_attention_logit`)."""
        if tokens.ndim != 2:
            raise ValueError(f"expected tokens of shape (B, T), got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"expected integer tokens, got dtype {tokens.dtype}")
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(
                f"sequence length T={length} is longer than the context={self.context}"
            )
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(length))
        x = self.embed_dropout(x, deterministic=deterministic)
        scores = []
        for block in self.blocks:
            if attention_logits:
                scores.append(block.attention_logits(block.ln_attn(x)))
            x = block(x, deterministic=deterministic)
        x = self.ln_final(x)
        return (self.token_embed.attend(x) if self.tie_embeddings else self.head(x)), scores
