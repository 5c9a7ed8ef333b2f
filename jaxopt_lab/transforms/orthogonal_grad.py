"""⊥Grad: the gradient with its component along the weights removed.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical
Stability" (ICLR 2025), https://arxiv.org/abs/2501.04697.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check


class OrthogonalGradState(NamedTuple):
    """⊥Grad keeps no state."""


def orthogonal_grad(eps: float = 1e-30) -> optax.GradientTransformation:
    r"""Project each gradient tensor orthogonally to its parameter tensor (⊥Grad).

    For every parameter tensor :math:`w` (flattened) with gradient :math:`g`:

    .. math::
        g_\perp = g - \frac{w^\top g}{w^\top w + \epsilon}\, w, \qquad
        u = g_\perp \,\frac{\lVert g \rVert}{\lVert g_\perp \rVert + \epsilon}

    The rescaling keeps the gradient's norm, as in the paper's reference code.
    Removing the radial direction stops "naïve loss minimisation" (scaling up
    the logits along the weights), which the paper shows delays grokking and
    leads to softmax collapse. Put it before any optimizer::

        optax.chain(jaxopt_lab.orthogonal_grad(), optax.adamw(1e-3, weight_decay=0.0))

    The projection is computed in float32 (or the input's wider type) and cast
    back to the gradient's dtype.

    Args:
      eps: added to both denominators; guards zero weights and zero gradients.

    Returns:
      An ``optax.GradientTransformation`` that needs ``params`` in ``update``.
    """
    check.number("eps", eps, lambda v: v > 0, "a number > 0 (it guards zero weights)")

    def init_fn(params):
        del params
        return OrthogonalGradState()

    def project(g, w):
        dtype = jnp.promote_types(g.dtype, jnp.float32)
        gf, wf = g.astype(dtype).ravel(), w.astype(dtype).ravel()
        g_perp = gf - (jnp.vdot(wf, gf) / (jnp.vdot(wf, wf) + eps)) * wf
        scale = jnp.linalg.norm(gf) / (jnp.linalg.norm(g_perp) + eps)
        return (g_perp * scale).reshape(g.shape).astype(g.dtype)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("orthogonal_grad needs params: call update(grads, state, params)")
        return jax.tree.map(project, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
