"""A multi-layer perceptron classifier."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
}


class MLP(nnx.Module):
    """Fully connected network: ``Linear -> act -> ... -> Linear``.

    The input is flattened from axis 1, so both ``(B, d)`` vectors and
    ``(B, H, W, C)`` images (with ``H * W * C == in_features``) are accepted.
    With ``hidden=()`` the model is a single affine map (a linear classifier).

    Args:
        in_features: size of one flattened input example.
        hidden: widths of the hidden layers, in order; ``()`` for none.
        out_features: number of outputs (logits).
        activation: nonlinearity between layers, one of ``"relu"``,
            ``"gelu"``, ``"tanh"``.
        rngs: random streams for the parameter initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (128,),
        out_features: int = 10,
        activation: str = "relu",
        *,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        hidden = tuple(int(h) for h in hidden)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive ints, got {hidden!r}")

        self.in_features = int(in_features)
        self.hidden = hidden
        self.out_features = int(out_features)
        self.activation = activation
        sizes = (self.in_features, *hidden, self.out_features)
        self.layers = nnx.List(
            [nnx.Linear(d_in, d_out, rngs=rngs) for d_in, d_out in zip(sizes[:-1], sizes[1:])]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(B, ...)`` inputs to ``(B, out_features)`` logits."""
        return self.head(self.features(x))

    def features(self, x: jax.Array) -> jax.Array:
        """The last hidden layer's activations ``(B, hidden[-1])`` (the flattened input with
        ``hidden=()``): what a method that splits features from the classifier reads (FedBR)."""
        x = jnp.reshape(x, (x.shape[0], -1))
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[1]} features per example after flattening, "
                f"but in_features={self.in_features}"
            )
        act = ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return x

    def head(self, z: jax.Array) -> jax.Array:
        """The last linear layer: features to ``(B, out_features)`` logits."""
        return self.layers[-1](z)
