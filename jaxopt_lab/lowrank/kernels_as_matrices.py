"""Run a matrix method (GaLore, ...) on conv kernels: each kernel seen as its patch matrix.

The low-rank methods project 2-D matrices only (GaLore, Zhao et al. 2024, and its official code
project the 2-D weights of transformers). A conv kernel ``W`` of shape ``(kh, kw, c_in, c_out)``
is the matrix ``W.reshape(kh * kw * c_in, c_out)`` applied to each image patch; this wrapper
hands ``inner`` every leaf of more than 2 dimensions in that shape (updates and params alike)
and reshapes its updates back::

    u = reshape_back(inner(reshape(g), reshape(W)))

so a conv kernel is projected like a dense layer's kernel (the way Muon flattens conv filters;
GaLore's official tensor variant uses a Tucker decomposition instead, which this does not do).
Leaves of 0-2 dimensions pass unchanged; the state is ``inner``'s, on the reshaped tree.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def _as_matrix(x: Any) -> Any:
    return x.reshape(-1, x.shape[-1]) if getattr(x, "ndim", 0) > 2 else x


def _as_matrices(tree: Any) -> Any:
    return None if tree is None else jax.tree.map(_as_matrix, tree)


def kernels_as_matrices(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` with every parameter of more than 2 dimensions reshaped to ``(prod(shape[:-1]), shape[-1])``.

    Args:
      inner: any optax transformation (``galore``, ``adamw``, ...); in a config
        ``method = {name = "kernels_as_matrices", inner = {name = "galore", ...}}``.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"kernels_as_matrices needs an optax GradientTransformation as inner, got {inner!r}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(_as_matrices(params))

    def update_fn(updates, state, params=None, **extra_args):
        new, state = inner.update(_as_matrices(updates), state, _as_matrices(params), **extra_args)
        return jax.tree.map(lambda n, u: n.reshape(u.shape), new, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
