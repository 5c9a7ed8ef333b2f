"""EControl: error feedback with a controlled strength, over any contractive compressor.

Gao, Islamov & Stich, "EControl: Fast Distributed Optimization with
Compression and Error Control" (ICLR 2024), https://arxiv.org/abs/2311.05645.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.distributed.compression.base import Compressor
from jaxopt_lab.distributed.compression.topk import top_k


class EControlState(NamedTuple):
    error: Any  # e_i, the accumulated compression error
    estimate: Any  # h_i, this worker's gradient estimator (the receivers track the mean of the h_i)
    inner: Any  # the inner compressor's state


def econtrol(eta: float = 0.1, compressor: Compressor | None = None) -> Compressor:
    r"""EControl (Gao, Islamov & Stich 2024, Algorithm 1) on one worker, over the compressor :math:`\mathcal C`.

    Each worker :math:`i` keeps an error :math:`e_i` and a gradient estimator
    :math:`h_i` (both zero at start). Given its gradient :math:`g_i` it sends
    one compressed message

    .. math::
        \Delta_i = \mathcal C(\eta\, e_i + g_i - h_i)

    and updates

    .. math::
        e_i \leftarrow e_i + g_i - h_i - \Delta_i, \qquad h_i \leftarrow h_i + \Delta_i .

    The decoded tree is the new :math:`h_i = h_i + \Delta_i`: receivers that
    know :math:`h_i` (every earlier message) rebuild it from :math:`\Delta_i`,
    and the mean over workers is the paper's step direction
    :math:`h^t + \Delta^t` in :math:`x^{t+1} = x^t - \gamma (h^t + \Delta^t)`.
    Bytes are those of the message :math:`\Delta_i` (the inner compressor's).

    :math:`\eta` scales how much of the accumulated error is fed back;
    :math:`\eta = 0` is EF21 (Richtárik et al. 2021), which never feeds the error
    back. Starting from :math:`h_i = 0` (the paper's analysis also allows
    :math:`h_i^0 = g_i^0`, which costs an uncompressed first message), the first
    message is :math:`\mathcal C(g_i)`.

    Args:
      eta: :math:`\eta \in [0, 1]`; the default 0.1 matches the contraction
        :math:`\delta = k/n = 0.1` of the default compressor (untuned).
      compressor: :math:`\mathcal C`, a contractive compressor without its own
        error feedback (default ``top_k(0.1, error_feedback=False)``); it gets
        this call's ``key`` and ``step``.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if compressor is None:
        compressor = top_k(0.1, error_feedback=False)
    if not isinstance(compressor, Compressor):
        raise ValueError(f"compressor must be a Compressor, got {compressor!r}")

    def init_fn(tree):
        zeros = jax.tree.map(jnp.zeros_like, tree)
        return EControlState(zeros, zeros, compressor.init(tree))

    def compress_fn(tree, state, key, step):
        message = jax.tree.map(lambda g, e, h: eta * e + g - h, tree, state.error, state.estimate)
        delta, inner, nbytes = compressor.compress(message, state.inner, key, step)
        error = jax.tree.map(lambda g, e, h, d: e + g - h - d, tree, state.error, state.estimate, delta)
        estimate = jax.tree.map(lambda h, d: h + d, state.estimate, delta)
        return estimate, EControlState(error, estimate, inner), nbytes

    return Compressor(init_fn, compress_fn)
