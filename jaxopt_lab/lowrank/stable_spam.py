"""Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
(Huang et al., 2025, https://arxiv.org/abs/2502.17055).

Adam with three stabilizers, each applied per parameter tensor (every leaf of
the tree, matrices and vectors alike), at step t = 1, 2, ...:

1. **Adaptive spike clipping (AdaClip).** An EMA of the largest gradient
   magnitude sets the clipping threshold; spiked entries are scaled down::

       m_max ← θ m_max + (1 − θ) max|g|,        m̂_max = m_max / (1 − θᵗ)
       g_i   ← g_i · m̂_max / max|g|     where |g_i| > m̂_max

2. **Adaptive gradient-norm scaling (AdaGN).** EMAs of the gradient's norm
   and squared norm rescale the whole (clipped) gradient::

       m_n ← γ₁ m_n + (1 − γ₁) ‖g‖,   v_n ← γ₂ v_n + (1 − γ₂) ‖g‖²
       g   ← g / ‖g‖ · m̂_n / (√v̂_n + ε),   m̂_n = m_n / (1 − γ₁ᵗ),  v̂_n = v_n / (1 − γ₂ᵗ)

   (t in these bias corrections is the global step until the first momentum
   reset; after it, it depends on ``reset_mode``, below.)

3. **Momentum reset (MoRet, from SPAM).** Every ΔT steps (t ≡ 0 mod ΔT)
   Adam's moments are reset and its bias-correction counter τ restarts.

Defaults are the official code's (``TianjinYellow/StableSPAM``,
``galore_torch/stablespam.py``): θ = 0.999, γ₁ = 0.7, γ₂ = 0.9, ΔT = 1000,
β = (0.9, 0.999), ε = 1e-8 (the same ε in AdaGN and Adam), decoupled weight
decay ``W ← W(1 − lr λ) − lr u``.

**The reset, as released** (``reset_mode="official"``, the default). One
counter c per tensor drives AdaClip's, AdaGN's and Adam's bias corrections
(c = t until the first reset). At a reset step the official code bumps c,
runs AdaClip and AdaGN with it, then sets c = 1 and swaps fresh zero moments
into its state *after* taking its local handles on the old ones, so::

    reset step:  m' = β₁ m + (1 − β₁) g,  v' = β₂ v + (1 − β₂) g²   (old moments)
                 u  = (m' / (1 − β₁)) / (√(v' / (1 − β₂)) + ε)      (τ = 1)
                 stored: m = v = 0, c = 1
    next steps:  c = 2, 3, ...  for AdaClip, AdaGN and Adam alike

The reset step is therefore damped (old moments divided by the step-1 bias
corrections: about 0.32× a normal step at β = (0.9, 0.999)), the fresh
moments start one step later and are bias-corrected as if they held one more
gradient than they do, and right after a reset AdaClip's threshold is divided
by 1 − θ² ≈ 0.002, which switches spike clipping off for a while.

``reset_mode="paper"`` follows the paper's equations instead: AdaClip and
AdaGN are bias-corrected with the global step t (clipping stays on through a
reset), and at a reset step the moments restart from zero with that step's
gradient, τ = 1 (an undamped step from fresh moments)::

    m ← (1 − β₁) g,  v ← (1 − β₂) g²,  u = (m / (1 − β₁^τ)) / (√(v / (1 − β₂^τ)) + ε)

It is more robust to a spike that lands just after a reset. The two modes
agree to float precision before the first reset.

**The cosine decay of γ₁ and β₁** (the official ``total_T``, ``eta_min``;
``total_steps``, ``eta_min`` here): off by default, as in the official
constructor (its training scripts set ``total_T`` = 20000). At global step t
both are multiplied by the official ``CosineAnnealingLR(1.0, T_max = total_T + 1,
eta_min)`` factor

    s_t = eta_min + (1 − eta_min) · (1 + cos(π t / (total_T + 1))) / 2,

in the EMA and in its bias correction alike (``1 − (s_t γ₁)^c``,
``1 − (s_t β₁)^τ``), as the official code does; past ``total_T`` the factor
rises again (the closed form is periodic), also as there.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.lowrank._adam import moment_dtype
from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms._numerics import abs_sq

RESET_MODES = ("official", "paper")


class ScaleByStableSpamState(NamedTuple):
    """State of :func:`scale_by_stable_spam`.

    Attributes:
      count: steps taken (int32), t − 1.
      adam_count: the bias-correction counter after the last step (int32): the
        official code's ``state["step"]`` (``reset_mode="official"``), or the
        steps since the last reset, τ (``reset_mode="paper"``).
      max_ema: per leaf, the EMA m_max of max|g| (float32 scalar).
      norm_ema: per leaf, the EMA m_n of ‖g‖.
      norm_sq_ema: per leaf, the EMA v_n of ‖g‖².
      mu: Adam's first moment.
      nu: Adam's second moment.
    """

    count: jax.Array
    adam_count: jax.Array
    max_ema: optax.Updates
    norm_ema: optax.Updates
    norm_sq_ema: optax.Updates
    mu: optax.Updates
    nu: optax.Updates


def scale_by_stable_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    theta: float = 0.999,
    reset_interval: Optional[int] = 1000,
    reset_mode: str = "official",
    total_steps: Optional[int] = None,
    eta_min: float = 0.5,
) -> optax.GradientTransformation:
    """Stable-SPAM's direction: AdaClip, AdaGN, then Adam with periodic moment reset.

    Args:
      b1, b2: Adam's decay rates.
      eps: ε of Adam's denominator and of AdaGN's ``√v̂_n + ε``.
      gamma1: γ₁, decay of the EMA of the gradient norm (in [0, 1)).
      gamma2: γ₂, decay of the EMA of the squared gradient norm (in [0, 1)).
      theta: θ, decay of the EMA of max|g| (in [0, 1)).
      reset_interval: ΔT, an int > 0: Adam's moments are reset at steps ΔT,
        2ΔT, ...; None never resets. Static: list it in ``static_args``
        under ``optax.inject_hyperparams``.
      reset_mode: ``"official"`` (default: the released code's reset, see the
        module docstring) or ``"paper"`` (the paper's equations: AdaClip and
        AdaGN keep the global step, moments restart with the reset step's
        gradient; spike clipping stays on through a reset).
      total_steps: the official ``total_T``, an int > 0: γ₁ and β₁ are scaled
        by a cosine from 1 down to ``eta_min`` over this many steps (module
        docstring); None (default, as the official constructor) keeps them.
        Static under ``optax.inject_hyperparams``.
      eta_min: the official ``eta_min``, the final factor of that decay (in
        [0, 1]; default 0.5).

    Returns:
      A transformation whose update is the bias-corrected Adam direction
      (to be scaled by −lr); the state is :class:`ScaleByStableSpamState`.
    """
    for name, value in (("b1", b1), ("b2", b2), ("gamma1", gamma1), ("gamma2", gamma2), ("theta", theta)):
        check.in_unit_interval(name, value)
    check.non_negative("eps", eps)
    if isinstance(reset_interval, jax.Array):
        raise check.not_static("reset_interval")
    if reset_interval is not None and (isinstance(reset_interval, bool) or not isinstance(reset_interval, int)
                                       or reset_interval <= 0):
        raise ValueError(f"reset_interval (the momentum-reset period ΔT) must be an int > 0 or None, got {reset_interval!r}")
    if reset_mode not in RESET_MODES:
        raise ValueError(f"reset_mode must be one of {RESET_MODES}, got {reset_mode!r}")
    if isinstance(total_steps, jax.Array):
        raise check.not_static("total_steps")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0):
        raise ValueError(f"total_steps (the official total_T) must be an int > 0 or None, got {total_steps!r}")
    check.require("eta_min", eta_min, lambda v: 0 <= v <= 1, "in [0, 1]")
    official = reset_mode == "official"

    def init_fn(params):  # every field its own buffers (a donated state must not alias)
        scalars = lambda: jax.tree.map(lambda p: jnp.zeros([], jnp.float32), params)  # noqa: E731
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, moment_dtype(p)), params)  # complex64 for complex params
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # |g|², real
        return ScaleByStableSpamState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), scalars(), scalars(),
                                      scalars(), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        t = state.count + 1
        reset = jnp.asarray(False) if reset_interval is None else (t % reset_interval == 0)
        # the counter of AdaClip's and AdaGN's bias corrections: the official code's per-tensor step
        # (bumped before its reset: ΔT at the first reset step, ΔT + 1 at later ones, then 2, 3, ...),
        # or the global t
        clip_count = state.adam_count + 1 if official else t
        tf = clip_count.astype(jnp.float32)
        if total_steps is None:
            g1, beta1 = gamma1, b1
        else:  # the official CosineAnnealingLR(1.0, total_T + 1, eta_min) at the global step t
            scale = eta_min + (1 - eta_min) * (1 + jnp.cos(jnp.pi * t.astype(jnp.float32) / (total_steps + 1))) / 2
            g1, beta1 = gamma1 * scale, b1 * scale

        def stabilize(g, m_max, m_n, v_n):
            g = g.astype(moment_dtype(g))
            # AdaClip
            g_max = jnp.max(jnp.abs(g))
            m_max = theta * m_max + (1 - theta) * g_max
            threshold = m_max / (1 - theta**tf)
            g = jnp.where(jnp.abs(g) > threshold, g / jnp.where(g_max > 0, g_max, 1.0) * threshold, g)
            # AdaGN
            norm = jnp.linalg.norm(g.reshape(-1))
            m_n = g1 * m_n + (1 - g1) * norm
            v_n = gamma2 * v_n + (1 - gamma2) * norm**2
            target = (m_n / (1 - g1**tf)) / (jnp.sqrt(v_n / (1 - gamma2**tf)) + eps)
            g = jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0) * target, g)
            return g, m_max, m_n, v_n

        leaves, treedef = jax.tree_util.tree_flatten(updates)
        flat = [jax.tree_util.tree_leaves(x) for x in (state.max_ema, state.norm_ema, state.norm_sq_ema)]
        results = [stabilize(g, a, b, c) for g, a, b, c in zip(leaves, *flat)]
        grads, m_max, m_n, v_n = (jax.tree_util.tree_unflatten(treedef, list(x)) for x in zip(*results)) \
            if results else (updates,) * 4  # an empty tree

        tau = jnp.where(reset, 1, state.adam_count + 1)
        tauf = tau.astype(jnp.float32)
        # official: the reset step updates the old moments and the zeros are stored after it;
        # paper: the moments are zeroed before the reset step
        keep = jnp.asarray(1.0) if official else jnp.where(reset, 0.0, 1.0)
        mu = jax.tree.map(lambda m, g: beta1 * keep * m + (1 - beta1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * keep * v + (1 - b2) * abs_sq(g), state.nu, grads)
        out = jax.tree.map(
            lambda m, v, u: ((m / (1 - beta1**tauf)) / (jnp.sqrt(v / (1 - b2**tauf)) + eps)).astype(u.dtype),
            mu, nu, updates)
        if official:
            mu, nu = (jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), tree) for tree in (mu, nu))
        return out, ScaleByStableSpamState(t, tau, m_max, m_n, v_n, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def stable_spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    theta: float = 0.999,
    reset_interval: Optional[int] = 1000,
    weight_decay: float = 0.0,
    reset_mode: str = "official",
    total_steps: Optional[int] = None,
    eta_min: float = 0.5,
) -> optax.GradientTransformation:
    """Stable-SPAM (AdamW form): ``W ← W − lr · (u + λ W)`` with u from :func:`scale_by_stable_spam`.

    The weights are decayed before the step, as the official code
    (``p.mul_(1 - lr * weight_decay)``, then the Adam step). ``reset_mode``,
    ``total_steps``, ``eta_min``: see :func:`scale_by_stable_spam`.
    """
    check.non_negative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_stable_spam(b1, b2, eps, gamma1, gamma2, theta, reset_interval, reset_mode, total_steps, eta_min),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
