"""A small transformer for modular arithmetic ``(a, b) -> a op b mod p`` (grokking)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_lab.models.gpt import _INIT, TransformerBlock, _check_positive


class ModularTransformer(nnx.Module):
    """Classifies a pair ``(a, b)`` of residues mod ``p`` into one of ``p`` classes.

    Each pair becomes the sequence ``[a, b, EQ]`` with the extra token
    ``EQ = p`` (vocabulary ``p + 1``), embedded with learned positions and
    passed through non-causal :class:`~jaxopt_lab.models.gpt.TransformerBlock`
    s and a final LayerNorm; the head reads the last (``EQ``) position.

    Args:
        p: the modulus; inputs lie in ``[0, p)`` and there are ``p`` classes.
        layers: number of transformer blocks.
        width: model width; must be divisible by ``heads``.
        heads: number of attention heads per block.
        rngs: random streams for the parameter initialisation.
    """

    def __init__(
        self,
        p: int,
        layers: int = 2,
        width: int = 128,
        heads: int = 4,
        *,
        rngs: nnx.Rngs,
    ):
        _check_positive(p=p, layers=layers, width=width, heads=heads)
        if p < 2:
            raise ValueError(f"p must be at least 2, got p={p}")
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.p = p
        self.num_layers = layers
        self.width = width
        self.heads = heads

        self.token_embed = nnx.Embed(p + 1, width, embedding_init=_INIT, rngs=rngs)
        self.pos_embed = nnx.Embed(3, width, embedding_init=_INIT, rngs=rngs)
        self.blocks = nnx.List(
            [TransformerBlock(width, heads, causal=False, rngs=rngs) for _ in range(layers)]
        )
        self.ln_final = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, p, kernel_init=_INIT, rngs=rngs)

    def __call__(self, pairs: jax.Array) -> jax.Array:
        """Maps int pairs ``(B, 2)`` to logits ``(B, p)``."""
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"expected pairs of shape (B, 2), got shape {tuple(pairs.shape)}")
        if not jnp.issubdtype(pairs.dtype, jnp.integer):
            raise ValueError(f"expected integer pairs, got dtype {pairs.dtype}")
        eq = jnp.full((pairs.shape[0], 1), self.p, dtype=pairs.dtype)
        tokens = jnp.concatenate([pairs, eq], axis=1)
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(3))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x[:, -1]))
