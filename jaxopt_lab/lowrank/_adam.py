"""Adam split as the official GaLore and Fira code computes it.

The official code takes the low-rank direction ``m / (√v + ε)`` *without*
bias correction and applies the bias correction ``√(1 − β₂ᵗ) / (1 − β₁ᵗ)``
with the learning rate, to the whole update. Fira's norm-based scaling and
norm-growth limiter see the uncorrected direction, so the split matters for
Fira (for GaLore it only moves ε: ``ε`` vs ``ε/√(1 − β₂ᵗ)`` in optax's Adam).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms._numerics import abs_sq


class ScaleByAdamMomentsState(NamedTuple):
    mu: optax.Updates
    nu: optax.Updates


def moment_dtype(p):
    return jnp.complex64 if jnp.issubdtype(p.dtype, jnp.complexfloating) else jnp.float32


def scale_by_adam_moments(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """``m_t / (√v_t + ε)`` with ``m_t = β₁ m + (1 − β₁) g``, ``v_t = β₂ v + (1 − β₂) |g|²`` (no bias correction).

    The moments are float32 (complex64 for a complex ``g``, as optax's Adam:
    ``v`` is real).
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)

    def init_fn(params):  # two calls: mu and nu are distinct buffers (a donated state must not alias)
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, moment_dtype(p)), params)
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return ScaleByAdamMomentsState(mu, nu)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(m.dtype), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * abs_sq(g).astype(jnp.float32), state.nu, updates)
        out = jax.tree.map(lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates)
        return out, ScaleByAdamMomentsState(mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam_bias_correction(b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """Multiplies the update by Adam's bias correction ``√(1 − β₂ᵗ) / (1 − β₁ᵗ)`` at step t = 1, 2, ..."""

    def factor(count):
        t = count.astype(jnp.float32) + 1
        return jnp.sqrt(1 - b2**t) / (1 - b1**t)

    return optax.scale_by_schedule(factor)
