"""StableMax: a softmax replacement whose outputs cannot collapse to exactly one.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical
Stability" (ICLR 2025), https://arxiv.org/abs/2501.04697.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _float_dtype(x: jax.Array):
    """The input's dtype if it is floating, float32 otherwise (integer logits)."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _s(x: jax.Array) -> jax.Array:
    """s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0; both branches NaN-free."""
    pos = x >= 0  # where(), not maximum/minimum: their gradient at the tie 0 is 1/2
    return jnp.where(pos, jnp.where(pos, x, 0) + 1, 1 / (1 - jnp.where(pos, 0, x)))


def _log_s(x: jax.Array) -> jax.Array:
    """log s(x) = log1p(x) for x >= 0, -log1p(-x) for x < 0 (i.e. sign(x) log1p(|x|))."""
    pos = x >= 0
    return jnp.where(pos, jnp.log1p(jnp.where(pos, x, 0)), -jnp.log1p(-jnp.where(pos, 0, x)))


def stable_max(logits: jax.Array, axis: int = -1) -> jax.Array:
    r"""StableMax probabilities: a softmax with a linear/reciprocal in place of exp.

    .. math::
        s(x) = \begin{cases} x + 1 & x \ge 0 \\ \dfrac{1}{1 - x} & x < 0 \end{cases},
        \qquad \mathrm{StableMax}(x)_i = \frac{s(x_i)}{\sum_j s(x_j)}

    :math:`s` is positive, increasing, continuous with a continuous first
    derivative at 0, and grows only linearly, so a large logit margin does not
    round the top probability to exactly 1 the way ``exp`` does (Softmax
    Collapse). Computed in the logits' floating dtype (float32 for integers).

    Args:
      logits: array of any shape.
      axis: the class axis along which the outputs sum to one.

    Returns:
      Probabilities of ``logits``' shape.
    """
    logits = jnp.asarray(logits)
    s = _s(logits.astype(_float_dtype(logits)))
    return s / jnp.sum(s, axis=axis, keepdims=True)


def log_stable_max(logits: jax.Array, axis: int = -1) -> jax.Array:
    r"""Log of :func:`stable_max`, accurate even when one class dominates.

    .. math::
        \log \mathrm{StableMax}(x)_i = \log s(x_i) - \log \sum_j s(x_j),
        \qquad \log s(x) = \operatorname{sign}(x)\,\log(1 + |x|)

    With :math:`a = \arg\max_j x_j` and :math:`\ell_j = \log s(x_j)`, it is
    evaluated as :math:`(\ell_i - \ell_a) - \log\!\big(1 + \sum_{j \ne a}
    e^{\ell_j - \ell_a}\big)` with ``log1p``: no overflow for any finite
    logits, and the top class's log-probability keeps full relative precision
    when it is close to 0 (large margins, the regime StableMax is for).

    Args:
      logits: array of any shape.
      axis: the class axis.

    Returns:
      Log-probabilities of ``logits``' shape.
    """
    logits = jnp.asarray(logits)
    x = jnp.moveaxis(logits.astype(_float_dtype(logits)), axis, -1)
    log_s = _log_s(x)
    top = jnp.argmax(x, axis=-1)[..., None]
    log_s_top = jnp.take_along_axis(log_s, top, axis=-1)  # differentiable; only the index is not
    others = jnp.arange(x.shape[-1]) != top
    rest = jnp.sum(jnp.where(others, jnp.exp(log_s - log_s_top), 0), axis=-1, keepdims=True)
    return jnp.moveaxis((log_s - log_s_top) - jnp.log1p(rest), -1, axis)


def stable_max_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Cross-entropy of StableMax probabilities with integer labels (per example).

    .. math::
        \ell(x, y) = -\log \frac{s(x_y)}{\sum_j s(x_j)}
                   = \log \sum_j s(x_j) - \operatorname{sign}(x_y)\log(1 + |x_y|)

    A drop-in for ``optax.softmax_cross_entropy_with_integer_labels``: the last
    axis holds the classes and the result is not averaged. Finite for logits of
    any finite magnitude (e.g. 1e4 in float32, where softmax cross-entropy has
    already collapsed to an exact 0 with zero gradient).

    Args:
      logits: ``[..., num_classes]`` floating array.
      labels: ``[...]`` integer class indices.

    Returns:
      ``[...]`` losses in the logits' floating dtype.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1]; got logits {logits.shape}, labels {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    log_p = log_stable_max(logits, axis=-1)
    return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
