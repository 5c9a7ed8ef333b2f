"""LoRA on flax nnx ``Conv`` layers: a low-rank correction of the kernel seen as a matrix.

LoRA (Hu et al. 2021) adapts a frozen weight ``W`` by ``s A B``. A conv kernel
``W`` of shape ``(kh, kw, c_in, c_out)`` acts on each ``kh x kw x c_in`` patch as the matrix
``W_mat = W.reshape(kh * kw * c_in, c_out)``; the adapter is a rank-r correction of that
matrix::

    y = conv(x, W) + b + s * conv(dropout(x), (A B).reshape(kh, kw, c_in, c_out)),   s = alpha / rank,

with ``A`` ((kh kw c_in) x r) uniform on ``[-1/sqrt(kh kw c_in), 1/sqrt(kh kw c_in)]`` (PEFT's
``kaiming_uniform_(a=sqrt(5))`` on its ``lora_A`` conv, whose fan-in is ``c_in kh kw``) and
``B`` (r x c_out, zero), so the adapted model starts equal to the pretrained one. This is PEFT's ``lora.Conv2d`` (``lora_A`` a conv with
the layer's kernel size into r channels, ``lora_B`` a 1x1 conv into c_out: the same
function, ``conv(conv(x, A), B) = conv(x, A B)``), with the factors stored as the matrices
above, at ``.../lora/lora_a`` and ``.../lora/lora_b`` like :class:`~jaxopt_lab.finetune.LoRALinear`,
so freezing, trainable counts and merging treat both alike. Without active dropout the
forward is one convolution with ``W + s (A B)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_lab.finetune.lora import check_lora_args, lora_a_init


class LoRAConv(nnx.Conv):
    """``nnx.Conv`` plus a rank-r adapter of its kernel matrix (see the module docstring).

    Only plain convolutions are taken: ``feature_group_count = 1``, no ``mask``, a padding that
    is a string ``SAME``/``VALID`` or explicit pairs (not ``CIRCULAR``/``REFLECT``/``CAUSAL``);
    anything else is a ValueError naming it.

    Args:
      in_features, out_features, kernel_size: as ``nnx.Conv``.
      lora_rank: r, 1 <= r <= min(kh * kw * in_features, out_features).
      alpha: the scale is ``alpha / lora_rank``; None: ``lora_rank``. 0 switches the adapter off.
      dropout: on the adapter's input, training mode only, in [0, 1).
      rngs: initialisation of ``A`` and, with dropout, its stream.
      a_initializer: ``A``'s initializer (on the ``(kh kw c_in) x r`` matrix); default
        :data:`~jaxopt_lab.finetune.lora.lora_a_init` (PEFT's); ``nnx.initializers.he_uniform()``
        is flax's ``nnx.LoRA`` default.
      **kwargs: the rest of ``nnx.Conv``'s arguments.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size, *, lora_rank: int,
                 alpha: float | None = None, dropout: float = 0.0, rngs: nnx.Rngs, a_initializer=lora_a_init,
                 **kwargs):
        super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)
        _check_plain(self)
        fan_in = math.prod(self.kernel_size) * in_features
        check_lora_args(lora_rank, alpha, dropout, fan_in, out_features)
        self.lora = nnx.LoRA(fan_in, lora_rank, out_features, param_dtype=self.param_dtype,
                             a_initializer=a_initializer, rngs=rngs)
        self.lora_rank = int(lora_rank)
        self.alpha = float(lora_rank if alpha is None else alpha)
        self.scale = self.alpha / self.lora_rank
        self.merged = False
        self.lora_dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs if dropout > 0 else None)

    @classmethod
    def from_conv(cls, conv: nnx.Conv, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
                  rngs: nnx.Rngs) -> "LoRAConv":
        """A LoRAConv holding ``conv``'s kernel and bias (the same values, the same settings), with new adapters."""
        _check_plain(conv)
        out = cls(conv.in_features, conv.out_features, conv.kernel_size, lora_rank=rank, alpha=alpha,
                  dropout=dropout, rngs=rngs, strides=conv.strides, padding=conv.padding,
                  input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation,
                  use_bias=conv.bias is not None, dtype=conv.dtype, param_dtype=conv.param_dtype,
                  precision=conv.precision)
        out.kernel[...] = conv.kernel[...]
        if conv.bias is not None:
            out.bias[...] = conv.bias[...]
        return out

    def delta(self) -> jax.Array:
        """``(alpha / rank) A B`` reshaped to the kernel's shape ``(kh, kw, c_in, c_out)``."""
        return (self.scale * (self.lora.lora_a[...] @ self.lora.lora_b[...])).reshape(self.kernel.shape)

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return conv_with(self, x, kernel)

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        kernel = self.kernel[...]
        dropping = not self.lora_dropout.deterministic and self.lora_dropout.rate > 0
        if self.merged:
            y = self._conv(x, kernel)
        elif dropping:
            y = self._conv(x, kernel) + self._conv(self.lora_dropout(x), self.delta().astype(kernel.dtype))
        else:
            y = self._conv(x, kernel + self.delta().astype(kernel.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def _check_plain(conv: nnx.Conv) -> None:
    check_plain(conv, "LoRA")


def conv_with(layer, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``nnx.Conv``'s convolution of ``x`` (one batch axis, channels last) with ``kernel``
    (``(kh, kw, c_in, c_out)``), no bias, under ``layer``'s settings (``kernel_size``,
    ``strides``, ``padding``, ``input_dilation``, ``kernel_dilation``, ``dtype``, ``precision``:
    an ``nnx.Conv`` or any module that holds them, such as the conv layers of SVFit and WeLore)."""
    n = len(layer.kernel_size)
    if x.ndim != n + 2:
        raise ValueError(f"{type(layer).__name__} takes inputs (B, spatial..., C) with one batch axis, got shape {x.shape}")

    def tup(v):
        return (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)

    padding = layer.padding
    if isinstance(padding, int):
        padding = [(padding, padding)] * n
    elif not isinstance(padding, str):
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    dtype = layer.dtype if layer.dtype is not None else jnp.result_type(x, kernel)  # nnx's promote_dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    spec = "N" + "HWD"[:n] + "C"
    return jax.lax.conv_general_dilated(
        x, kernel, tup(layer.strides), padding, lhs_dilation=tup(layer.input_dilation),
        rhs_dilation=tup(layer.kernel_dilation),
        dimension_numbers=(spec, "HWD"[:n] + "IO", spec), precision=layer.precision)


def check_plain(conv: nnx.Conv, method: str = "LoRA") -> None:
    """ValueError unless ``conv`` is a plain convolution (see :class:`LoRAConv`): what the
    kernel-as-matrix methods take."""
    if conv.feature_group_count != 1:
        raise ValueError(f"{method} on a conv layer needs feature_group_count = 1, got {conv.feature_group_count}")
    if conv.mask is not None:
        raise ValueError(f"{method} on a conv layer takes no kernel mask")
    if isinstance(conv.padding, str) and conv.padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"{method} on a conv layer takes SAME, VALID or explicit padding, got {conv.padding!r}")


def patches(layer, x: jax.Array) -> jax.Array:
    """The rows the kernel matrix multiplies: ``(B * H' * W', kh * kw * c_in)``, ordered as
    ``kernel.reshape(kh * kw * c_in, c_out)``'s rows (the convolution of ``x`` with the identity
    kernel, so padding, strides and dilations are ``layer``'s); ``conv(x, W)`` equals
    ``patches(x) @ W.reshape(-1, c_out)``, row for row."""
    k = math.prod(layer.kernel_size) * x.shape[-1]
    eye = jnp.eye(k, dtype=x.dtype).reshape(*layer.kernel_size, x.shape[-1], k)
    return conv_with(layer, x, eye).reshape(-1, k)
