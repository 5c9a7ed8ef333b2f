r"""TrAct: training the first layer's pre-activations instead of its weights.

Petersen, Borgelt & Ermon, "TrAct: Making First-layer Pre-Activations
Trainable", NeurIPS 2024, https://arxiv.org/abs/2410.23970. Official code:
github.com/Felix-Petersen/tract (``TrActLinearFunction`` /
``TrActConv2DFunction``, published as ``torch_tract``).

The method is a change of the first layer's gradient, after which any
optimizer runs unchanged: a gradient step on the first layer's activations
gives an activation proposal, and the weights that best reach it (least squares
with a ridge term) are, in closed form,

.. math::
    \tilde g_W = \Big(\tfrac{1}{N} X^\top X + \lambda I\Big)^{-1} X^\top G
             = \Big(\tfrac{1}{N} X^\top X + \lambda I\Big)^{-1} g_W ,

with :math:`X` the :math:`N \times n` first-layer inputs (rows: examples, or
image patches for a convolution), :math:`G = \partial L / \partial Z` and
:math:`g_W = X^\top G` the ordinary gradient of a kernel stored ``(in, out)``
(flax's layout; the official code's ``weight`` is its transpose). The bias
gradient is left as it is.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check

LabelFn = Callable[[optax.Params], Any]


def _path_name(path) -> str:
    """A leaf's path as keys joined by ``/``; an nnx Variable's trailing ``.value`` is left out."""
    parts = []
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def select_leaf(params: optax.Params, first_layer: str | LabelFn, what: str = "first_layer") -> list[bool]:
    """Flags (in ``jax.tree.leaves`` order) of the leaves that ``first_layer`` names.

    ``first_layer`` is a path (``"layers/0/kernel"``: the keys joined by ``/``)
    or a label function ``params -> tree of bools``.
    """
    if isinstance(first_layer, jax.Array):  # a label function injected by optax.inject_hyperparams
        raise check.not_static(what)
    if callable(first_layer):
        labels = first_layer(params)
        return [bool(x) for x in jax.tree.leaves(labels)]
    if not isinstance(first_layer, str):
        raise ValueError(f"{what} must be a path string or a label function, got {first_layer!r}")
    paths = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [p == first_layer for p in paths]


def conv_patches(
    x: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int] | int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """The ``(N, kh * kw * c_in)`` patch matrix of NHWC images for a conv kernel ``(kh, kw, c_in, c_out)``.

    Row order is (batch, out_h, out_w); column order matches
    ``kernel.reshape(-1, c_out)``, so ``patches @ kernel.reshape(-1, c_out)``
    is the convolution (the official code's ``unfold``). Pass it as
    ``first_layer_input`` for a convolutional first layer.
    """
    kh, kw = (int(k) for k in kernel_size)
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    c = x.shape[-1]
    p = jax.lax.conv_general_dilated_patches(
        x, (kh, kw), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # (..., c * kh * kw), channel-major
    p = p.reshape(*p.shape[:-1], c, kh, kw)
    p = jnp.moveaxis(p, -3, -1)  # (..., kh, kw, c)
    return p.reshape(-1, kh * kw * c)


def scale_by_tract(first_layer: str | LabelFn, l: float = 0.1) -> optax.GradientTransformationExtraArgs:  # noqa: E741
    r"""Replace the first layer's kernel gradient by TrAct's closed-form one.

    For the one leaf that ``first_layer`` selects, a dense kernel ``(n, out)``
    or a conv kernel ``(kh, kw, c_in, out)`` (then :math:`n = kh\,kw\,c_{in}`),

    .. math::
        g \leftarrow \big(X^\top X / N + \lambda I_n\big)^{-1} g,

    with :math:`X` the ``first_layer_input`` passed to ``update``: the layer's
    input batch ``(..., n)`` for a dense layer (leading axes flattened into
    :math:`N`) or the patch matrix of :func:`conv_patches` for a convolution.
    For an embedding table ``(vocab, dim)`` (a language model's first layer, as
    the paper discusses) pass the integer token ids: :math:`X` is then one-hot,
    :math:`X^\top X / N` the diagonal of token frequencies :math:`c_v / N`, and
    the update is row-wise :math:`g_v / (c_v / N + \lambda)` (rare tokens' rows
    move more), without forming the ``vocab × vocab`` system.
    Every other leaf passes unchanged. Solved in float32 (or wider) by Cholesky;
    the official code switches to the Woodbury form when :math:`N < n`, which
    needs :math:`G` itself — identical in exact arithmetic, so here the
    :math:`n \times n` system is always solved.

    Args:
      first_layer: the kernel's path (``"layers/0/kernel"``; an nnx
        Variable's ``.value`` is left out) or a label function ``params -> tree
        of bools`` selecting at most one leaf. A path that matches no leaf
        (e.g. a typo) is an error at ``init`` naming the paths there are; a
        label function that selects none leaves every gradient as it is.
      l: :math:`\lambda > 0`, the ridge term (official default 0.1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
      keyword argument ``first_layer_input`` (required when a leaf is selected).
    """
    check.positive("l", l)

    def _flags(tree):
        flags = select_leaf(tree, first_layer)
        if sum(flags) > 1:
            raise ValueError(f"first_layer must select at most one leaf, got {sum(flags)}")
        for f, p in zip(flags, jax.tree.leaves(tree)):
            if f and jnp.ndim(p) not in (2, 4):
                raise ValueError(f"first_layer must select a 2-D dense or 4-D conv kernel, got shape {jnp.shape(p)}")
            if f and jnp.iscomplexobj(p):
                path = [k for (k, _), fl in zip(jax.tree_util.tree_flatten_with_path(tree)[0], flags) if fl][0]
                raise ValueError(f"TrAct's first layer {jax.tree_util.keystr(path)} is {p.dtype}: only real kernels")
        return flags

    def init_fn(params):
        flags = _flags(params)
        if isinstance(first_layer, str) and not any(flags):
            paths = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            raise ValueError(f"first_layer {first_layer!r} matches no parameter; the paths are {paths}")
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, first_layer_input=None, **extra_args):
        del extra_args
        flags = _flags(updates)
        if not any(flags):
            return updates, state
        if first_layer_input is None:
            raise ValueError("scale_by_tract needs update(..., first_layer_input=X) for its first layer")
        leaves, treedef = jax.tree.flatten(updates)
        out = []
        for f, g in zip(flags, leaves):
            if not f:
                out.append(g)
                continue
            n = g.size // g.shape[-1]
            x = jnp.asarray(first_layer_input)
            if jnp.issubdtype(x.dtype, jnp.integer):  # token ids into an embedding table (vocab, dim)
                if g.ndim != 2:
                    raise ValueError(f"integer first_layer_input (token ids) needs a 2-D embedding table, got {g.shape}")
                ct = jnp.promote_types(g.dtype, jnp.float32)
                freq = jnp.zeros((g.shape[0],), ct).at[x.reshape(-1)].add(1.0) / x.size  # diag(X^T X) / N
                out.append((g.astype(ct) / (freq + jnp.asarray(l, ct))[:, None]).astype(g.dtype))
                continue
            x = x.reshape(-1, x.shape[-1])
            if x.shape[-1] != n:
                raise ValueError(
                    f"first_layer_input has {x.shape[-1]} features per row, the first layer's kernel "
                    f"{g.shape} needs {n} (a conv kernel needs conv_patches)"
                )
            ct = jnp.promote_types(jnp.promote_types(g.dtype, x.dtype), jnp.float32)
            x = x.astype(ct)
            a = x.T @ x / x.shape[0] + jnp.asarray(l, ct) * jnp.eye(n, dtype=ct)
            cho = jax.scipy.linalg.cho_factor(a, lower=True)
            new = jax.scipy.linalg.cho_solve(cho, g.reshape(n, -1).astype(ct))
            out.append(new.reshape(g.shape).astype(g.dtype))
        return treedef.unflatten(out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tract(
    learning_rate: optax.ScalarOrSchedule,
    first_layer: str | LabelFn,
    l: float = 0.1,  # noqa: E741
    momentum: float | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """TrAct on the first layer, then SGD on every leaf.

    ``optax.chain(scale_by_tract(first_layer, l), optax.sgd(learning_rate, momentum, nesterov))``:
    the official code changes the first layer's backward pass and leaves the
    optimizer as it is; for Adam or any other, chain :func:`scale_by_tract`
    before it yourself. ``update`` takes ``first_layer_input``.

    Args:
      learning_rate: float >= 0 or an optax schedule.
      first_layer: path or label function of the first layer's kernel.
      l: TrAct's :math:`\\lambda > 0` (default 0.1, the official default).
      momentum: SGD's momentum (None: none).
      nesterov: Nesterov momentum.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(scale_by_tract(first_layer, l), optax.sgd(learning_rate, momentum, nesterov))
