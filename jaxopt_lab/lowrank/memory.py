"""What an optimizer state holds, in bytes, from its arrays' shapes and dtypes.

Works on concrete states and on abstract ones (``jax.eval_shape(tx.init,
params)``), so the memory of a 1B-parameter model's optimizer is computed
without allocating it. Packed int4 storage is counted as the uint8 bytes it
occupies; a PRNG key as its raw key data.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _leaf_bytes(leaf) -> int:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return 0
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return int(np.prod(shape, dtype=np.int64)) * 8
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def optimizer_state_bytes(state: Any) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) in ``state``."""
    return sum(_leaf_bytes(leaf) for leaf in jax.tree_util.tree_leaves(state))


def state_bytes_report(tx, params, baseline=None) -> dict[str, float]:
    """Bytes of ``tx``'s state for ``params`` (abstractly) against ``baseline``'s (Adam by default).

    Returns ``{"bytes": ..., "baseline_bytes": ..., "ratio": bytes / baseline_bytes}``.
    """
    import optax

    baseline = optax.adam(1e-3) if baseline is None else baseline
    ours = optimizer_state_bytes(jax.eval_shape(tx.init, params))
    base = optimizer_state_bytes(jax.eval_shape(baseline.init, params))
    return {"bytes": ours, "baseline_bytes": base, "ratio": ours / base if base else float("nan")}
