"""EVA: data-driven LoRA initialization with explained-variance rank redistribution.

Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation" (https://arxiv.org/abs/2410.07170; official code ml-jku/EVA, merged into
PEFT as ``peft.tuners.lora.eva``, which this module follows).

For every adapted layer ``l`` with input activations ``X_l`` (tokens x in), EVA computes,
incrementally over minibatches, the truncated SVD of the centred activations (incremental
PCA, Ross et al. 2008 as in scikit-learn's ``IncrementalPCA.partial_fit``)::

    X_l - mean = U Σ Vᵀ,     A_l = V[:, :r_l]      (in x r_l; the paper's A = V_{:r}ᵀ),  B_l = 0,

so the adapted model starts equal to the pretrained one and ``A`` projects onto the
directions of largest activation variance. Each layer keeps ``round(rho * r)`` components;
a component has converged once its cosine similarity with the previous minibatch's is
``>= tau``, and a layer stops being updated once its first ``r_l`` components have converged
(the loop ends when every layer has). The ranks ``r_l`` are redistributed under the budget
``r * L`` (``L`` adapted layers): the explained-variance ratios
``ξ_{l,i} = σ_{l,i}² / Σ_j ||X_l[:, j] - mean_j||²`` of all layers' components are sorted
together and layer ``l`` gets as many ranks as it has components among the top ``r * L``
(eq. 4 of the paper). A layer that gets rank 0 is not adapted (its adapter is removed).
A layer whose rank changes from ``r`` to ``r_l`` gets ``alpha_l = alpha * r_l / r`` (PEFT's
``adjust_scaling_factors=True``, its default, in ``_load_eva_state_dict``), so every adapter
keeps the scale ``alpha / r`` whatever its new rank.

Use: :func:`jaxopt_lab.finetune.apply_lora` (rank ``r``), then :func:`eva_init` with a few
batches; the adapters are rebuilt in place with their new ranks and EVA's ``A``.

Differences from PEFT, all because this runs on a small model on CPU: the SVD of each
incremental step is exact (``numpy.linalg.svd`` in float64) where PEFT uses
``torch.svd_lowrank``; the batches are given as a sequence (cycled, as PEFT cycles its
dataloader) with a ``max_steps`` cap instead of an endless loop; every position of every
sequence is used (PEFT's causal-LM default without padding); layers with equal inputs are
not de-duplicated (the ranking and the components are the same, only the work is repeated).
A layer keeps at most ``min(round(rho * r), in, out)`` components: PEFT refuses more
components than input features, and :class:`~jaxopt_lab.finetune.LoRALinear` a rank above
``min(in, out)`` (PEFT would allow a rank above ``out``).

Conv layers (:class:`~jaxopt_lab.finetune.LoRAConv`, the kernel as a ``(kh kw c_in) x c_out``
matrix): the activations are the layer's input patches, one row per output position
(:func:`jaxopt_lab.finetune.lora_conv.patches`, padding included: the rows the kernel matrix
multiplies), so ``A``'s columns are the patches' top principal directions. PEFT's EVA takes
Linear layers only; this is the same rule on the conv's matrix view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_lab.finetune.lora import LoRALinear, adapted_layers
from jaxopt_lab.finetune.lora_conv import LoRAConv, conv_with, patches


class IncrementalPCA:
    """Incremental PCA in float64 numpy (scikit-learn's ``partial_fit`` algorithm).

    After ``partial_fit`` on batches ``X_1, ..., X_t`` (each samples x features):
    ``components`` (k x features, rows orthonormal, signs as scikit-learn's ``svd_flip``
    with ``u_based_decision=False``), ``singular_values`` (k,), ``mean``, ``n_seen`` and
    ``explained_variance_ratio`` (k,) = ``σ² / Σ_j n var_j``. With ``k`` at least the data's
    rank the result equals the batch PCA of the stacked ``X_1..X_t``.
    """

    def __init__(self, n_components: int):
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        self.n_components = n_components
        self.n_seen = 0
        self.mean = None
        self.var = None
        self.components = None
        self.singular_values = None
        self.explained_variance_ratio = None

    def partial_fit(self, x: Any) -> "IncrementalPCA":
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"partial_fit needs a (samples, features) array, got shape {x.shape}")
        m, d = x.shape
        k = min(self.n_components, d)
        batch_mean = x.mean(0)
        batch_var = x.var(0)
        n = self.n_seen + m
        if self.n_seen == 0:
            mean, var = batch_mean, batch_var
            stacked = x - batch_mean
        else:
            delta = batch_mean - self.mean
            mean = self.mean + delta * m / n
            var = (self.var * self.n_seen + batch_var * m + delta ** 2 * self.n_seen * m / n) / n
            correction = math.sqrt(self.n_seen * m / n) * (self.mean - batch_mean)
            stacked = np.vstack([self.singular_values[:, None] * self.components, x - batch_mean, correction[None]])
        _, s, vt = np.linalg.svd(stacked, full_matrices=False)
        vt = svd_flip_rows(vt)
        self.components = vt[:k]
        self.singular_values = s[:k]
        self.mean, self.var, self.n_seen = mean, var, n
        total = float(np.sum(var * n))
        self.explained_variance_ratio = s[:k] ** 2 / total if total > 0 else np.zeros(k)
        return self


def svd_flip_rows(vt: np.ndarray) -> np.ndarray:
    """Signs of the rows of ``vt`` so that each row's largest-magnitude entry is positive."""
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), idx])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


def distribute_ranks(ratios: dict[str, np.ndarray], budget: int) -> dict[str, int]:
    """EVA's rank redistribution: the ``budget`` largest explained-variance ratios over all
    layers (ties: earlier layer, earlier component first); each layer's rank is its count."""
    keys = [k for k, r in ratios.items() for _ in range(len(r))]
    values = np.concatenate([np.asarray(r, np.float64) for r in ratios.values()]) if keys else np.zeros(0)
    order = np.argsort(-values, kind="stable")[:budget]
    counts = {k: 0 for k in ratios}
    for i in order:
        counts[keys[i]] += 1
    return counts


@dataclasses.dataclass
class EVAResult:
    """What :func:`eva_init` did: the new rank of each adapted layer (0: adapter removed),
    the explained-variance ratios of its components, the minibatches used and whether every
    layer converged."""

    ranks: dict[str, int]
    explained_variance_ratio: dict[str, np.ndarray]
    steps: int
    converged: bool


@contextlib.contextmanager
def _capture_inputs(layers: dict[int, str], sink: dict[str, np.ndarray]):
    """While active, every call of a LoRALinear in ``layers`` (by id) records its input in
    ``sink`` and runs without its adapter (PEFT's ``disable_adapter``)."""
    original, original_conv = LoRALinear.__call__, LoRAConv.__call__

    def call(self, x, out_sharding=None):
        name = layers.get(id(self))
        if name is not None:
            sink[name] = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        return nnx.Linear.__call__(self, x, out_sharding=out_sharding)

    def call_conv(self, x, out_sharding=None):
        name = layers.get(id(self))
        if name is not None:
            sink[name] = np.asarray(patches(self, x), np.float64)
        y = conv_with(self, x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)

    LoRALinear.__call__, LoRAConv.__call__ = call, call_conv
    try:
        yield
    finally:
        LoRALinear.__call__, LoRAConv.__call__ = original, original_conv


def check_eva_args(rho: Any, tau: Any, max_steps: Any) -> None:
    """ValueError naming a bad rho (< 1 or not finite), tau (outside (0, 1]) or max_steps."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 1:
        raise ValueError(f"eva rho must be a finite number >= 1, got {rho!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"eva tau must be in (0, 1], got {tau!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"eva max_steps must be a positive int, got {max_steps!r}")


def eva_init(model: nnx.Module, batches: Sequence[Any], forward: Callable[[nnx.Module, Any], Any] | None = None, *,
             rho: float = 2.0, tau: float = 0.99, whiten: bool = False, adjust_scaling_factors: bool = True,
             max_steps: int = 1000) -> EVAResult:
    """Initialize the LoRA adapters of ``model`` (made by :func:`apply_lora`, all of one rank
    ``r``) with EVA, in place.

    Args:
      model: a LoRA-adapted model; its adapters are rebuilt with the redistributed ranks
        (same alpha, dropout and base kernel; ``A`` from EVA, ``B = 0``).
      batches: the minibatches (a non-empty sequence, cycled until every layer converges).
      forward: ``forward(model, batch)`` runs the model (default ``model(batch)``).
      rho: each layer keeps ``round(rho * r)`` components, the most a layer can get
        (PEFT's default 2).
      tau: the cosine-similarity threshold of convergence (PEFT's default 0.99).
      whiten: divide each ``A`` column by the square root of its singular value (PEFT's
        ``whiten``).
      adjust_scaling_factors: a layer whose rank moves from ``r`` to ``r_l`` gets
        ``alpha * r_l / r``, keeping its scale ``alpha / r`` (PEFT's default, True); False keeps
        ``alpha``, so the scale becomes ``alpha / r_l``.
      max_steps: at most this many minibatches; when reached before convergence, the current
        components are used and a warning says so.

    Returns:
      :class:`EVAResult`.
    """
    check_eva_args(rho, tau, max_steps)
    if not isinstance(adjust_scaling_factors, bool):
        raise ValueError(f"eva adjust_scaling_factors must be True or False, got {adjust_scaling_factors!r}")
    adapted = adapted_layers(model)
    if not adapted:
        raise ValueError("eva_init needs a LoRA-adapted model (apply_lora first): it has no LoRALinear or LoRAConv layer")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("eva_init needs a non-empty sequence of batches")
    rank_set = {layer.lora_rank for _, layer in adapted}
    if len(rank_set) != 1:
        raise ValueError(f"eva_init needs adapters of one rank (the budget is rank x layers), got ranks {sorted(rank_set)}")
    rank = rank_set.pop()
    forward = forward or (lambda m, b: m(b))
    budget = rank * len(adapted)
    n_comp = round(rank * rho)
    layers = dict(adapted)
    pcas = {name: IncrementalPCA(min(n_comp, *_matrix_shape(layer))) for name, layer in adapted}
    converged = {name: np.zeros(pcas[name].n_components, bool) for name in layers}
    rank_dist = {name: pcas[name].n_components for name in layers}
    steps, done = 0, False
    for batch in itertools.cycle(batches):
        active = [name for name in layers if not converged[name][:rank_dist[name]].all()]
        if not active:
            done = True
            break
        if steps >= max_steps:
            warnings.warn(f"eva_init: layers {active} had not converged (tau={tau}) after max_steps={max_steps} "
                          "batches; their current components are used", stacklevel=2)
            break
        sink: dict[str, np.ndarray] = {}
        with _capture_inputs({id(layers[name]): name for name in active}, sink):
            forward(model, batch)
        steps += 1
        for name in active:
            if name not in sink:
                raise ValueError(f"eva_init: layer {name!r} was not called by forward(model, batch)")
            x, pca = sink[name], pcas[name]
            if x.shape[0] < pca.n_components:  # as PEFT: too few tokens for the components
                continue
            previous = pca.components
            pca.partial_fit(x)
            if previous is not None:
                cos = np.sum(previous * pca.components, 1) / (
                    np.linalg.norm(previous, axis=1) * np.linalg.norm(pca.components, axis=1))
                converged[name] = cos >= tau
        if all(p.components is not None for p in pcas.values()):
            rank_dist = distribute_ranks({name: pcas[name].explained_variance_ratio for name in layers}, budget)
    if any(p.components is None for p in pcas.values()):
        raise ValueError("eva_init: some layers never saw as many tokens in a batch as components "
                         f"({n_comp}); use larger batches")
    _rebuild(model, layers, pcas, rank_dist, whiten, adjust_scaling_factors)
    return EVAResult(ranks=rank_dist, explained_variance_ratio={k: p.explained_variance_ratio for k, p in pcas.items()},
                     steps=steps, converged=done)


def _matrix_shape(layer) -> tuple[int, int]:
    """The (in, out) of the matrix an adapter corrects: a conv's is ``(kh kw c_in, c_out)``."""
    return layer.lora.lora_a.shape[0], layer.lora.lora_b.shape[1]


def _rebuild(model, layers, pcas, rank_dist, whiten, adjust_scaling_factors):
    for path, parent, key, layer in _parents(model, layers):
        r = rank_dist[path]
        if isinstance(layer, LoRAConv):
            base = nnx.Conv(layer.in_features, layer.out_features, layer.kernel_size, strides=layer.strides,
                            padding=layer.padding, input_dilation=layer.input_dilation,
                            kernel_dilation=layer.kernel_dilation, use_bias=layer.bias is not None,
                            dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                            rngs=nnx.Rngs(0))
        else:
            base = nnx.Linear(layer.in_features, layer.out_features, use_bias=layer.bias is not None,
                              dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                              rngs=nnx.Rngs(0))
        base.kernel[...] = layer.kernel[...]
        if layer.bias is not None:
            base.bias[...] = layer.bias[...]
        if r == 0:
            new = base
        else:
            make = LoRAConv.from_conv if isinstance(layer, LoRAConv) else LoRALinear.from_linear
            alpha = layer.alpha * r / layer.lora_rank if adjust_scaling_factors and r != layer.lora_rank else layer.alpha
            new = make(base, rank=r, alpha=alpha, dropout=layer.lora_dropout.rate, rngs=nnx.Rngs(0))
            a = pcas[path].components[:r].copy()
            if whiten:
                a = a / np.sqrt(pcas[path].singular_values[:r])[:, None]
            new.lora.lora_a[...] = jnp.asarray(a.T, new.lora.lora_a[...].dtype)
            new.lora.lora_b[...] = jnp.zeros_like(new.lora.lora_b[...])
        if isinstance(key, int):
            parent[key] = new
        else:
            setattr(parent, key, new)


def _parents(model, layers):
    from jaxopt_lab.finetune.lora import path_str

    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (LoRALinear, LoRAConv)) and path_str(path) in layers:
            parent = model
            for key in path[:-1]:
                parent = parent[key] if isinstance(key, int) else getattr(parent, key)
            out.append((path_str(path), parent, path[-1], node))
    return out

