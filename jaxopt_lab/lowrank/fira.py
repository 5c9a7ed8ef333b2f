"""Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?
(Chen et al., 2024).

GaLore's low-rank update plus the residual of the gradient outside the
projection, rescaled by how much the low-rank optimizer rescales each channel
(norm-based scaling), with a norm-growth limiter. For a projected matrix
(oriented d × k, R = PᵀG, N = inner(R)):

    φ_j  = ‖N_{:,j}‖ / (‖R_{:,j}‖ + 1e-8)              (one factor per kept column j)
    S_t  = (G − α P R) · diag(φ)                     (the scaled residual)
    S_t ← S_t / (max(‖S_t‖ / (‖S_{t−1}‖ + 1e-8), γ) / γ)   (limiter, γ = 1.01, from step 2)
    ΔW_t = α · P N + S_t

As in the official code, the limiter compares ‖S_t‖ with the previous step's
limited norm (stored in the state), the first step stores its norm unlimited,
even a zero one (after a first step with an exactly zero gradient, e.g. behind
a zero-initialized layer, the residual is held near γ·1e-8 and grows by at
most γ per step, as in the official ``FiraAdamW``), and the residual uses the
same α as the projected update (α = 1 by default, the official value). With a full-rank
projector the residual is zero and Fira equals GaLore.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
import optax

from jaxopt_lab.kernels.lowrank_step_reference import NO_PREVIOUS_NORM, norm_growth_limiter
from jaxopt_lab.lowrank._adam import scale_by_adam_bias_correction, scale_by_adam_moments
from jaxopt_lab.lowrank._fused import fira_fused_finish, fused_impl, fused_prepare
from jaxopt_lab.lowrank._projected import scale_by_projected
from jaxopt_lab.lowrank._weight_decay import decay_updated_weights
from jaxopt_lab.transforms import _validation as check


class FiraLimiterState(NamedTuple):
    previous_norm: jnp.ndarray  # ‖S_{t−1}‖ after limiting; NO_PREVIOUS_NORM (−1) before the first step


def init_limiter_state(spec=None) -> FiraLimiterState:
    """The limiter's state before the first step (no previous norm: the first step is not limited)."""
    del spec
    return FiraLimiterState(jnp.full([], NO_PREVIOUS_NORM, jnp.float32))


def _fira_finish(scale: float, growth_limit: float):
    def finish(spec, pstate, g, low, direction, extra, count):
        del count
        back = spec.project_back(pstate, direction)
        phi = jnp.linalg.norm(direction, axis=0) / (jnp.linalg.norm(low, axis=0) + 1e-8)
        residual = (g - scale * spec.project_back(pstate, low)) * phi[None, :]
        norm = jnp.linalg.norm(residual)
        limiter = norm_growth_limiter(norm, extra.previous_norm, growth_limit)
        return scale * back + residual / limiter, FiraLimiterState(norm / limiter)

    return finish


def scale_by_fira(
    rank: int | float = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    growth_limit: float = 1.01,
    inner: Optional[optax.GradientTransformation] = None,
    projector: Any = "svd",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
    fused: bool | str = "reference",
) -> optax.GradientTransformation:
    """Fira's direction α·P·N + limited φ-scaled residual; arguments as :func:`scale_by_galore`.

    Args:
      growth_limit: γ of the norm-growth limiter (> 1; the paper uses 1.01).
      fused: how the update is computed, all the same numbers to float32
        rounding (tested, and against the official ``fira`` package).
        ``"reference"`` (default): two passes over G in XLA, R = PᵀG with the
        column norms, then U = P·M + G·diag(s) (two matmuls, U written once;
        ‖S‖ by an identity, or from the residual when the gradient lies almost
        inside the projection, see ``kernels.lowrank_step_reference.fira_combine``);
        the fastest measured on CPU and on an H200 (BENCHMARKS.md).
        ``False``: the residual S formed explicitly (a third matmul, P·R, and a
        full write of S), as the official code. ``True`` or another ``impl``
        name: the same two passes through the Pallas kernels on GPU/TPU
        (as :func:`~jaxopt_lab.lowrank.scale_by_galore`).
    """
    check.positive("scale", scale)
    check.require("growth_limit", growth_limit, lambda v: v > 1, "> 1")
    hooks = {"finish": _fira_finish(scale, growth_limit)}
    if fused is not False:
        impl = fused_impl(fused)
        hooks = {"finish": fira_fused_finish(scale, growth_limit, impl, FiraLimiterState), "prepare": fused_prepare(impl)}
    return scale_by_projected(
        inner=optax.scale_by_adam() if inner is None else inner,
        rank=rank, update_proj_gap=update_proj_gap, projector=projector, side=side,
        label_fn=label_fn, stagger=stagger, seed=seed,
        init_extra=init_limiter_state, **hooks,
    )


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    growth_limit: float = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projector: Any = "svd",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
    fused: bool | str = "reference",
) -> optax.GradientTransformation:
    """Fira-AdamW: :func:`scale_by_fira` over Adam, learning rate, then decoupled weight decay.

    As the official ``FiraAdamW``, the weights are decayed *after* the Adam step:
    ``W ← (1 − lr·λ)(W − lr·U)`` (see
    :func:`~jaxopt_lab.lowrank._weight_decay.decay_updated_weights`).

    Under ``optax.inject_hyperparams`` list the int arguments ``rank``,
    ``update_proj_gap`` and ``seed`` in ``static_args`` (they fix shapes and
    keys; a JAX array there is refused with that hint).
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)
    check.non_negative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_fira(rank, update_proj_gap, scale, growth_limit, scale_by_adam_moments(b1, b2, eps), projector, side,
                      label_fn, stagger, seed, fused),
        scale_by_adam_bias_correction(b1, b2),
        optax.scale_by_learning_rate(learning_rate),
        decay_updated_weights(learning_rate, weight_decay),
    )
