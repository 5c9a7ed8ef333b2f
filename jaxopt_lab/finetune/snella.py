r"""SNELLA: kernelized sparse fine-tuning with bi-level parameter competition.

Shen et al., "Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition for Vision
Models" (SNELLA; the extension of SNELL, NeurIPS 2024); official code github.com/ssfgunner/SNELL
(``model/vision_transformer_timm.py``: ``KLoRA``, ``SNELL``, ``SNELLA``; ``sparse_allocator.py``:
``Allocator``), whose rules and defaults this follows.

**The update** of a frozen kernel ``W`` (flax orientation, in x out) is a sparse matrix merged
from two low-rank factors ``A`` (in x r) and ``B`` (r x out) through a kernel κ, split into
``heads`` groups of ``d = r / heads`` columns of ``A`` (rows of ``B``)::

    y = x W + b + x ΔW,     ΔW = scale · M ⊙ K,   K = κ(A, B),
    M_ij = [ |K_ij| > quantile(|K|, ρ) ]  (ρ = the layer's sparsity ratio; ρ = 0: M = 1).

Kernels (``kernel=``): ``"linear"``: ``K = A B`` (LoRA's merge, of rank r); ``"distance"``
(the official ``KLoRA``/``SNELL``): ``K_ij = Σ_h c_h ‖A_i^h - B_j^h‖₂`` with
``c_h = 0.1 · (-1)^h``; ``"mixk"`` (the official ``SNELLA``, the default): with ``D`` the
distance kernel, ``K = D + α softmax(D / γ) + β`` (softmax over the output axis; α, γ, β
learnable scalars, 1, 1, 0 at the start). The nonlinear kernels give a merged matrix of rank
far above r.

The official ``sparsify`` multiplies ``K`` by the *detached* masked magnitude,
``ΔW = K ⊙ sg(M ⊙ |K|)`` (``F.threshold(|K|, t, 0)``), not by the 0/1 mask: that is the
default here (``magnitude_weighted=True``); ``False`` gives the paper's ``M ⊙ K``.

**Bi-level competition** (:func:`snella_allocation`, an optax transform around the method
that trains the factors): inside a layer, weights compete through the magnitude mask above;
across layers, the budget of kept weights ``V_t`` is shared out by importance. Every step, per
factor ``θ`` in ``{A, B}`` of each layer, with ``I = |θ ⊙ ∇θ|``::

    Ī <- β₁ Ī + (1 - β₁) I,     Ū <- β₂ Ū + (1 - β₂) |I - Ī|,
    score_l = mean(Ī_A ⊙ Ū_A) + mean(Ī_B ⊙ Ū_B),   ŝ = score / Σ score (uniform if all 0).

The budget falls cubically from ``V₀ = Σ_l (1 - ρ₀) n_l`` to ``V* = Σ_l (1 - ρ*) n_l``
(``n_l = in · out``) between ``init_warmup`` and ``total_steps - final_warmup``::

    V_t = V* + (V₀ - V*) (1 - (t - t_i) / (T - t_f - t_i))³,

and at the allocation steps (every ``mask_interval`` steps, and every step of the final
phase; not during the initial warm-up nor from ``total_steps`` on) layer l keeps
``v_l = min(V_t ŝ_l, n_l)`` plus the remainder water-filled over the unsaturated layers in
proportion to ŝ, and its ratio becomes ``ρ_l = 1 - v_l / n_l``. Defaults are the official
VTAB scripts' (``scripts/vtab/snella32``): ρ₀ = 0.01, ρ* = 0.8, β₁ = β₂ = 0.85,
``mask_interval=1``, no warm-ups, rank 32 in 2 heads.

Differences from the official code: the allocator counts optimizer steps (the official one is
called once per epoch with the epoch number — set ``total_steps`` and the intervals in steps);
volumes are not truncated to integers; the importance uses the parameters before the step (the
official update reads them after it, with the same gradient). Not here: the official ViT
scripts' ``Dropout(0.1)`` on the adapter's input and ``DropPath(0.1)`` on its output (their
``--no_drop_out`` / ``--no_drop_path`` are off); the official SNELL built with ratio 0 is
``KLoRA``, the plain ``K`` (here ``magnitude_weighted=False`` with ratio 0).

The ratios live in the model as parameters (``.../lora/snella_ratio``), frozen for the
training method; :func:`snella_allocation` moves them by ``new - old`` (so, like LoRA-GGPO, it
wraps the frozen method). The factors sit at ``.../lora/lora_a`` and ``lora_b`` (so
``freeze_base`` trains them and :func:`jaxopt_lab.finetune.lora_pairs` finds them); the
``"mixk"`` scalars sit at ``.../lora/snella_alpha|gamma|beta`` — train them with
``freeze_base(tx, train_also=SNELLA_TRAIN_ALSO)``.

Conv layers (:class:`SNELLAConv`): the same update of the kernel matrix ``(kh kw c_in) x c_out``
(LoRAConv's view), reshaped to the kernel; the official code adapts a ViT's Linear layers only.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_lab.finetune.lora import _set_child, flatten_with_paths, lora_a_init, lora_pairs, path_str
from jaxopt_lab.finetune.lora_conv import check_plain, conv_with
from jaxopt_lab.transforms import _validation as check

KERNELS = ("linear", "distance", "mixk")
RATIO_NAME = "snella_ratio"
#: The ``train_also`` pattern of the ``"mixk"`` kernel's learnable scalars α, γ, β:
#: ``freeze_base(tx, train_also=SNELLA_TRAIN_ALSO)``.
SNELLA_TRAIN_ALSO = r".*/lora/snella_(alpha|gamma|beta)"


def snella_kernel(a: jax.Array, b: jax.Array, kernel: str = "mixk", heads: int = 2, coeff: float = 0.1,
                  alpha=1.0, gamma=1.0, beta=0.0) -> jax.Array:
    """``K = κ(A, B)`` (in x out) for ``a`` (in x r), ``b`` (r x out); see the module docstring."""
    if kernel == "linear":
        return a @ b
    r = a.shape[1]
    d = r // heads
    out = 0.0
    for h in range(heads):
        ah, bh = a[:, h * d:(h + 1) * d], b[h * d:(h + 1) * d, :].T  # (in, d), (out, d)
        sq = jnp.sum(ah * ah, 1)[:, None] + jnp.sum(bh * bh, 1)[None, :] - 2 * ah @ bh.T
        out = out + coeff * (-1) ** h * jnp.sqrt(jnp.maximum(sq, 0.0) + 1e-12)
    if kernel == "mixk":
        out = out + alpha * jax.nn.softmax(out / gamma, axis=-1) + beta
    return out


def sparsify(k: jax.Array, ratio: jax.Array, magnitude_weighted: bool = True) -> jax.Array:
    """``K`` with the entries at or below the ``ratio`` quantile of ``|K|`` zeroed, times their
    detached magnitude (``magnitude_weighted``: the official ``SNELL``/``SNELLA.sparsify``,
    ``K * F.threshold(|K|, quantile(|K|, ratio), 0)``, which at ratio 0 still zeroes the entries
    equal to the smallest ``|K|``) or 1 (the paper's ``M ⊙ K``; ratio 0: nothing zeroed)."""
    mag = jax.lax.stop_gradient(jnp.abs(k))
    thres = jnp.quantile(mag.reshape(-1), jnp.clip(ratio, 0.0, 1.0))
    keep = mag > thres if magnitude_weighted else jnp.where(ratio > 0, mag > thres, True)
    return k * jnp.where(keep, mag if magnitude_weighted else 1.0, 0.0).astype(k.dtype)


class _Factors(nnx.Module):
    def __init__(self, in_features, out_features, rank, kernel, ratio, dtype, rngs):
        if kernel == "linear":  # LoRA's start (the official TuningModule "lora": kaiming_uniform(a=√5) A), B = 0
            self.lora_a = nnx.LoRAParam(lora_a_init(rngs.params(), (in_features, rank), dtype))
            self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype))
        else:  # U(±1), rescaled by SNELLALinear to the official init
            self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (in_features, rank), dtype, -1.0, 1.0))
            self.lora_b = nnx.LoRAParam(jax.random.uniform(rngs.params(), (rank, out_features), dtype, -1.0, 1.0))
        if kernel == "mixk":
            self.snella_alpha = nnx.Param(jnp.ones((), dtype))
            self.snella_gamma = nnx.Param(jnp.ones((), dtype))
            self.snella_beta = nnx.Param(jnp.zeros((), dtype))
        self.snella_ratio = nnx.Param(jnp.asarray(ratio, jnp.float32))


class SNELLALinear(nnx.Linear):
    """An ``nnx.Linear`` plus SNELLA's sparse kernelized update (see the module docstring).

    Args:
      in_features, out_features: as ``nnx.Linear``.
      rank: r, the factors' width (official 32).
      kernel: "mixk" (official SNELLA), "distance" (official SNELL/KLoRA) or "linear" (LoRA).
      heads: kernel heads (r must divide; official 2).
      ratio: the initial sparsity ratio ρ₀ in [0, 1] (official 0.01).
      scale: a factor on ΔW (1: the official code; ``alpha / rank`` reproduces LoRA with "linear").
      magnitude_weighted: the official ``K ⊙ sg(M ⊙ |K|)`` (True) or the paper's ``M ⊙ K``.
      rngs: the factors' initialisation.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 32, kernel: str = "mixk", heads: int = 2,
                 ratio: float = 0.01, scale: float = 1.0, magnitude_weighted: bool = True, rngs: nnx.Rngs, **kwargs):
        check_snella_args(rank, kernel, heads, ratio, scale)
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self.rank, self.kernel_name, self.heads = int(rank), kernel, int(heads)
        self.scale, self.magnitude_weighted = float(scale), bool(magnitude_weighted)
        self.lora = _Factors(in_features, out_features, rank, kernel, ratio, self.param_dtype, rngs)
        if kernel != "linear":  # U(±1/√(n · r/heads)), as the official init
            d = rank // heads
            self.lora.lora_a[...] = self.lora.lora_a[...] / math.sqrt(in_features * d)
            self.lora.lora_b[...] = self.lora.lora_b[...] / math.sqrt(out_features * d)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, rngs: nnx.Rngs, **kwargs) -> "SNELLALinear":
        out = cls(linear.in_features, linear.out_features, rngs=rngs, use_bias=linear.bias is not None,
                  dtype=linear.dtype, param_dtype=linear.param_dtype, precision=linear.precision, **kwargs)
        out.kernel[...] = linear.kernel[...]
        if linear.bias is not None:
            out.bias[...] = linear.bias[...]
        return out

    def merged_kernel(self) -> jax.Array:
        """``K = κ(A, B)`` before the mask."""
        f = self.lora
        extra = {}
        if self.kernel_name == "mixk":
            extra = dict(alpha=f.snella_alpha[...], gamma=f.snella_gamma[...], beta=f.snella_beta[...])
        return snella_kernel(f.lora_a[...], f.lora_b[...], self.kernel_name, self.heads, **extra)

    def delta(self) -> jax.Array:
        """``ΔW`` (in x out)."""
        return self.scale * sparsify(self.merged_kernel(), self.lora.snella_ratio[...], self.magnitude_weighted)

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        return y + x @ self.delta().astype(x.dtype)


class SNELLAConv(nnx.Conv):
    """An ``nnx.Conv`` plus SNELLA's sparse kernelized update of its kernel matrix
    ``(kh kw c_in) x c_out`` (the view of :class:`~jaxopt_lab.finetune.LoRAConv`): ``A`` is
    ``(kh kw c_in) x r``, ``ΔW`` (the same rule as :class:`SNELLALinear`'s, the quantile mask over
    the whole matrix) is reshaped to the kernel, and the forward is one convolution with
    ``W + ΔW``. Arguments as :class:`SNELLALinear`'s, plus ``nnx.Conv``'s ``kernel_size``."""

    def __init__(self, in_features: int, out_features: int, kernel_size, *, rank: int = 32, kernel: str = "mixk",
                 heads: int = 2, ratio: float = 0.01, scale: float = 1.0, magnitude_weighted: bool = True,
                 rngs: nnx.Rngs, **kwargs):
        check_snella_args(rank, kernel, heads, ratio, scale)
        super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)
        check_plain(self, "SNELLA")
        fan_in = math.prod(self.kernel_size) * in_features
        self.rank, self.kernel_name, self.heads = int(rank), kernel, int(heads)
        self.scale, self.magnitude_weighted = float(scale), bool(magnitude_weighted)
        self.lora = _Factors(fan_in, out_features, rank, kernel, ratio, self.param_dtype, rngs)
        if kernel != "linear":  # U(±1/√(n · r/heads)), n the matrix's sides, as SNELLALinear
            d = rank // heads
            self.lora.lora_a[...] = self.lora.lora_a[...] / math.sqrt(fan_in * d)
            self.lora.lora_b[...] = self.lora.lora_b[...] / math.sqrt(out_features * d)

    @classmethod
    def from_conv(cls, conv: nnx.Conv, *, rngs: nnx.Rngs, **kwargs) -> "SNELLAConv":
        check_plain(conv, "SNELLA")
        out = cls(conv.in_features, conv.out_features, conv.kernel_size, rngs=rngs, strides=conv.strides,
                  padding=conv.padding, input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation,
                  use_bias=conv.bias is not None, dtype=conv.dtype, param_dtype=conv.param_dtype,
                  precision=conv.precision, **kwargs)
        out.kernel[...] = conv.kernel[...]
        if conv.bias is not None:
            out.bias[...] = conv.bias[...]
        return out

    merged_kernel = SNELLALinear.merged_kernel  # K = κ(A, B), the kernel matrix's shape
    delta = SNELLALinear.delta  # ΔW, (kh kw c_in) x c_out

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        kernel = self.kernel[...]
        y = conv_with(self, x, kernel + self.delta().reshape(kernel.shape).astype(kernel.dtype))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def check_snella_args(rank, kernel, heads, ratio, scale) -> None:
    """ValueError naming a bad rank, kernel, heads (not dividing the rank), ratio or scale."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"snella rank must be a positive int, got {rank!r}")
    if kernel not in KERNELS:
        raise ValueError(f"snella kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or rank % heads:
        raise ValueError(f"snella heads must be a positive int dividing the rank {rank}, got {heads!r}")
    check.number("ratio", ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
    check.number("scale", scale, lambda v: math.isfinite(v), "finite")


def apply_snella(model: nnx.Module, targets: str = ".*", *, rngs: nnx.Rngs, **kwargs) -> list[str]:
    """Replace, in place, every ``nnx.Linear`` of ``model`` whose path matches ``targets`` (in full)
    by a :class:`SNELLALinear` with the same kernel and bias (``kwargs``: its arguments), every
    plain ``nnx.Conv`` by a :class:`SNELLAConv`; returns the adapted paths. ValueError when
    nothing matches."""
    pattern = re.compile(targets)
    found = [(p, n) for p, n in nnx.iter_graph(model)
             if (isinstance(n, nnx.Linear) and not isinstance(n, SNELLALinear)) or type(n) is nnx.Conv]
    chosen = [(p, n) for p, n in found if pattern.fullmatch(path_str(p))]
    if not chosen:
        raise ValueError(f"snella targets {targets!r} match none of the model's Linear or Conv layers: "
                         f"{', '.join(path_str(p) for p, _ in found) or '(none)'}")
    for path, layer in chosen:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        new = (SNELLAConv.from_conv(layer, rngs=rngs, **kwargs) if isinstance(layer, nnx.Conv)
               else SNELLALinear.from_linear(layer, rngs=rngs, **kwargs))
        _set_child(parent, path[-1], new)
    return [path_str(p) for p, _ in chosen]


# ---- the allocation ---------------------------------------------------------------------


class SNELLAAllocationState(NamedTuple):
    """``count``: steps taken; ``ipt``/``unc``: per layer, the EMAs Ī and Ū of (A, B);
    ``scores``: the last normalised layer scores ŝ; ``inner``: the inner method's state."""

    count: jax.Array
    ipt: tuple
    unc: tuple
    scores: jax.Array
    inner: optax.OptState


def _wide(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _layers(paths):
    index = {p: i for i, p in enumerate(paths)}
    out = []
    for p in lora_pairs(paths):
        r = index.get(f"{p.prefix}/lora/{RATIO_NAME}")
        if r is not None:
            out.append((p, r))
    return out


def budget(step, v0, vt, total_steps, init_warmup, final_warmup):
    """``(V_t, whether step t allocates)``: the official ``schedule_threshold`` (mask_interval aside)."""
    span = max(total_steps - final_warmup - init_warmup, 1)
    mul = 1.0 - (step - init_warmup) / span
    v = jnp.where(step <= init_warmup, v0, jnp.where(step > total_steps - final_warmup, vt, vt + (v0 - vt) * mul ** 3))
    return v


def allocate(scores: jax.Array, volume, sizes: jax.Array) -> jax.Array:
    """Kept weights per layer: ``min(V ŝ, n)`` and the remainder water-filled over the
    unsaturated layers in proportion to ŝ (the official ``param_alloc``, without integer truncation)."""
    alloc = jnp.minimum(volume * scores, sizes)
    for _ in range(scores.shape[0]):
        remain = sizes - alloc
        w = jnp.where(remain > 0, scores, 0.0)
        delta = volume - jnp.sum(alloc)
        add = jnp.minimum(delta * w / jnp.maximum(jnp.sum(w), 1e-30), remain)
        alloc = alloc + jnp.where(delta > 0, add, 0.0)
    return alloc


def snella_allocation(inner: optax.GradientTransformation, total_steps: int, target_ratio: float = 0.8,
                      init_ratio: float = 0.01, init_warmup: int = 0, final_warmup: int = 0, mask_interval: int = 1,
                      beta1: float = 0.85, beta2: float = 0.85) -> optax.GradientTransformation:
    """SNELLA's bi-level sparsity allocation around ``inner`` (see the module docstring).

    Args:
      inner: the method that trains the factors (in a config, the frozen method).
      total_steps: T, the allocation's horizon (the official ``alloc_epoch``, here in steps).
      target_ratio: ρ*, the average sparsity at the end (official VTAB 0.8).
      init_ratio: ρ₀, the layers' initial ratio (give the modules the same ``ratio``; 0.01).
      init_warmup, final_warmup: steps without allocation at the start / at the target budget.
      mask_interval: steps between allocations in the decreasing phase (official 1).
      beta1, beta2: the EMAs of the sensitivity and its uncertainty (official 0.85), in (0, 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    """
    total_steps = check.static_int("total_steps", total_steps, 1)
    init_warmup = check.static_int("init_warmup", init_warmup, 0)
    final_warmup = check.static_int("final_warmup", final_warmup, 0)
    mask_interval = check.static_int("mask_interval", mask_interval, 1)
    if total_steps <= init_warmup + final_warmup:
        raise ValueError(f"snella_allocation total_steps {total_steps} must exceed init_warmup + final_warmup "
                         f"({init_warmup} + {final_warmup})")
    check.number("target_ratio", target_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
    check.number("init_ratio", init_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
    check.number("beta1", beta1, lambda v: 0 < v < 1, "in (0, 1)")
    check.number("beta2", beta2, lambda v: 0 < v < 1, "in (0, 1)")

    def init_fn(params):
        _, leaves, _ = flatten_with_paths(params)
        layers = _layers(flatten_with_paths(params)[0])
        z = tuple((jnp.zeros_like(leaves[p.a], _wide(leaves[p.a].dtype)), jnp.zeros_like(leaves[p.b], _wide(leaves[p.b].dtype)))
                  for p, _ in layers)
        dt = _wide(leaves[layers[0][0].a].dtype) if layers else jnp.float32
        return SNELLAAllocationState(jnp.zeros([], jnp.int32), z, z, jnp.zeros((len(layers),), dt),
                                     inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        paths, grads, treedef = flatten_with_paths(updates)
        layers = _layers(paths)
        new_updates, inner_state = inner.update(updates, state.inner, params, **extra)
        count = state.count + 1
        if not layers:
            return new_updates, state._replace(count=count, inner=inner_state)
        if params is None:
            raise ValueError("snella_allocation needs params: call update(grads, state, params)")
        values = jax.tree.leaves(params)
        out = jax.tree.leaves(new_updates)
        ipt, unc, raw = [], [], []
        for k, (p, _) in enumerate(layers):
            pair_ipt, pair_unc, s = [], [], 0.0
            for j, i in enumerate((p.a, p.b)):
                dt = state.ipt[k][j].dtype
                sens = jnp.abs(values[i].astype(dt) * grads[i].astype(dt))
                sens = jnp.where(jnp.isnan(sens), 0.0, sens)
                e = beta1 * state.ipt[k][j] + (1 - beta1) * sens
                u = beta2 * state.unc[k][j] + (1 - beta2) * jnp.abs(sens - e)
                pair_ipt.append(e)
                pair_unc.append(u)
                s = s + jnp.mean(e * u)
            ipt.append(tuple(pair_ipt))
            unc.append(tuple(pair_unc))
            raw.append(s)
        raw = jnp.stack(raw)
        total = jnp.sum(raw)
        scores = jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), 1.0 / raw.shape[0])
        sizes = jnp.asarray([float(values[p.a].shape[0] * values[p.b].shape[1]) for p, _ in layers], scores.dtype)
        v0, vt = jnp.sum((1 - init_ratio) * sizes), jnp.sum((1 - target_ratio) * sizes)
        t = count  # the step the new ratios serve
        volume = budget(t.astype(scores.dtype), v0, vt, total_steps, init_warmup, final_warmup)
        final = t > total_steps - final_warmup
        due = (t > init_warmup) & (t < total_steps) & (final | (t % mask_interval == 0))
        ratios = jnp.clip(1.0 - allocate(scores, volume, sizes) / sizes, 0.0, 1.0)
        for k, (p, r) in enumerate(layers):
            old = values[r].astype(scores.dtype)
            out[r] = jnp.where(due, ratios[k] - old, 0.0).astype(values[r].dtype)
        return (jax.tree.unflatten(treedef, out),
                SNELLAAllocationState(count, tuple(ipt), tuple(unc), scores, inner_state))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


snella_allocation.perturbs_frozen_base = True  # it moves the frozen ratios: a config freezes its inner method
