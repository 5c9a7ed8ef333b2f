"""Noisy Softmax: annealed noise on the target logit to postpone softmax saturation.

Chen, Deng & Du, "Noisy Softmax: Improving the Generalization Ability of DCNN
via Postponing the Early Softmax Saturation" (CVPR 2017),
https://arxiv.org/abs/1708.03769.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax


def noisy_softmax_logits(
    logits: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    alpha: float,
    target_norm: jax.Array | None = None,
) -> jax.Array:
    r"""The logits with the target-class logit lowered by a random, non-negative amount.

    For example :math:`i` with target logit :math:`f_{y_i}` and
    :math:`\xi_i \sim \mathcal{N}(0, 1)` drawn independently per example:

    .. math::
        \tilde f_{y_i} = f_{y_i} - \alpha\, a_i\, |\xi_i|, \qquad
        a_i = \begin{cases}
          \lVert W_{y_i}\rVert \lVert x_i\rVert - f_{y_i}
            = \lVert W_{y_i}\rVert \lVert x_i\rVert (1 - \cos\theta_{y_i})
            & \text{if } \texttt{target\_norm} = \lVert W_{y_i}\rVert \lVert x_i\rVert \text{ is given} \\
          |f_{y_i}| & \text{otherwise}
        \end{cases}

    The first case is the paper's annealed noise (its Eq. for
    :math:`f^{\mathrm{noise}}_{y_i}`, for a bias-free last layer
    :math:`f_j = W_j^\top x_i`): its amplitude shrinks to 0 as the feature aligns
    with its class weight. The logits alone do not determine
    :math:`\lVert W_{y_i}\rVert \lVert x_i\rVert`, so without ``target_norm`` the
    amplitude is :math:`|f_{y_i}|`, which scales with the logit but does not
    anneal with the angle. Other logits are unchanged. Because the noise only
    lowers the target logit, the loss is larger than plain cross-entropy and
    saturates later. The expected noisy logit is
    :math:`f_{y_i} - \alpha a_i \sqrt{2/\pi}`. Gradients flow through
    :math:`a_i` (wrap ``target_norm`` in ``jax.lax.stop_gradient`` to treat it
    as a constant).

    Args:
      logits: ``[..., num_classes]`` floating array.
      labels: ``[...]`` integer class indices.
      key: a ``jax.random`` key; use a fresh one every step.
      alpha: noise scale :math:`\alpha \ge 0` (the paper reports about 0.1
        working well); ``0`` gives back ``logits``.
      target_norm: optional ``[...]`` array of :math:`\lVert W_{y_i}\rVert
        \lVert x_i\rVert`, selecting the paper's annealed amplitude.

    Returns:
      Noisy logits of ``logits``' shape and dtype.
    """
    if isinstance(alpha, numbers.Real) and not alpha >= 0:  # numpy scalars too; arrays may be traced
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1]; got logits {logits.shape}, labels {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if target_norm is not None and jnp.shape(target_norm) != labels.shape:
        raise ValueError(f"target_norm must have the labels' shape {labels.shape}, got {jnp.shape(target_norm)}")

    f_y = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if target_norm is None:
        amplitude = jnp.abs(f_y)
    else:  # |W||x|(1 - cos θ) >= 0; clip the rounding error of |W||x| - f_y.
        amplitude = jnp.maximum(jnp.asarray(target_norm, logits.dtype) - f_y, 0)
    xi = jax.random.normal(key, labels.shape, dtype=logits.dtype)
    noisy_f_y = f_y - alpha * amplitude * jnp.abs(xi)
    is_target = jnp.arange(logits.shape[-1]) == labels[..., None]
    return jnp.where(is_target, noisy_f_y[..., None], logits).astype(logits.dtype)


def noisy_softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    alpha: float,
    target_norm: jax.Array | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy of :func:`noisy_softmax_logits` (per example; training only).

    .. math::
        \ell_i = -\log \frac{e^{\tilde f_{y_i}}}{e^{\tilde f_{y_i}} + \sum_{j \ne y_i} e^{f_j}},
        \qquad \tilde f_{y_i} = f_{y_i} - \alpha\, a_i\, |\xi_i|

    with :math:`a_i` as in :func:`noisy_softmax_logits`. Evaluate with plain
    cross-entropy (or ``alpha=0``, which returns it exactly).

    Args:
      logits: ``[..., num_classes]`` floating array.
      labels: ``[...]`` integer class indices.
      key: a ``jax.random`` key; use a fresh one every step.
      alpha: noise scale :math:`\alpha \ge 0`.
      target_norm: optional ``[...]`` :math:`\lVert W_{y_i}\rVert \lVert x_i\rVert`
        for the paper's annealed amplitude.

    Returns:
      ``[...]`` losses, not averaged (like ``optax.softmax_cross_entropy_with_integer_labels``).
    """
    noisy = noisy_softmax_logits(logits, labels, key, alpha, target_norm)
    return optax.softmax_cross_entropy_with_integer_labels(noisy, labels)
