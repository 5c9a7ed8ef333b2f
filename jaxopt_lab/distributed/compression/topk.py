"""Top-k sparsification of each tensor, with error feedback.

Error feedback: Seide et al., "1-Bit Stochastic Gradient Descent and its
Application to Data-Parallel Distributed Training of Speech DNNs"
(Interspeech 2014); Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory"
(NeurIPS 2018), https://arxiv.org/abs/1809.07599.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.distributed.compression.base import Compressor, as_nbytes

INDEX_BYTES = 4  # an int32 index per sent value


class TopKState(NamedTuple):
    error: Any  # e, the error-feedback memory (shaped like the tree); None without error feedback


def num_kept(n: int, fraction) -> int:
    """``max(1, ceil(fraction * n))`` with ``fraction`` read as the decimal it prints as.

    (``0.07 * 100`` is ``7.000000000000001`` in floating point; here it is 7.)
    """
    if not isinstance(fraction, Fraction):
        fraction = Fraction(repr(float(fraction)))
    return max(1, math.ceil(fraction * n))


def _top_k_leaf(x, k):
    """``x`` with all but its ``k`` largest-magnitude entries zeroed (exactly k kept)."""
    if k >= x.size:
        return x
    flat = x.ravel()
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(x.shape)


def payload_bytes(kept, size: int, itemsize: int):
    """Bytes of a tensor of ``size`` entries with ``kept`` of them sent: values and int32 indices,
    or the dense tensor where that is fewer (as DGC's reference sends a tensor nothing was removed from)."""
    sparse, dense = kept * (itemsize + INDEX_BYTES), size * itemsize
    return jnp.minimum(sparse, dense) if isinstance(kept, jax.Array) else min(sparse, dense)


def top_k(k_fraction: float, error_feedback: bool = True) -> Compressor:
    r"""Keep the :math:`k = \max(1, \lceil \rho\, n \rceil)` largest-magnitude entries of each tensor.

    :math:`\rho` = ``k_fraction``, :math:`n` the tensor's size; per tensor, not
    over the whole tree. Ties in magnitude are broken by ``jax.lax.top_k``
    (exactly :math:`k` entries are kept). With ``error_feedback`` (EF-SGD;
    Seide et al. 2014, Stich et al. 2018) each worker keeps the memory
    :math:`e` (zero at start) of what it has not yet sent, and at each call

    .. math::
        p = x + e, \qquad \hat x = \mathrm{top}_k(p), \qquad e \leftarrow p - \hat x ,

    so nothing is lost: :math:`\sum_t \hat x_t + e_T = \sum_t x_t`. Without it,
    :math:`\hat x = \mathrm{top}_k(x)`.

    Bytes: :math:`k` values (the tensor's itemsize each) plus :math:`k` int32
    indices, :math:`k\,(\text{itemsize} + 4)` per tensor, or the dense tensor,
    :math:`n \cdot \text{itemsize}`, where that is fewer (:func:`payload_bytes`).

    Args:
      k_fraction: :math:`\rho \in (0, 1]`.
      error_feedback: keep and re-inject the compression error.
    """
    if isinstance(k_fraction, bool) or not isinstance(k_fraction, (int, float)) or not 0 < k_fraction <= 1:
        raise ValueError(f"k_fraction must be in (0, 1], got {k_fraction!r}")
    if not isinstance(error_feedback, bool):
        raise ValueError(f"error_feedback must be a bool, got {error_feedback!r}")

    def init_fn(tree):
        return TopKState(jax.tree.map(jnp.zeros_like, tree) if error_feedback else None)

    def compress_fn(tree, state, key, step):
        del key, step
        leaves, treedef = jax.tree.flatten(tree)
        if error_feedback:
            leaves = [x + e for x, e in zip(leaves, treedef.flatten_up_to(state.error))]
        ks = [num_kept(x.size, k_fraction) if x.size else 0 for x in leaves]
        sent = [_top_k_leaf(p, k) for p, k in zip(leaves, ks)]
        nbytes = sum(payload_bytes(k, x.size, np.dtype(x.dtype).itemsize) for x, k in zip(leaves, ks))
        error = jax.tree.unflatten(treedef, [p - c for p, c in zip(leaves, sent)]) if error_feedback else None
        return jax.tree.unflatten(treedef, sent), TopKState(error), as_nbytes(nbytes)

    return Compressor(init_fn, compress_fn)
