"""A small convolutional classifier (sized for 8x8 digits)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_LECUN_NORMAL = nnx.initializers.lecun_normal()


def _conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """lecun-normal conv kernel ``(kh, kw, c_in, c_out)``, drawn as a matrix.

    The ``(kh * kw * c_in, c_out)`` matrix has the same fan-in, so the same
    distribution as nnx.Conv's default initialiser, but XLA on CPU compiles
    the draw several times faster than for the 4-d shape.
    """
    return _LECUN_NORMAL(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


class CNN(nnx.Module):
    """``conv3x3 -> relu -> avgpool2x2`` blocks, global average pool, dense head.

    Pooling uses ``SAME`` padding with the padding left out of the mean, so a
    spatial side of 1 stays 1 and deeper stacks still work on 8x8 inputs.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the ``(B, H, W, C)`` float input images.
        channels: output channels of the conv layers, in order (at least one).
        rngs: random streams for the parameter initialisation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32),
        *,
        rngs: nnx.Rngs,
    ):
        channels = tuple(int(c) for c in channels)
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(
                f"channels must be a non-empty sequence of positive ints, got {channels!r}"
            )
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.channels = channels
        sizes = (self.in_channels, *channels)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    c_in,
                    c_out,
                    kernel_size=(3, 3),
                    padding="SAME",
                    kernel_init=_conv_kernel_init,
                    rngs=rngs,
                )
                for c_in, c_out in zip(sizes[:-1], sizes[1:])
            ]
        )
        self.head = nnx.Linear(channels[-1], self.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(B, H, W, C)`` images to ``(B, num_classes)`` logits."""
        return self.head(self.features(x))

    def features(self, x: jax.Array) -> jax.Array:
        """The globally pooled conv features ``(B, channels[-1])``; ``self.head`` maps them to logits."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (B, H, W, {self.in_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
            x = nnx.avg_pool(
                x, window_shape=(2, 2), strides=(2, 2), padding="SAME", count_include_pad=False
            )
        return jnp.mean(x, axis=(1, 2))
