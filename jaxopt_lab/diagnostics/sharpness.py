"""Sharpness along the gradient, and the edge-of-stability ratio of full-batch GD.

Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
Typically Occurs at the Edge of Stability" (ICLR 2021),
https://arxiv.org/abs/2103.00065.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxopt_lab.diagnostics.eigen import top_eigenvalue
from jaxopt_lab.diagnostics.hvp import _check_same_structure, _tree_vdot, hvp

PyTree = Any


def directional_sharpness(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, grads: PyTree) -> jax.Array:
    r"""Curvature of the loss along the gradient direction.

    .. math::
        S_g = \frac{g^\top H g}{g^\top g}, \qquad H = \nabla^2 L(\theta)

    the Rayleigh quotient of :math:`H` at :math:`g`: it lies in
    :math:`[\lambda_{\min}, \lambda_{\max}]`, and a gradient step of size
    :math:`\eta` decreases the local quadratic model only if
    :math:`\eta < 2 / S_g`. One Hessian-vector product. Returns 0 for a zero
    gradient. Pure and jit-able.

    Args:
      loss_fn: ``params -> scalar``.
      params: pytree of floating arrays.
      grads: the direction :math:`g`, usually ``jax.grad(loss_fn)(params)`` (or
        an optimizer's update); a pytree like ``params``.

    Returns:
      A scalar.
    """
    _check_same_structure(params, grads, "grads")
    gg = _tree_vdot(grads, grads)
    ghg = _tree_vdot(grads, hvp(loss_fn, params, grads))
    return jnp.where(gg > 0, ghg / jnp.where(gg > 0, gg, 1), 0)


def edge_of_stability(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    learning_rate: float,
    key: jax.Array,
    num_iters: int = 20,
    method: str = "lanczos",
) -> dict[str, jax.Array]:
    r"""Sharpness :math:`\lambda_{\max}` against gradient descent's stability threshold :math:`2/\eta`.

    .. math::
        \texttt{sharpness} = \lambda_{\max}(\nabla^2 L(\theta)), \quad
        \texttt{threshold} = \frac{2}{\eta}, \quad
        \texttt{ratio} = \frac{\lambda_{\max}\, \eta}{2}

    Full-batch GD with step :math:`\eta` is stable on a quadratic only while
    :math:`\lambda_{\max} < 2/\eta`. Cohen et al. observe that sharpness rises
    ("progressive sharpening") until ``ratio`` reaches about 1 and then hovers
    there (the edge of stability) while the loss still decreases non-monotonically.
    For adaptive optimizers use the preconditioned sharpness instead
    (Cohen et al., 2022). To log it every ``k`` steps, jit it once with the
    batch as an argument::

        @jax.jit
        def eos(params, batch, key):
            return edge_of_stability(lambda p: loss(p, batch), params, lr, key)

    Args:
      loss_fn: ``params -> scalar`` (the full-batch or a fixed large-batch loss).
      params: pytree of floating arrays.
      learning_rate: the step size :math:`\eta > 0` (may be traced, e.g. from a schedule).
      key: ``jax.random`` key for :func:`top_eigenvalue`.
      num_iters: Lanczos steps or power iterations.
      method: ``"lanczos"`` or ``"power"``.

    Returns:
      ``{"sharpness", "threshold", "ratio"}``, scalars.
    """
    if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    lam = top_eigenvalue(loss_fn, params, key, num_iters=num_iters, method=method)
    eta = jnp.asarray(learning_rate, lam.dtype)
    return {"sharpness": lam, "threshold": 2 / eta, "ratio": lam * eta / 2}
