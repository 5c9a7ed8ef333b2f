"""SVFit: fine-tune only the top-r singular values of each pretrained matrix.

Sun et al. 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using
Singular Values" (https://arxiv.org/abs/2409.05926). The pretrained kernel is split by its SVD
into its best rank-r approximation and the rest (Sec. III, eqs. 3-5)::

    W = U Σ Vᵀ = U_r Σ_r V_rᵀ + W_e,          W' = W_e + U_r diag(σ) V_rᵀ,

with ``σ`` (r,) initialised at the top-r singular values ``Σ_r`` and the only trainable part
of the layer; the singular vectors ``U_r``, ``V_r`` and the residual ``W_e`` are frozen. With
``σ = Σ_r`` the layer is the pretrained one (up to floating-point rounding of the split). The
paper trains, beside the singular values, only the task's new head (``train_also`` here).
``r`` is a number, or (``energy``) the smallest r whose singular values hold that share of
``Σ σ_i²`` (the paper's "over 99% of the matrix's information").

:class:`SVFitLinear` is an ``nnx.Linear`` whose ``kernel`` holds ``W_e`` (flax orientation:
in x out) and which adds ``svfit_u`` (in x r), ``svfit_s`` (r,) and ``svfit_v`` (r x out, the
paper's ``V_rᵀ``). :func:`apply_svfit` replaces the Linear layers whose path matches
``targets``; :func:`freeze_all_but_singular_values` is the optax masking (the rest gets
``optax.set_to_zero``, no optimizer state).

:class:`SVFitConv` does the same for an ``nnx.Conv``, its kernel ``(kh, kw, c_in, c_out)`` seen as
the ``(kh kw c_in) x c_out`` matrix that multiplies each input patch (the view of
:class:`~jaxopt_lab.finetune.LoRAConv`): ``svfit_u`` is ``(kh kw c_in) x r``, the forward one
convolution with ``W_e + (U_r diag(σ) V_rᵀ)`` reshaped to the kernel's shape.

No official code was found; this follows the paper's equations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_lab.finetune.lora import FROZEN, TRAINABLE, _set_child, path_str
from jaxopt_lab.finetune.lora_conv import check_plain, conv_with

S_NAME = "svfit_s"


class SVFitLinear(nnx.Linear):
    """``y = x W_e + ((x U_r) * σ) V_rᵀ + b``: an ``nnx.Linear`` (kernel ``W_e``) with trainable
    singular values ``svfit_s`` and frozen singular vectors ``svfit_u``, ``svfit_v``."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, rngs: nnx.Rngs, **kwargs):
        check_rank(rank, in_features, out_features)
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        dtype = self.param_dtype
        self.rank = int(rank)
        self.svfit_u = nnx.Param(jnp.zeros((in_features, rank), dtype))
        self.svfit_s = nnx.Param(jnp.zeros((rank,), dtype))
        self.svfit_v = nnx.Param(jnp.zeros((rank, out_features), dtype))

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, rank: int | None = None, energy: float | None = None) -> "SVFitLinear":
        """An SVFitLinear equal to ``linear``: the SVD of its kernel (float64), the top ``rank``
        (or ``energy``-share) singular triplets split from the residual."""
        w = np.asarray(linear.kernel[...], np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        r = rank_for(s, rank, energy)
        check_rank(r, linear.in_features, linear.out_features)
        out = cls(linear.in_features, linear.out_features, rank=r, rngs=nnx.Rngs(0), use_bias=linear.bias is not None,
                  dtype=linear.dtype, param_dtype=linear.param_dtype, precision=linear.precision)
        dt = linear.kernel[...].dtype
        out.kernel[...] = jnp.asarray(w - (u[:, :r] * s[:r]) @ vt[:r], dt)
        out.svfit_u[...] = jnp.asarray(u[:, :r], dt)
        out.svfit_s[...] = jnp.asarray(s[:r], dt)
        out.svfit_v[...] = jnp.asarray(vt[:r], dt)
        if linear.bias is not None:
            out.bias[...] = linear.bias[...]
        return out

    def merged_kernel(self) -> jax.Array:
        """``W_e + U_r diag(σ) V_rᵀ`` (in x out)."""
        return self.kernel[...] + (self.svfit_u[...] * self.svfit_s[...]) @ self.svfit_v[...]

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        return y + ((x @ self.svfit_u[...]) * self.svfit_s[...]) @ self.svfit_v[...]


class SVFitConv(nnx.Conv):
    """``y = conv(x, W_e + reshape(U_r diag(σ) V_rᵀ)) + b``: an ``nnx.Conv`` (kernel ``W_e``) with
    trainable singular values ``svfit_s`` of its kernel matrix ``(kh kw c_in) x c_out`` and
    frozen singular vectors ``svfit_u`` (``(kh kw c_in) x r``), ``svfit_v`` (``r x c_out``)."""

    def __init__(self, in_features: int, out_features: int, kernel_size, *, rank: int, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)
        check_plain(self, "SVFit")
        fan_in = math.prod(self.kernel_size) * in_features
        check_rank(rank, fan_in, out_features)
        dtype = self.param_dtype
        self.rank = int(rank)
        self.svfit_u = nnx.Param(jnp.zeros((fan_in, rank), dtype))
        self.svfit_s = nnx.Param(jnp.zeros((rank,), dtype))
        self.svfit_v = nnx.Param(jnp.zeros((rank, out_features), dtype))

    @classmethod
    def from_conv(cls, conv: nnx.Conv, *, rank: int | None = None, energy: float | None = None) -> "SVFitConv":
        """An SVFitConv equal to ``conv``: the SVD (float64) of its kernel matrix, split as
        :meth:`SVFitLinear.from_linear` splits a Linear kernel."""
        check_plain(conv, "SVFit")
        shape = conv.kernel[...].shape
        w = np.asarray(conv.kernel[...], np.float64).reshape(-1, shape[-1])
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        r = rank_for(s, rank, energy)
        check_rank(r, w.shape[0], w.shape[1])
        out = cls(conv.in_features, conv.out_features, conv.kernel_size, rank=r, rngs=nnx.Rngs(0),
                  strides=conv.strides, padding=conv.padding, input_dilation=conv.input_dilation,
                  kernel_dilation=conv.kernel_dilation, use_bias=conv.bias is not None, dtype=conv.dtype,
                  param_dtype=conv.param_dtype, precision=conv.precision)
        dt = conv.kernel[...].dtype
        out.kernel[...] = jnp.asarray((w - (u[:, :r] * s[:r]) @ vt[:r]).reshape(shape), dt)
        out.svfit_u[...] = jnp.asarray(u[:, :r], dt)
        out.svfit_s[...] = jnp.asarray(s[:r], dt)
        out.svfit_v[...] = jnp.asarray(vt[:r], dt)
        if conv.bias is not None:
            out.bias[...] = conv.bias[...]
        return out

    def merged_kernel(self) -> jax.Array:
        """``W_e + reshape(U_r diag(σ) V_rᵀ)``, the kernel's shape."""
        delta = (self.svfit_u[...] * self.svfit_s[...]) @ self.svfit_v[...]
        return self.kernel[...] + delta.reshape(self.kernel.shape).astype(self.kernel[...].dtype)

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = conv_with(self, x, self.merged_kernel())
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def check_rank(rank: Any, in_features: int, out_features: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"svfit rank must be a positive int, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(f"svfit rank {rank} is larger than the layer's smaller side min({in_features}, {out_features})")


def rank_for(s: np.ndarray, rank: int | None, energy: float | None) -> int:
    """``rank``, or the smallest r with ``Σ_{i<r} s_i² >= energy Σ s_i²``; exactly one is given."""
    if (rank is None) == (energy is None):
        raise ValueError(f"svfit needs exactly one of rank and energy, got rank={rank!r}, energy={energy!r}")
    if rank is not None:
        return rank
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"svfit energy must be in (0, 1], got {energy!r}")
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(min(np.searchsorted(share, energy - 1e-12) + 1, len(s)))


def apply_svfit(model: nnx.Module, targets: str = ".*", rank: int | None = None, energy: float | None = None) -> list[str]:
    """Replace, in place, every ``nnx.Linear`` whose path matches ``targets`` (in full) by an
    :class:`SVFitLinear` equal to it, and every ``nnx.Conv`` by an :class:`SVFitConv`; returns
    the paths. ValueError (naming the pattern and the Linear and Conv paths) when nothing
    matches, and for a bad rank or energy."""
    if rank is not None:
        check_rank(rank, math.inf, math.inf)
    try:
        pattern = re.compile(targets)
    except (re.error, TypeError) as e:
        raise ValueError(f"svfit targets {targets!r} is not a regular expression: {e}") from None
    found = [(p, n) for p, n in nnx.iter_graph(model) if type(n) in (nnx.Linear, nnx.Conv)]
    chosen = [(p, n) for p, n in found if pattern.fullmatch(path_str(p))]
    if not chosen:
        raise ValueError(f"svfit targets {targets!r} match none of the model's Linear or Conv layers: "
                         f"{', '.join(path_str(p) for p, _ in found) or '(none)'}")
    new = [(p, SVFitConv.from_conv(n, rank=rank, energy=energy) if isinstance(n, nnx.Conv)
            else SVFitLinear.from_linear(n, rank=rank, energy=energy)) for p, n in chosen]
    for path, layer in new:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        _set_child(parent, path[-1], layer)
    return [path_str(p) for p, _ in chosen]


def merge_svfit(model: nnx.Module) -> list[str]:
    """Replace every :class:`SVFitLinear` by the ``nnx.Linear`` with kernel
    ``W_e + U_r diag(σ) V_rᵀ`` (one matmul at inference), every :class:`SVFitConv` by the
    ``nnx.Conv`` with that kernel reshaped; returns the paths."""
    done = []
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, SVFitConv):
            lin = nnx.Conv(node.in_features, node.out_features, node.kernel_size, strides=node.strides,
                           padding=node.padding, input_dilation=node.input_dilation,
                           kernel_dilation=node.kernel_dilation, use_bias=node.bias is not None, dtype=node.dtype,
                           param_dtype=node.param_dtype, precision=node.precision, rngs=nnx.Rngs(0))
        elif isinstance(node, SVFitLinear):
            lin = nnx.Linear(node.in_features, node.out_features, use_bias=node.bias is not None, dtype=node.dtype,
                             param_dtype=node.param_dtype, precision=node.precision, rngs=nnx.Rngs(0))
        if isinstance(node, (SVFitConv, SVFitLinear)):
            lin.kernel[...] = node.merged_kernel()
            if node.bias is not None:
                lin.bias[...] = node.bias[...]
            parent = model
            for key in path[:-1]:
                parent = parent[key] if isinstance(key, int) else getattr(parent, key)
            _set_child(parent, path[-1], lin)
            done.append(path_str(path))
    return done


def singular_value_labels(train_also: str = "") -> Callable[[Any], Any]:
    """Labels for ``optax.multi_transform``: ``"trainable"`` for the ``svfit_s`` leaves and the
    paths matching ``train_also`` in full, ``"frozen"`` for the rest."""
    extra = re.compile(train_also) if train_also else None

    def labels(params):
        def label(path, _):
            p = path_str(path)
            return TRAINABLE if p.split("/")[-1] == S_NAME or (extra is not None and extra.fullmatch(p)) else FROZEN

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


def freeze_all_but_singular_values(tx: optax.GradientTransformation, train_also: str = "") -> optax.GradientTransformation:
    """``tx`` on the singular values (and ``train_also``), zero updates and no state elsewhere."""
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, singular_value_labels(train_also))
