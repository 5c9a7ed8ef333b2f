"""z-loss: an auxiliary penalty keeping the softmax normalizer near one.

Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways" (2022),
https://arxiv.org/abs/2204.02311, Sec. 5; Wortsman et al., "Small-scale proxies
for large-scale Transformer training instabilities" (ICLR 2024),
https://arxiv.org/abs/2309.14322, Sec. 3.1.2 (logit divergence).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def z_loss(logits: jax.Array, weight: float = 1e-4) -> jax.Array:
    r"""Mean squared log-partition function of the logits, times ``weight``.

    .. math::
        \log Z_i = \log \sum_j e^{z_{ij}}, \qquad
        \mathcal{L}_z = w \cdot \frac{1}{N} \sum_{i=1}^{N} (\log Z_i)^2

    where :math:`i` runs over all leading positions (examples, tokens) and
    :math:`j` over the last (class) axis. Added to the cross-entropy, it pulls
    :math:`\log Z` towards 0 so the logits cannot drift to large magnitudes;
    PaLM uses :math:`w = 10^{-4}`. ``logsumexp`` is computed stably and in at
    least float32.

    Args:
      logits: ``[..., num_classes]`` array.
      weight: :math:`w \ge 0`.

    Returns:
      A scalar.
    """
    if isinstance(weight, numbers.Real) and not weight >= 0:  # numpy scalars too; arrays may be traced
        raise ValueError(f"weight must be >= 0, got {weight!r}")
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or logits.size == 0:
        raise ValueError(f"logits must have a class axis and at least one entry, got shape {logits.shape}")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    log_z = jax.nn.logsumexp(logits.astype(dtype), axis=-1)
    return weight * jnp.mean(jnp.square(log_z))
