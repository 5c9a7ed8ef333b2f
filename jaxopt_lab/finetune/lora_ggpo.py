r"""LoRA-GGPO: gradient- and weight-norm-guided random perturbation of the adapted weights.

Chang, Guo, Chang & Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
Gradient-Guided Perturbation Optimization" (arXiv:2502.14538v1, 2025). Its code
(github.com/llm172/LoRA-GGPO) cannot be read from here (the repository now holds the
paper's later version, LoRA-MGPO); the rule below follows the public port in kohya-ss's
sd-scripts (``networks/lora_flux.py``: ``update_norms``, ``update_grad_norms`` and the
forward's perturbation), which its authors wrote from the paper.

Like Flat-LoRA, GGPO trains the adapters at a randomly perturbed point of the *merged*
weight ``W' = W + s A B``: the forward pass uses ``W' + ε`` with, for each output unit ``j``
(a row of the paper's ``W'`` (out x in), a column of flax's kernel (in x out))::

    ε[:, j] ~ N(0, std_j² I),   std_j = (σ ‖W'[:, j]‖ + β ‖G[:, j]‖) / √n,

where ``G = s (A g_B + g_A B)`` is the low-rank equivalent gradient (its norm is the
"gradient guidance"), ``n`` the input dimension (``norm_dim="in"``, Flat-LoRA's row-size
normalisation; sd-scripts divides by √out: ``norm_dim="out"``). One forward and one backward
per step, no SAM-style second pass: the scales come from the previous step's gradient and
weights, the noise is drawn fresh each step. (sd-scripts approximates ‖W'[:, j]‖ by
√(mean row norm of W)² + ‖ΔW[:, j]‖²) and forgets the scale s there; here the norm is exact.)

As an optax transformation (no change to the model or the training loop), the perturbation
is carried by the frozen base kernel: the step moves it by ``ε_{t+1} - ε_t``, so the
parameters the next forward pass sees are ``W + ε_{t+1} + s A B``, and the gradients of A and
B are those at the perturbed point. ``ε_t`` is regenerated from the state (its per-unit
scales and the step's key), never stored. Consequences: the base kernel equals ``W`` again
only up to float rounding once a perturbation is removed (a few ulps over a run); the
parameters a run evaluates and checkpoints hold the current perturbation —
:func:`remove_perturbation` gives the clean ones.

``inner`` updates every leaf (in a fine-tuning config it is the method wrapped by
:func:`jaxopt_lab.finetune.freeze_base`, so the kernels get zero from it and only the
perturbation moves them). Adapters are found by path (``.../lora/lora_a``, ``lora_b``,
``.../kernel``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.finetune.lora import flatten_with_paths, lora_pairs
from jaxopt_lab.transforms import _validation as check

NORM_DIMS = ("in", "out")


class LoRAGGPOState(NamedTuple):
    """``count``: steps taken; ``std``: per adapter, the per-output-unit scale of the perturbation
    the parameters hold now (zeros before the first step); ``inner``: the inner method's state."""

    count: jax.Array
    std: tuple
    inner: optax.OptState


def _wide(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _pairs_with_kernels(tree):
    paths, leaves, treedef = flatten_with_paths(tree)
    pairs = lora_pairs(paths)
    for p in pairs:
        if p.kernel is None:
            raise ValueError(f"lora_ggpo perturbs the base kernel of adapter {p.prefix!r}, but the tree has no "
                             f"{p.prefix}/kernel: put lora_ggpo outside freeze_base (around the frozen method)")
    return paths, leaves, treedef, pairs


def _noise(seed: int, count: jax.Array, k: int, shape, dtype) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), count), k)
    return jax.random.normal(key, shape, dtype)


def perturbation_scales(a, b, ga, gb, w, scale, sigma, beta, norm_dim="in"):
    """The per-output-unit ``std`` (flax orientation: ``a`` (in x r), ``b`` (r x out), ``w`` the
    unperturbed merged kernel ``W + s A B`` (in x out), ``ga``/``gb`` the factors' gradients)."""
    g = scale * (a @ gb + ga @ b)
    n = w.shape[0] if norm_dim == "in" else w.shape[1]
    return (sigma * jnp.linalg.norm(w, axis=0) + beta * jnp.linalg.norm(g, axis=0)) / math.sqrt(n)


def lora_ggpo(inner: optax.GradientTransformation, sigma: float = 0.03, beta: float = 0.01, scale: float = 2.0,
              seed: int = 0, norm_dim: str = "in") -> optax.GradientTransformation:
    """LoRA-GGPO around ``inner`` (see the module docstring).

    Args:
      inner: the method that updates the parameters (adapters trained, base frozen).
      sigma: the weight-norm coefficient (sd-scripts' ``ggpo_sigma``; 0.03 its documented value).
      beta: the gradient-norm coefficient (``ggpo_beta``; 0.01).
      scale: the adapters' ``alpha / rank``.
      seed: the perturbations' random stream.
      norm_dim: ``"in"`` (divide by √(input dim), Flat-LoRA) or ``"out"`` (sd-scripts).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.number("sigma", sigma, lambda v: v >= 0, ">= 0")
    check.number("beta", beta, lambda v: v >= 0, ">= 0")
    check.number("scale", scale, lambda v: v > 0, "a number > 0 (alpha / rank)")
    seed = check.static_int("seed", seed, 0)
    if norm_dim not in NORM_DIMS:
        raise ValueError(f"norm_dim must be one of {NORM_DIMS}, got {norm_dim!r}")

    def init_fn(params):
        _, leaves, _, pairs = _pairs_with_kernels(params)
        std = tuple(jnp.zeros((leaves[p.kernel].shape[1],), _wide(leaves[p.kernel].dtype)) for p in pairs)
        return LoRAGGPOState(jnp.zeros([], jnp.int32), std, inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("lora_ggpo needs params: call update(grads, state, params)")
        _, grads, treedef, pairs = _pairs_with_kernels(updates)
        values = jax.tree.leaves(params)
        new_updates, inner_state = inner.update(updates, state.inner, params, **extra)
        out = jax.tree.leaves(new_updates)
        count = state.count + 1
        std = []
        for k, p in enumerate(pairs):
            dt = _wide(values[p.kernel].dtype)
            kernel = values[p.kernel].astype(dt)
            old = state.std[k][None, :] * _noise(seed, state.count, k, kernel.shape, dt)
            a1 = (values[p.a] + out[p.a]).astype(dt)
            b1 = (values[p.b] + out[p.b]).astype(dt)
            kernel_next = kernel - old + out[p.kernel].astype(dt)  # the clean kernel after this step
            s = perturbation_scales(values[p.a].astype(dt), values[p.b].astype(dt), grads[p.a].astype(dt),
                                    grads[p.b].astype(dt), kernel_next + scale * (a1 @ b1), scale, sigma, beta, norm_dim)
            new = s[None, :] * _noise(seed, count, k, kernel.shape, dt)
            out[p.kernel] = (out[p.kernel].astype(dt) + (new - old)).astype(out[p.kernel].dtype)
            std.append(s.astype(state.std[k].dtype))
        return jax.tree.unflatten(treedef, out), LoRAGGPOState(count, tuple(std), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


lora_ggpo.perturbs_frozen_base = True  # an experiment config freezes its inner method, not it


def remove_perturbation(params, state: LoRAGGPOState, seed: int = 0):
    """``params`` without the perturbation ``state`` says they hold (the clean base kernels,
    up to float rounding): for evaluating or merging a GGPO run. ``seed`` as given to :func:`lora_ggpo`."""
    _, leaves, treedef, pairs = _pairs_with_kernels(params)
    out = list(leaves)
    for k, p in enumerate(pairs):
        kernel = leaves[p.kernel]
        dt = _wide(kernel.dtype)
        eps = state.std[k][None, :] * _noise(seed, state.count, k, kernel.shape, dt)
        out[p.kernel] = (kernel.astype(dt) - eps).astype(kernel.dtype)
    return jax.tree.unflatten(treedef, out)
