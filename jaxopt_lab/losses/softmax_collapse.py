"""Softmax Collapse detector: how many examples get an exactly-zero gradient.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical
Stability" (ICLR 2025), https://arxiv.org/abs/2501.04697.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_collapse_fraction(
    logits: jax.Array, labels: jax.Array, correct_class_only: bool = False
) -> jax.Array:
    r"""Fraction of examples whose softmax cross-entropy gradient is exactly zero.

    For example :math:`i` with logits :math:`z_i` and label :math:`y_i`, let

    .. math::
        g_i = \nabla_{z_i}\, \mathrm{CE}(z_i, y_i) = \mathrm{softmax}(z_i) - e_{y_i}

    be the gradient JAX computes (reverse-mode through
    ``optax.softmax_cross_entropy_with_integer_labels``) **in the logits'
    dtype**, with no upcast. The example has *collapsed* when every entry of
    :math:`g_i` is exactly ``0``; the result is
    :math:`\frac{1}{N}\#\{i : g_i = 0\}`.

    This is Softmax Collapse: once the correct-class margin is large,
    :math:`\sum_j e^{z_j}` rounds to :math:`e^{z_{y}}` (absorption), the
    correct-class probability rounds to exactly 1, so :math:`g_{i,y} = 0` and the
    loss is exactly 0; with a larger margin the other probabilities
    :math:`e^{z_j - \mathrm{lse}(z)}` underflow to 0 as well and the example
    contributes no gradient at all. In float32, with margin
    :math:`m = z_y - \max_{j \ne y} z_j`, the first happens once
    :math:`(C - 1) e^{-m}` falls below half a unit in the last place of
    :math:`e^{z_y}`'s sum, which depends on the magnitude of :math:`z_y` too
    (measured on CPU with the other logits at 0: from m = 16.75 at C = 2 and 10,
    20.25 at C = 100); the second above about 88 on backends that flush
    subnormals to zero (CPU XLA does) or 104 on those that keep them.

    With ``correct_class_only=True`` only :math:`g_{i,y_i} = 0` is required,
    i.e. the loss of the example is exactly 0 — the "samples with zero loss"
    count of the paper, which flags collapse earlier.

    Args:
      logits: ``[..., num_classes]`` floating array (its dtype is the precision
        tested: pass the logits the model really produces, e.g. float32 or
        bfloat16).
      labels: ``[...]`` integer class indices.
      correct_class_only: test only the correct-class entry of the gradient.

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1]; got logits {logits.shape}, labels {labels.shape}"
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if labels.size == 0:
        raise ValueError(f"need at least one example, got labels of shape {labels.shape}")

    def total_loss(z):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, labels))

    # Examples are independent, so the gradient of the sum is the per-example gradient.
    grads = jax.grad(total_loss)(logits)
    if correct_class_only:
        zero = jnp.take_along_axis(grads, labels[..., None], axis=-1)[..., 0] == 0
    else:
        zero = jnp.all(grads == 0, axis=-1)
    return jnp.mean(zero.astype(jnp.float32))
