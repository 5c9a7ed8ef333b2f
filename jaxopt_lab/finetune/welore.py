"""WeLore: non-uniform low-rank compression from the singular-value decay, and fine-tuning of
the low-rank components only.

Jaiswal et al. 2024, "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from
Low-Rank Gradients" (https://arxiv.org/abs/2407.11239; official code VITA-Group/WeLore, which
this module follows: ``utils.py`` ``adaptive_rank_pruning``, ``lib/rank_reduction.py``
``do_rank_reduction``, ``lib/LowRankLayer.py``).

Each targeted pretrained matrix ``W`` (in x out, ``n = min(in, out)``) has singular values
``s_1 >= ... >= s_n``; its min-max normalized spectrum
``ŝ_i = (s_i - s_n) / (s_1 - s_n)`` (in [0, 1]) decides its rank under one global threshold
``θ`` shared by all matrices: the components with ``ŝ_i < θ`` are pruned::

    k(W) = n - #{i : ŝ_i < θ},         rank reduction ratio  RRR(W) = 1 - k / n

(a flat spectrum, ``s_1 = s_n``, keeps its full rank: the official code's 0/0 compares False).
Matrices whose singular values decay fast get small ranks, flat spectra keep large ones (the
non-uniform rank reduction). ``W`` is a **low-rank component** (LRC) when
``RRR > min_reduction`` (strictly; default 0.4999, the official fine-tuning scripts'
``--min_ratio``; ``min_reduction=None`` instead takes the break-even ``k (in + out) < in * out``,
where the factors hold fewer numbers than ``W``, which is not the official rule); it is then
replaced by the pair::

    W ≈ A B,    A = U_k diag(√s_k)  (in x k),    B = diag(√s_k) V_kᵀ  (k x out),

the best rank-k approximation (Eckart-Young). The other matrices (N-LRCs) stay dense and
frozen. Fine-tuning trains only the LRC factors (``welore_a``, ``welore_b``;
:func:`freeze_all_but_low_rank`), the paper's "WeLore" fine-tuning of LRCs. Given a target
``compression`` (the share of the targeted matrices' parameters removed), the threshold is the
smallest ``θ`` among the normalized singular values that reaches it.

Differences from the official code: ``compression_target`` (choose θ for a share of the
targeted parameters removed) replaces its per-model table of θ calibrated on LLaMA-2; the
official scripts factor LLaMA's bias-free ``*proj`` layers in bfloat16 and also train the
RMSNorm weights (everything but the embeddings, the head and the N-LRCs), which here is
``train_also``.

An ``nnx.Conv`` is taken as its kernel matrix ``(kh kw c_in) x c_out`` (the view of
:class:`~jaxopt_lab.finetune.LoRAConv`): its spectrum, rank and factors are that matrix's, and
an LRC becomes a :class:`WeLoreConv`, one convolution with ``(A B)`` reshaped to the kernel.
"""

from __future__ import annotations

import dataclasses
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

A_NAME, B_NAME = "welore_a", "welore_b"


class WeLoreLinear(nnx.Module):
    """``y = (x A) B + b``: a low-rank component, the factored replacement of an ``nnx.Linear``."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, use_bias: bool = True,
                 param_dtype: Any = jnp.float32):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"welore rank must be an int in [1, {min(in_features, out_features)}], got {rank!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.welore_a = nnx.Param(jnp.zeros((in_features, rank), param_dtype))
        self.welore_b = nnx.Param(jnp.zeros((rank, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    @classmethod
    def from_linear(cls, linear: nnx.Linear, rank: int) -> "WeLoreLinear":
        w = np.asarray(linear.kernel[...], np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        out = cls(linear.in_features, linear.out_features, rank=rank, use_bias=linear.bias is not None,
                  param_dtype=linear.param_dtype)
        root = np.sqrt(s[:rank])
        dt = linear.kernel[...].dtype
        out.welore_a[...] = jnp.asarray(u[:, :rank] * root, dt)
        out.welore_b[...] = jnp.asarray(root[:, None] * vt[:rank], dt)
        if linear.bias is not None:
            out.bias[...] = linear.bias[...]
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        y = (x @ self.welore_a[...]) @ self.welore_b[...]
        return y if self.bias is None else y + self.bias[...]


class WeLoreConv(nnx.Module):
    """``y = conv(x, reshape(A B)) + b``: a low-rank component replacing a plain ``nnx.Conv``,
    ``A`` ``(kh kw c_in) x k``, ``B`` ``k x c_out``, the conv's settings kept."""

    def __init__(self, conv: nnx.Conv, rank: int):
        check_plain(conv, "WeLore")
        m, n = math.prod(conv.kernel_size) * conv.in_features, conv.out_features
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
            raise ValueError(f"welore rank must be an int in [1, {min(m, n)}], got {rank!r}")
        self.in_features, self.out_features, self.rank = conv.in_features, n, rank
        for name in ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation", "dtype", "precision"):
            setattr(self, name, getattr(conv, name))
        self.kernel_shape = tuple(conv.kernel[...].shape)
        self.welore_a = nnx.Param(jnp.zeros((m, rank), conv.param_dtype))
        self.welore_b = nnx.Param(jnp.zeros((rank, n), conv.param_dtype))
        self.bias = nnx.Param(jnp.zeros((n,), conv.param_dtype)) if conv.bias is not None else None

    @classmethod
    def from_conv(cls, conv: nnx.Conv, rank: int) -> "WeLoreConv":
        """The best rank-``rank`` factors of ``conv``'s kernel matrix, as :meth:`WeLoreLinear.from_linear`."""
        out = cls(conv, rank)
        w = np.asarray(conv.kernel[...], np.float64).reshape(-1, out.out_features)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s[:rank])
        dt = conv.kernel[...].dtype
        out.welore_a[...] = jnp.asarray(u[:, :rank] * root, dt)
        out.welore_b[...] = jnp.asarray(root[:, None] * vt[:rank], dt)
        if conv.bias is not None:
            out.bias[...] = conv.bias[...]
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv_with(self, x, (self.welore_a[...] @ self.welore_b[...]).reshape(self.kernel_shape))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def _matrix(layer) -> np.ndarray:
    """A Linear's kernel, or a conv's as its ``(kh kw c_in) x c_out`` matrix, in float64."""
    w = np.asarray(layer.kernel[...], np.float64)
    return w.reshape(-1, w.shape[-1])


def spectra(model: nnx.Module, targets: str = ".*") -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """``{path: (singular values (float64, descending), (in, out))}`` of the ``nnx.Linear``
    and ``nnx.Conv`` layers (a conv: its kernel matrix, ``in = kh kw c_in``) whose path matches
    ``targets`` in full; ValueError when none does."""
    try:
        pattern = re.compile(targets)
    except (re.error, TypeError) as e:
        raise ValueError(f"welore targets {targets!r} is not a regular expression: {e}") from None
    found = [(path_str(p), n) for p, n in nnx.iter_graph(model) if type(n) in (nnx.Linear, nnx.Conv)]
    out = {p: (np.linalg.svd(_matrix(n), compute_uv=False), _matrix(n).shape) for p, n in found if pattern.fullmatch(p)}
    if not out:
        raise ValueError(f"welore targets {targets!r} match none of the model's Linear or Conv layers: "
                         f"{', '.join(p for p, _ in found) or '(none)'}")
    return out


def _check_unit(name: str, value: Any, *, closed_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 <= value <= 1 if closed_low
                                                                              else 0 < value <= 1)
    if not ok:
        raise ValueError(f"welore {name} must be in {'[0, 1]' if closed_low else '(0, 1]'}, got {value!r}")


MIN_REDUCTION = 0.4999  # the official fine-tuning scripts' --min_ratio


def welore_ranks(spec: dict[str, tuple[np.ndarray, tuple[int, int]]], threshold: float,
                 min_reduction: float | None = MIN_REDUCTION) -> dict[str, int | None]:
    """``{path: k}`` for the LRCs and ``{path: None}`` for the N-LRCs under ``threshold`` θ."""
    _check_unit("threshold", threshold)
    if min_reduction is not None:
        _check_unit("min_reduction", min_reduction)
    out = {}
    for path, (s, (m, n)) in spec.items():
        k = len(s) - int(np.sum(normalized(s) < threshold))
        lrc = (1 - k / len(s) > min_reduction) if min_reduction is not None else k * (m + n) < m * n
        out[path] = k if lrc and k >= 1 else None
    return out


def normalized(s: np.ndarray) -> np.ndarray:
    """The official min-max normalization ``(s - min s) / (max s - min s)``; a flat spectrum
    (max = min, where the official code's 0/0 gives NaN, never below θ) maps to ones."""
    lo, hi = float(np.min(s)), float(np.max(s))
    return (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)


def compression(spec: dict[str, tuple[np.ndarray, tuple[int, int]]], ranks: dict[str, int | None]) -> float:
    """The share of the targeted matrices' parameters removed: ``1 - Σ size after / Σ m n``."""
    before = sum(m * n for _, (m, n) in spec.values())
    after = sum(m * n if ranks[p] is None else ranks[p] * (m + n) for p, (_, (m, n)) in spec.items())
    return 1 - after / before


def threshold_for(spec: dict[str, tuple[np.ndarray, tuple[int, int]]], target: float,
                  min_reduction: float | None = MIN_REDUCTION) -> float:
    """The smallest θ among the normalized singular values (and 0) whose compression is at
    least ``target``; ValueError when even θ = 1 (rank 1 everywhere) does not reach it."""
    _check_unit("compression", target)
    # the components with normalized value < θ are pruned: each pruned set is reached first at one of these values
    candidates = np.unique(np.concatenate([[0.0]] + [normalized(s) for s, _ in spec.values()]))
    for theta in candidates:  # compression grows with θ; at most a few thousand values here
        if compression(spec, welore_ranks(spec, float(theta), min_reduction)) >= target - 1e-12:
            return float(theta)
    best = compression(spec, welore_ranks(spec, 1.0, min_reduction))
    raise ValueError(f"welore compression {target!r} is out of reach: at most {best:.4f} for these matrices")


@dataclasses.dataclass
class WeLoreReport:
    """What :func:`apply_welore` did: the threshold, the LRCs' ranks, the N-LRCs, the compression."""

    threshold: float
    ranks: dict[str, int]
    dense: list[str]
    compression: float
    params_before: int
    params_after: int


def apply_welore(model: nnx.Module, targets: str = ".*", *, threshold: float | None = None,
                 compression_target: float | None = None, min_reduction: float | None = MIN_REDUCTION) -> WeLoreReport:
    """Compress, in place, the Linear and Conv layers matching ``targets``: the LRCs become
    :class:`WeLoreLinear` (:class:`WeLoreConv`) factor pairs, the N-LRCs stay. Exactly one of ``threshold`` (θ) and
    ``compression_target`` (share of the targeted parameters to remove) is given. A matrix is an
    LRC when its rank reduction ratio is > ``min_reduction`` (default 0.4999, the official
    fine-tuning scripts'; None: the break-even rule, see the module docstring)."""
    if (threshold is None) == (compression_target is None):
        raise ValueError("apply_welore needs exactly one of threshold and compression_target, got "
                         f"threshold={threshold!r}, compression_target={compression_target!r}")
    spec = spectra(model, targets)
    theta = threshold if threshold is not None else threshold_for(spec, compression_target, min_reduction)
    ranks = welore_ranks(spec, theta, min_reduction)
    for path, node in list(nnx.iter_graph(model)):
        p = path_str(path)
        if p in ranks and ranks[p] is not None and type(node) in (nnx.Linear, nnx.Conv):
            parent = model
            for key in path[:-1]:
                parent = parent[key] if isinstance(key, int) else getattr(parent, key)
            new = (WeLoreConv.from_conv(node, ranks[p]) if type(node) is nnx.Conv
                   else WeLoreLinear.from_linear(node, ranks[p]))
            _set_child(parent, path[-1], new)
    before = sum(m * n for _, (m, n) in spec.values())
    return WeLoreReport(threshold=theta, ranks={p: k for p, k in ranks.items() if k is not None},
                        dense=[p for p, k in ranks.items() if k is None], compression=compression(spec, ranks),
                        params_before=before, params_after=round(before * (1 - compression(spec, ranks))))


def low_rank_labels(train_also: str = "") -> Callable[[Any], Any]:
    """Labels for ``optax.multi_transform``: ``"trainable"`` for the LRC factors (``welore_a``,
    ``welore_b``) and paths matching ``train_also`` in full, ``"frozen"`` for the rest."""
    extra = re.compile(train_also) if train_also else None

    def labels(params):
        def label(path, _):
            p = path_str(path)
            return TRAINABLE if p.split("/")[-1] in (A_NAME, B_NAME) or (extra is not None and extra.fullmatch(p)) \
                else FROZEN

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


def freeze_all_but_low_rank(tx: optax.GradientTransformation, train_also: str = "") -> optax.GradientTransformation:
    """``tx`` on the LRC factors (and ``train_also``); zero updates and no state elsewhere."""
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, low_rank_labels(train_also))
