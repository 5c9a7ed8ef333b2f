"""Decoupled weight decay of the *updated* weights, as the official GaLore, APOLLO and Q-GaLore AdamW.

The official optimizers (``galore_torch.GaLoreAdamW``, ``apollo_torch.APOLLOAdamW``,
``q_galore_torch.QGaLoreAdamW8bit``) first take the Adam step and then decay
the weights that step produced::

    p.add_(norm_grad, alpha=-step_size)                     # W' = W − η·b_t·U
    p.add_(p, alpha=-group["lr"] * group["weight_decay"])   # W'' = W' − η λ W'

so ``W_new = (1 − ηλ)(W − η b_t U)``. optax's AdamW (``add_decayed_weights``
before the learning rate) decays the old weights, ``W − η (b_t U + λ W)``;
the two differ by ``η² λ b_t U`` per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class DecayUpdatedWeightsState(NamedTuple):
    """Steps taken (int32), read by a learning-rate schedule."""

    count: jax.Array


def decay_updated_weights(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
) -> optax.GradientTransformation:
    """``u ← u − η_t λ (W + u)``: decays the weights after the update ``u`` is applied.

    Put it *last* in a chain, after ``optax.scale_by_learning_rate(learning_rate)``
    (``u`` is then the step itself). ``optax.apply_updates`` gives
    ``W + u − η_t λ (W + u) = (1 − η_t λ)(W + u)``: the official GaLore/APOLLO
    order (see the module docstring). ``η_t`` is ``learning_rate`` itself (a
    schedule is evaluated at this transform's count, 0 on the first update,
    as ``optax.scale_by_learning_rate`` does), without Adam's bias correction,
    as in the official code.

    Args:
      learning_rate: η, a float or an optax schedule (the same one the chain uses).
      weight_decay: λ ≥ 0.

    Returns:
      A transformation whose ``update`` needs ``params``.
    """

    def init_fn(params):
        del params
        return DecayUpdatedWeightsState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled weight decay needs params: call update(updates, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(u, p):
            ct = jnp.promote_types(u.dtype, jnp.float32)
            c = jnp.asarray(lr) * jnp.asarray(weight_decay)
            if not jnp.issubdtype(ct, jnp.complexfloating):
                # optax.inject_hyperparams casts the hyperparameters to complex64 when the params' first
                # leaf is complex: a real leaf takes the real part (the imaginary part is 0), no warning
                c = jnp.real(c)
            c = c.astype(ct)
            u32 = u.astype(ct)
            return (u32 - c * (p.astype(ct) + u32)).astype(u.dtype)

        decayed = jax.tree.map(lambda u, p: None if u is None else leaf(u, p), updates, params,
                               is_leaf=lambda x: x is None)
        return decayed, DecayUpdatedWeightsState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
