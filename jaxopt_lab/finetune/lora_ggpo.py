r"""LoRA-GGPO: gradient- and weight-norm-guided random perturbation of the adapted weights.

Chang, Guo, Chang & Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
Gradient-Guided Perturbation Optimization" (arXiv:2502.14538v1, 2025).

**Source of the formula.** Neither the official code nor the paper's equations could be read
here: github.com/llm172/LoRA-GGPO has no snapshot in the code index (and its public page now
hosts the paper's later version, LoRA-MGPO, arXiv:2502.14538v2), and the stored copies of the
paper give only its abstract. The rule below is therefore the one of the only public
implementation found, the port in kohya-ss's sd-scripts (PR #1974, ``networks/lora_flux.py``:
``LoRAModule.update_norms``, ``update_grad_norms``, ``forward``; its train loop calls both
after ``backward`` and before ``optimizer.step``), which its author wrote from the v1 paper.
With the default arguments this module computes what that port computes, except for the
weight norm (below). It is unverified against the authors' code.

Like Flat-LoRA, GGPO trains the adapters at a randomly perturbed point of the merged weight
``W' = W + s A B`` (``s = alpha / rank``): the forward pass uses ``W' + ε`` with, for each output
unit ``j`` (a row of PyTorch's ``W'`` (out x in), a column of flax's kernel (in x out))::

    ε[:, j] ~ N(0, std_j² I),   std_j = (σ ‖W'_t[:, j]‖ + β ‖G_t[:, j]‖^p) / √n,

with, as in sd-scripts:

* ``G_t = s (A_t g_B + g_A B_t)`` the low-rank equivalent gradient of step ``t`` (flax
  orientation; sd-scripts' ``approx_grad``), its column norm the "gradient guidance";
* ``p = grad_power = 2``: sd-scripts' ``ggpo_beta * grad_norms**2`` (``grad_power=1`` gives
  ``β ‖G_j‖``, the same units as the weight term);
* ``n`` = the number of output units (``norm_dim="out"``: sd-scripts'
  ``1 / sqrt(weight.shape[0])``); ``norm_dim="in"`` divides by √(input dim) instead, Flat-LoRA's
  normalisation ``σ²/n ‖W'_{i,:}‖²`` with ``n`` the row length;
* ``W'_t`` and ``G_t`` both of step ``t``, *before* its update (sd-scripts calls
  ``update_norms`` and ``update_grad_norms`` before ``optimizer.step``); ``ε`` perturbs the
  forward passes of step ``t + 1``, so one forward and one backward per step, no SAM-style
  second pass;
* the noise ``N(0, 1)`` drawn afresh every step (sd-scripts draws it in every forward), never
  stored, and kept out of the gradient's path (it moves the layer's output, so the adapters'
  gradients are those at the perturbed point, as with sd-scripts' ``x @ perturbation.T``).

**Departure, weight norm.** Here ``‖W'_t[:, j]‖`` is the exact norm of column ``j`` of the clean
merged kernel ``W + s A_t B_t``. sd-scripts approximates it by
``√(w̄² + ‖(B A)_j‖²)``, ``w̄`` the mean row norm of ``W`` over a random sample of rows,
and (``module_weights.mul(self.scale)`` is not in place) without the scale ``s``: a memory
saving the paper's ``‖W'_{i,:}‖`` does not have, so the exact norm is used.

As an optax transformation (no change to the model or the training loop), the perturbation
is carried by the frozen base kernel: the step moves it by ``ε_{t+1} - ε_t``, so the
parameters the next forward pass sees are ``W + ε_{t+1} + s A B``. ``ε_t`` is regenerated from
the state (its per-unit scales and the step's key), never stored. Consequences: the base
kernel equals ``W`` again only up to float rounding once a perturbation is removed (a few ulps
over a run); the parameters a run evaluates and checkpoints hold the current perturbation —
:func:`remove_perturbation` gives the clean ones.

``inner`` updates every leaf (in a fine-tuning config it is the method wrapped by
:func:`jaxopt_lab.finetune.freeze_base`, so the kernels get zero from it and only the
perturbation moves them). Adapters are found by path (``.../lora/lora_a``, ``lora_b``,
``.../kernel``). A conv kernel (:class:`~jaxopt_lab.finetune.LoRAConv`) is perturbed as its
``(kh kw c_in) x c_out`` matrix, the matrix its adapter corrects: one ``std_j`` per output channel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.finetune.lora import flatten_with_paths, lora_pairs
from jaxopt_lab.transforms import _validation as check

NORM_DIMS = ("out", "in")


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


def _as_matrix(kernel: jax.Array) -> jax.Array:
    """A kernel as the matrix its adapter corrects: a Linear's (in x out) as is, a conv's
    ``(kh, kw, c_in, c_out)`` as ``(kh kw c_in) x c_out`` (:class:`~jaxopt_lab.finetune.LoRAConv`'s view)."""
    return kernel.reshape(-1, kernel.shape[-1])


def _noise(seed: int, count: jax.Array, k: int, shape, dtype) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), count), k)
    return jax.random.normal(key, shape, dtype)


def perturbation_scales(a, b, ga, gb, w, scale, sigma, beta, norm_dim="out", grad_power=2):
    r"""The per-output-unit ``std`` of the perturbation::

        std_j = (σ ‖w[:, j]‖ + β ‖G[:, j]‖^p) / √n,   G = s (a g_b + g_a b),

    in flax orientation: ``a`` (in x r), ``b`` (r x out), ``w`` the clean merged kernel
    ``W + s a b`` (in x out), ``ga``/``gb`` the factors' gradients, ``p = grad_power``, ``n`` the
    output (``norm_dim="out"``) or input (``"in"``) dimension."""
    g = scale * (a @ gb + ga @ b)
    n = w.shape[1] if norm_dim == "out" else w.shape[0]
    return (sigma * jnp.linalg.norm(w, axis=0) + beta * jnp.linalg.norm(g, axis=0) ** grad_power) / math.sqrt(n)


def lora_ggpo(inner: optax.GradientTransformation, sigma: float = 0.03, beta: float = 0.01, scale: float = 2.0,
              seed: int = 0, norm_dim: str = "out", grad_power: float = 2) -> optax.GradientTransformation:
    r"""LoRA-GGPO around ``inner`` (see the module docstring): after ``inner``'s update, the base
    kernel of every adapter moves from ``W + ε_t`` to ``W + ε_{t+1}``, with
    ``ε_{t+1}[:, j] = std_j ξ_j``, ``ξ ~ N(0, I)`` fresh each step and
    ``std_j = (σ ‖(W + s A_t B_t)[:, j]‖ + β ‖s (A_t g_B + g_A B_t)[:, j]‖^p) / √n``
    (:func:`perturbation_scales`, of the step's pre-update factors and gradients).

    Args:
      inner: the method that updates the parameters (adapters trained, base frozen).
      sigma: the weight-norm coefficient σ (sd-scripts' ``ggpo_sigma``; 0.03 its documented value).
      beta: the gradient-norm coefficient β (``ggpo_beta``; 0.01).
      scale: the adapters' ``alpha / rank``.
      seed: the perturbations' random stream.
      norm_dim: ``"out"`` (divide by √(output dim), sd-scripts) or ``"in"`` (√(input dim), Flat-LoRA).
      grad_power: ``p > 0``, the power of the gradient norm: 2 (sd-scripts) or 1 (the weight term's units).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.number("sigma", sigma, lambda v: v >= 0, ">= 0")
    check.number("beta", beta, lambda v: v >= 0, ">= 0")
    check.number("scale", scale, lambda v: v > 0, "a number > 0 (alpha / rank)")
    seed = check.static_int("seed", seed, 0)
    if norm_dim not in NORM_DIMS:
        raise ValueError(f"norm_dim must be one of {NORM_DIMS}, got {norm_dim!r}")
    check.number("grad_power", grad_power, lambda v: v > 0, "a number > 0 (2: sd-scripts, 1: the weight term's units)")

    def init_fn(params):
        _, leaves, _, pairs = _pairs_with_kernels(params)
        std = tuple(jnp.zeros((leaves[p.kernel].shape[-1],), _wide(leaves[p.kernel].dtype)) for p in pairs)
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
            kernel = _as_matrix(values[p.kernel]).astype(dt)  # a conv kernel as its (kh kw c_in) x c_out matrix
            old = state.std[k][None, :] * _noise(seed, state.count, k, kernel.shape, dt)
            clean = kernel - old + scale * (values[p.a].astype(dt) @ values[p.b].astype(dt))  # W + s A_t B_t
            s = perturbation_scales(values[p.a].astype(dt), values[p.b].astype(dt), grads[p.a].astype(dt),
                                    grads[p.b].astype(dt), clean, scale, sigma, beta, norm_dim, grad_power)
            new = s[None, :] * _noise(seed, count, k, kernel.shape, dt)
            shape = out[p.kernel].shape
            out[p.kernel] = (out[p.kernel].astype(dt) + (new - old).reshape(shape)).astype(out[p.kernel].dtype)
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
        eps = state.std[k][None, :] * _noise(seed, state.count, k, _as_matrix(kernel).shape, dt)
        out[p.kernel] = (kernel.astype(dt) - eps.reshape(kernel.shape)).astype(kernel.dtype)
    return jax.tree.unflatten(treedef, out)
