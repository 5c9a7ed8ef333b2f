r"""Small-scale proxies of Transformer training instabilities, and the learning-rate sensitivity.

Wortsman et al., "Small-scale proxies for large-scale Transformer training
instabilities" (ICLR 2024), https://arxiv.org/abs/2309.14322:

* **attention-logit growth** (Sec. 3.1.1, after Dehghani et al. 2023): the
  logits :math:`z_{ij} = q_i^\top k_j / \sqrt{d_h}` grow in magnitude at high
  learning rates until the attention weights collapse to one-hot (entropy
  collapse); monitored as the largest :math:`|z_{ij}|` over the causally
  visible pairs of every head (:func:`max_attention_logit`). qk-layernorm
  (``GPT(qk_layernorm=True)``) is the mitigation.
* **output-logit divergence** (Sec. 3.1.2, after Chowdhery et al. 2022): the
  log-partition :math:`\log Z = \log\sum_v e^{y_v}` of the output logits drifts
  far from 0 (the logits diverge from the log-probabilities), monitored as the
  mean and the largest :math:`|\log Z|` (:func:`output_logit_divergence`);
  z-loss (:func:`jaxopt_lab.losses.z_loss`) is the mitigation.
* **learning-rate sensitivity** (Sec. 3.2, Eq. 1): over a sweep of learning
  rates :math:`\eta \in [a, b]` (log-spaced), with :math:`\ell(\eta)` the final
  loss, :math:`\ell_0` the loss at initialisation and
  :math:`\ell^* = \min_\eta \ell(\eta)`,

  .. math::
      \mathrm{LRS} = \mathbb{E}_{\eta}\big[\min(\ell(\eta), \ell_0) - \ell^*\big]

  (a diverged run, a NaN loss, counts as :math:`\ell_0`), :func:`lr_sensitivity`.

:func:`instability_metrics` computes the two monitors of a :class:`~jaxopt_lab.models.GPT` on a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def max_attention_logit(scores: Sequence[jax.Array], causal: bool = True) -> jax.Array:
    """Per block, the largest ``|logit|`` of ``(B, heads, T, T)`` attention logits (causal pairs only)."""
    out = []
    for s in scores:
        if s.ndim != 4 or s.shape[-1] != s.shape[-2]:
            raise ValueError(f"expected attention logits of shape (B, heads, T, T), got {tuple(s.shape)}")
        a = jnp.abs(s.astype(jnp.float32))
        if causal:
            a = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), a, 0.0)
        out.append(a.max())
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.float32)


def log_partition(logits: jax.Array) -> jax.Array:
    """``log Z = logsumexp(logits)`` over the last (vocabulary) axis, in at least float32."""
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"expected logits of shape (..., vocab) with vocab >= 1, got {tuple(logits.shape)}")
    return jax.nn.logsumexp(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


def output_logit_divergence(logits: jax.Array) -> dict[str, jax.Array]:
    """``{"log_z_mean": mean log Z, "log_z_abs_max": max |log Z|}`` over all positions."""
    lz = log_partition(logits)
    return {"log_z_mean": lz.mean(), "log_z_abs_max": jnp.abs(lz).max()}


def instability_metrics(model, tokens: jax.Array) -> dict[str, jax.Array]:
    """The monitors of a GPT on int tokens ``(B, T)``: ``attn_logit_max`` (over blocks),
    ``log_z_mean``, ``log_z_abs_max`` (jit-able; the model needs ``forward_with_attention_logits``)."""
    if not hasattr(model, "forward_with_attention_logits"):
        raise ValueError(f"{type(model).__name__} does not expose its attention logits "
                         "(forward_with_attention_logits); the instability monitors need a GPT")
    logits, scores = model.forward_with_attention_logits(tokens, attention_logits=True)
    return {"attn_logit_max": max_attention_logit(scores).max(), **output_logit_divergence(logits)}


def lr_sensitivity(final_losses: Sequence[float], initial_loss: float) -> float:
    """Wortsman et al.'s Eq. 1 over the final losses of a learning-rate sweep (one per rate, the rates
    log-spaced so the mean is the expectation): ``mean(min(l, l0)) - min(l)``, NaN/inf counted as ``l0``."""
    losses = np.asarray(final_losses, np.float64)
    if losses.ndim != 1 or losses.size == 0:
        raise ValueError(f"final_losses must be a non-empty 1-d sequence, got shape {losses.shape}")
    if not np.isfinite(initial_loss):
        raise ValueError(f"initial_loss must be finite, got {initial_loss!r}")
    clipped = np.where(np.isfinite(losses), np.minimum(losses, initial_loss), initial_loss)
    return float(clipped.mean() - clipped.min())
