"""APOLLO: SGD-like Memory, AdamW-level Performance (Zhu et al., 2024,
https://arxiv.org/abs/2412.05270).

APOLLO keeps Adam's moments only in a low-rank space reached by a *random*
projection, and uses them for one thing: to estimate how much Adam would
rescale each channel of the gradient. The full gradient, scaled channel by
channel, is the update. For a projected matrix (oriented d × k, d the
projected side; P a d × r Gaussian matrix with N(0, 1/r) entries, redrawn
every T steps):

    R   = Pᵀ G                                          (r × k)
    N   = m / (√v + ε),  m, v Adam's moments of R        (r × k, no bias correction)
    s_j = ‖N_{:,j}‖ / (‖R_{:,j}‖ + 1e-8)                 (channel-wise; one factor per column j)
    S_t = G · diag(s)                                   (the FULL gradient, scaled)
    S_t ← S_t / (max(‖S_t‖ / (‖S_{t−1}‖ + 1e-8), γ) / γ)   (Fira's norm-growth limiter, γ = 1.01)
    ΔW  = √α · S_t

and, as for every method of the official Adam split, the bias correction
``√(1 − β₂ᵗ) / (1 − β₁ᵗ)`` multiplies the learning rate, and weight decay is
decoupled and, as in the official ``APOLLOAdamW``, applied to the updated
weights: ``W ← (1 − lr·λ)(W − lr·b_t·ΔW)``. APOLLO-Mini (:func:`apollo_mini`)
uses rank 1 and one tensor-wise factor ``s = ‖N‖ / (‖R‖ + 1e-8)`` with α = 128.

As in the official code: the channel norms are taken over the rank axis (one
factor per non-projected channel), the limiter compares with the previous
step's limited norm (the first step's stored unlimited, even a zero one), the update is multiplied by √α (``scale``), Adam's
moments are kept across projection refreshes, ε = 1e-6, T = 200. Parameters
that are not projected get plain Adam (same split).

Only the key of P is stored (see
:func:`~jaxopt_lab.lowrank.random_projector`), so a projected matrix's state
is 2·r·k floats plus a key and one float for the limiter.

The one thing that cannot be the official code's: the random stream. The
official ``GradientProjector`` draws P with a torch ``Generator`` seeded with
the parameter's 1-based index in the optimizer, advanced by ``next_seed`` at
each refresh; here P comes from a JAX key folded from ``seed``, the matrix's
position and the step. Same distribution (i.i.d. N(0, 1/r), P of d × r, d the
projected side: ``(m, r)`` for a wide matrix, ``(r, n)`` transposed for a tall
one), different draws.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import optax

from jaxopt_lab.kernels.lowrank_step_reference import norm_growth_limiter
from jaxopt_lab.lowrank._adam import scale_by_adam_bias_correction, scale_by_adam_moments
from jaxopt_lab.lowrank._projected import scale_by_projected
from jaxopt_lab.lowrank._weight_decay import decay_updated_weights
from jaxopt_lab.lowrank.fira import FiraLimiterState, init_limiter_state
from jaxopt_lab.transforms import _validation as check

SCALE_TYPES = ("channel", "tensor")


def _apollo_finish(scale, scale_type: str, growth_limit: float):
    def finish(spec, pstate, g, low, direction, extra, count):
        del spec, pstate, count
        if scale_type == "channel":
            factor = jnp.linalg.norm(direction, axis=0) / (jnp.linalg.norm(low, axis=0) + 1e-8)
            scaled = g * factor[None, :]
        else:
            scaled = g * (jnp.linalg.norm(direction) / (jnp.linalg.norm(low) + 1e-8))
        norm = jnp.linalg.norm(scaled)
        limiter = norm_growth_limiter(norm, extra.previous_norm, growth_limit)
        return jnp.sqrt(scale) * scaled / limiter, FiraLimiterState(norm / limiter)

    return finish


def scale_by_apollo(
    rank: int | float = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    growth_limit: float = 1.01,
    inner: Optional[optax.GradientTransformation] = None,
    projector: Any = "random",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
) -> optax.GradientTransformation:
    """APOLLO's direction: the full gradient scaled by low-rank Adam's channel factors, limited.

    Args:
      rank: rank r of the auxiliary space, an int or a fraction of the
        smaller dimension in (0, 1]. With the random projector an int rank
        is used as given, also above the projected dimension (a d × r
        Gaussian P, as the official code draws it: rank 256 on a 64 × 256
        matrix keeps 256 × 256 moments); with a basis projector (``"svd"``)
        it is capped at min(m, n).
      update_proj_gap: refresh period T of the random projection.
      scale: α; the update is multiplied by √α (official code).
      scale_type: ``"channel"`` (one factor per column of the oriented
        gradient, APOLLO) or ``"tensor"`` (one factor per matrix, APOLLO-Mini).
      growth_limit: γ of the norm-growth limiter (> 1; 1.01 as Fira).
      inner: the optimizer run on the low-rank gradients (and on every
        non-projected parameter); ``optax.scale_by_adam()`` by default.
        The scaling factors are computed from its output.
      projector: ``"random"`` (APOLLO) by default; any projector works (e.g.
        ``"svd"``, the paper's ablation).
      side, label_fn, stagger, seed: as :func:`~jaxopt_lab.lowrank.scale_by_galore`.
    """
    check.positive("scale", scale)
    check.require("growth_limit", growth_limit, lambda v: v > 1, "> 1")
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    return scale_by_projected(
        inner=optax.scale_by_adam() if inner is None else inner,
        rank=rank, update_proj_gap=update_proj_gap, projector=projector, side=side,
        label_fn=label_fn, stagger=stagger, seed=seed, finish=_apollo_finish(scale, scale_type, growth_limit),
        init_extra=init_limiter_state,
    )


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projector: Any = "random",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
) -> optax.GradientTransformation:
    """APOLLO-AdamW: :func:`scale_by_apollo` over Adam moments, bias correction, lr, then decoupled weight decay.

    ``W ← (1 − lr·λ) · (W − lr · √(1 − β₂ᵗ)/(1 − β₁ᵗ) · √α · limit(G · diag(s)))``: as the
    official ``APOLLOAdamW``, the weights are decayed *after* the step (see
    :func:`~jaxopt_lab.lowrank._weight_decay.decay_updated_weights`); see the module docstring.

    Under ``optax.inject_hyperparams`` list the int arguments ``rank``,
    ``update_proj_gap`` and ``seed`` in ``static_args`` (they fix shapes and
    keys; a JAX array there is refused with that hint).
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)
    check.non_negative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_apollo(rank, update_proj_gap, scale, scale_type, growth_limit, scale_by_adam_moments(b1, b2, eps),
                        projector, side, label_fn, stagger, seed),
        scale_by_adam_bias_correction(b1, b2),
        optax.scale_by_learning_rate(learning_rate),
        decay_updated_weights(learning_rate, weight_decay),
    )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projector: Any = "random",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
) -> optax.GradientTransformation:
    """APOLLO-Mini: :func:`apollo` at rank 1 with one tensor-wise factor and α = 128 (update × √128).

    The auxiliary state of a projected d × k matrix is 2·k floats: SGD-like memory. Under
    ``optax.inject_hyperparams`` list ``update_proj_gap`` and ``seed`` in ``static_args``.
    """
    return apollo(learning_rate, 1, update_proj_gap, scale, "tensor", growth_limit, b1, b2, eps, weight_decay,
                  projector, side, label_fn, stagger, seed)
