"""Shared by the transform reference tests: the parameters after each step of a transform."""

import jax
import optax


def trajectory(tx, params, grads):
    """Scan ``tx`` over a stacked sequence of gradients; return the params after every step."""

    def step(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    return jax.lax.scan(step, (params, tx.init(params)), grads)[1]
