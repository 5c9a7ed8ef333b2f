"""GradNormLoRP: Gradient Weight-normalized Low-rank Projection for Efficient LLM
Training (Huang et al., AAAI 2025, https://arxiv.org/abs/2412.19616).

Each selected weight matrix is reparameterized by weight normalization,

    W = m ⊙ V / ‖V‖_c        (column by column: W_{:,j} = m_j V_{:,j} / ‖V_{:,j}‖)

with a direction V (same shape as W) and a magnitude m (one per column, i.e.
per output unit of a flax ``(in, out)`` kernel), initialized as V = W and
m = ‖W‖_c. The gradient of the loss with respect to W is re-expressed for the
two factors (Salimans & Kingma, 2016), with û_j = V_{:,j} / ‖V_{:,j}‖::

    ∇_{m_j} = û_jᵀ G_{:,j}
    ∇_{V_{:,j}} = (m_j / ‖V_{:,j}‖) (G_{:,j} − û_j ∇_{m_j})    (orthogonal to V_{:,j})

The direction's gradient is optimized GaLore-style: projected by P (the top-r
singular vectors of ∇_V, refreshed every T steps), Adam in the r-dimensional
space, projected back with the scale α; the magnitude (a vector) gets plain
Adam. With η the learning rate and the Adam split of the official GaLore code:

    ΔV = −η · bc_t · α · P · Adam(Pᵀ ∇_V),   Δm = −η · (bc_t · Adam(∇_m) + λ m)
    W_new = (m + Δm) ⊙ (V + ΔV) / ‖V + ΔV‖_c

so the transformation returns the *exact* update ``W_new − W`` of the
reparameterized weight (not its first-order approximation).

State: V is not stored. Since W = m ⊙ V/‖V‖_c, the direction of V is W's
(up to m's sign), so the state holds only m and ‖V‖_c (two floats per
column) besides the optimizer's low-rank moments: the memory of GaLore plus
2·k floats per matrix. A column that is zero at initialization has no
direction; it gets a zero gradient and stays zero.

Structure: :func:`weight_normalized` is the exact reparameterization around
any optax transformation ``inner`` that sees the tree
``WeightNormParts(direction=D, magnitude=M)`` (gradients, parameters and
updates alike): ``D`` is like the params, with V in place of each selected
leaf W (every other leaf as it is), and ``M`` is like the params, with m at
each selected leaf and ``optax.MaskedNode()`` elsewhere. Every per-parameter
part of the state is thus a tree like the params (``optax.tree.map_params``
and ``nnx.Optimizer`` need that; see :mod:`jaxopt_lab.lowrank._projected`;
a magnitude is (k,) where its W is (d, k), so a function that maps the
params' sharding specs onto the state must give it a spec of rank 1);
:func:`scale_by_gradnorm_lorp` is GaLore on the selected leaves of ``D``; :func:`gradnorm_lorp` chains them
with Adam's bias correction, weight decay and the learning rate. Because
W_new depends on the learning rate nonlinearly, the learning rate is applied
inside the reparameterization (the last element of ``inner``).

What we had to assume (the paper's algorithm box and official code disagree,
and the official code, ``Jhhuangkay/Gradient-Weight-normalized-Low-rank-
Projection-for-Efficient-LLM-Training``, resets the magnitude to ‖V‖ at every
step and omits the projection ``I − ûûᵀ``): we implement the weight-normalized
gradient exactly as in Salimans & Kingma / DoRA, column norms (per output unit,
the official code's ``dim=1`` of a PyTorch ``(out, in)`` weight), V₀ = W,
m₀ = ‖W‖_c (the official ``LowRankWeightNormAdamW``), weight decay on the
magnitude only (decaying V would only change the effective step of the
direction), α = 0.25 and T = 200 as the official scripts, ε = 1e-6. The
paper's 8-bit variant (8-bit Adam states) is not implemented.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.lowrank._adam import scale_by_adam_bias_correction, scale_by_adam_moments
from jaxopt_lab.lowrank._projected import default_label_fn, leaf_specs, scale_by_projected
from jaxopt_lab.lowrank.galore import _galore_finish
from jaxopt_lab.lowrank.projectors import get_projector
from jaxopt_lab.transforms import _validation as check


class WeightNormParts(NamedTuple):
    """The weight-normalized factors of a params tree (or their gradients, or updates).

    Attributes:
      direction: a tree like the params: V (d × k, like W) at each
        weight-normalized matrix W, the leaf itself elsewhere.
      magnitude: a tree like the params: m (k,), one per column, at each
        weight-normalized matrix, ``optax.MaskedNode()`` elsewhere.
    """

    direction: Any
    magnitude: Any


class WeightNormState(NamedTuple):
    """State of :func:`weight_normalized`.

    Attributes:
      magnitude: a tree like the params: m (k,) float32 at each reparameterized
        matrix, ``optax.MaskedNode()`` elsewhere.
      direction_norm: the same for ‖V‖_c (k,) float32.
      inner: the inner transformation's state (over the reparameterized tree).
    """

    magnitude: Any
    direction_norm: Any
    inner: optax.OptState


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _selected_flags(tree: WeightNormParts) -> list[bool]:
    """Per leaf of ``tree.direction``: whether it is weight-normalized (it has a magnitude)."""
    return [not _is_masked(m) for m in jax.tree_util.tree_structure(tree.direction).flatten_up_to(tree.magnitude)]


def _selected_indices(params, label_fn) -> list[int]:
    """Flatten indices of the leaves ``label_fn`` selects; each must be a 2-D matrix."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not leaves_with_path:  # e.g. the empty placeholder tree of optax.tree.map_params
        return []
    labels = label_fn(params) if callable(label_fn) else label_fn
    chosen = []
    for index, ((path, leaf), label) in enumerate(zip(leaves_with_path, treedef.flatten_up_to(labels))):
        if label is None or label is False:
            continue
        if len(leaf.shape) != 2:
            raise ValueError(f"the label function selected {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: "
                             "only 2-D matrices can be weight-normalized")
        chosen.append(index)
    return chosen


def _col_norm(x):
    return jnp.linalg.norm(x, axis=0)


def _safe_div(a, b):
    return a / jnp.where(b > 0, b, 1.0)


def weight_normalized(inner: optax.GradientTransformation, label_fn: Any = None) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on the weight-normalized factors of the selected matrices; returns exact W updates.

    ``inner`` sees ``WeightNormParts(direction=D, magnitude=M)`` (see the module
    docstring): each selected leaf W (2-D) as ``V`` in ``D`` and ``m`` in ``M``
    with ``W = m ⊙ V / ‖V‖_c``, its gradient as ``∇_V`` and ``∇_m`` (see the
    module docstring), its parameters as ``V`` and ``m``. ``inner``'s updates
    ``(ΔV, Δm)`` are *final* updates (learning rate included); the returned
    update of W is ``(m + Δm) ⊙ (V + ΔV)/‖V + ΔV‖_c − W``. Every other leaf
    passes through ``inner`` unchanged, in ``D``.

    Args:
      inner: an optax transformation over the reparameterized tree, ending
        with the learning rate. Extra keyword arguments of ``update`` are
        passed on to it.
      label_fn: which matrices are reparameterized: a function of the params
        (or a tree) giving per leaf False/None or True (or a rank, which
        :func:`scale_by_gradnorm_lorp` reads); default
        :func:`~jaxopt_lab.lowrank.default_label_fn`.

    Returns:
      A transformation whose ``update`` needs ``params``.
    """
    label_fn = default_label_fn if label_fn is None else label_fn
    inner = optax.with_extra_args_support(inner)

    def parts(treedef, directions, magnitudes):
        return WeightNormParts(treedef.unflatten(directions), treedef.unflatten(magnitudes))

    def init_fn(params):
        chosen = _selected_indices(params, label_fn)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        mags, norms, directions = [optax.MaskedNode()] * len(leaves), [optax.MaskedNode()] * len(leaves), list(leaves)
        for i in chosen:  # m₀ = ‖W‖_c = ‖V₀‖_c, two buffers (a donated state must not alias)
            w = leaves[i].astype(jnp.float32)
            mags[i], norms[i], directions[i] = _col_norm(w), _col_norm(w), w
        magnitude = treedef.unflatten(mags)
        return WeightNormState(magnitude, treedef.unflatten(norms), inner.init(parts(treedef, directions, mags)))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("gradnorm_lorp / weight_normalized needs params: call update(grads, state, params)")
        chosen = _selected_indices(params, label_fn)
        treedef = jax.tree_util.tree_structure(params)
        p_leaves, g_leaves = treedef.flatten_up_to(params), treedef.flatten_up_to(updates)
        mags, norms = treedef.flatten_up_to(state.magnitude), treedef.flatten_up_to(state.direction_norm)
        grad_v, grad_m, param_v, units = list(g_leaves), [optax.MaskedNode()] * len(g_leaves), list(p_leaves), {}
        for i in chosen:
            m, nu = mags[i], norms[i]
            w, g = p_leaves[i].astype(jnp.float32), g_leaves[i].astype(jnp.float32)
            unit = _safe_div(w, _col_norm(w)) * jnp.where(m < 0, -1.0, 1.0)  # û = V/‖V‖ = W/m
            grad_m[i] = jnp.sum(unit * g, axis=0)
            grad_v[i] = _safe_div(m, nu) * (g - unit * grad_m[i])
            param_v[i] = nu * unit
            units[i] = unit
        inner_updates, inner_state = inner.update(parts(treedef, grad_v, grad_m), state.inner,
                                                  parts(treedef, param_v, mags), **extra_args)
        out = treedef.flatten_up_to(inner_updates.direction)
        dms = treedef.flatten_up_to(inner_updates.magnitude)
        new_mags, new_norms = list(mags), list(norms)
        for i in chosen:
            v_new = norms[i] * units[i] + out[i].astype(jnp.float32)
            new_norms[i] = _col_norm(v_new)
            new_mags[i] = mags[i] + dms[i].astype(jnp.float32)
            w_new = new_mags[i] * _safe_div(v_new, new_norms[i])
            out[i] = (w_new - p_leaves[i].astype(jnp.float32)).astype(g_leaves[i].dtype)
        new_state = WeightNormState(treedef.unflatten(new_mags), treedef.unflatten(new_norms), inner_state)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _direction_labels(label_fn):
    """A label function over a reparameterized tree: on each selected leaf of ``direction``,
    ``label_fn``'s label for its W (True when ``label_fn`` is None); False everywhere else."""

    def labels(tree):
        view = tree.direction
        selected = _selected_flags(tree)
        if label_fn is None:
            flat = [True] * len(selected)
        else:
            on_view = label_fn(view) if callable(label_fn) else label_fn
            flat = jax.tree_util.tree_structure(view).flatten_up_to(on_view)
        out = []
        for is_selected, label, (path, _) in zip(selected, flat, jax.tree_util.tree_flatten_with_path(view)[0]):
            on = label is not None and label is not False
            if is_selected:
                out.append(label if on else False)
            elif on and label_fn is not None:
                raise ValueError(f"the label function selected {jax.tree_util.keystr(path)}, which is not "
                                 "weight-normalized: GradNormLoRP projects only the directions of weight_normalized")
            else:
                out.append(False)
        return WeightNormParts(jax.tree_util.tree_structure(view).unflatten(out),
                               jax.tree.map(lambda _: False, tree.magnitude))

    return labels


def scale_by_gradnorm_lorp(
    rank: int | float = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    inner: optax.GradientTransformation | None = None,
    projector: Any = "svd",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
) -> optax.GradientTransformation:
    """GaLore on the directions of a weight-normalized tree: ``α·P·inner(Pᵀ∇_V)``; ``inner`` elsewhere.

    Works on the tree :func:`weight_normalized` passes to its inner
    transformation, a :class:`WeightNormParts`: the direction V of each
    weight-normalized matrix is projected (oriented and refreshed as in
    :func:`~jaxopt_lab.lowrank.scale_by_galore`), magnitudes and every other
    leaf go to ``inner`` at full size.

    Args:
      rank, update_proj_gap, scale, projector, side, stagger, seed: as
        :func:`~jaxopt_lab.lowrank.scale_by_galore`.
      inner: the optimizer on the low-rank direction gradients, the
        magnitudes and the other leaves; ``optax.scale_by_adam()`` by default.
      label_fn: the label function of :func:`weight_normalized`, over the
        original tree (each direction read as its W); a rank label sets that
        matrix's rank. Default: every weight-normalized matrix at ``rank``.
    """
    check.positive("scale", scale)
    return scale_by_projected(
        inner=optax.scale_by_adam() if inner is None else inner,
        rank=rank, update_proj_gap=update_proj_gap, projector=projector, side=side,
        label_fn=_direction_labels(label_fn), stagger=stagger, seed=seed, finish=_galore_finish(scale),
    )


def gradnorm_lorp(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    projector: Any = "svd",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """GradNormLoRP-AdamW: weight normalization of the selected matrices, GaLore-Adam on the directions.

    ``weight_normalized(chain(scale_by_gradnorm_lorp(...Adam moments), bias
    correction, weight decay on magnitudes and other leaves, learning rate))``;
    see the module docstring. ``update`` needs ``params``. Arguments other than ``label_fn`` are
    those of :func:`~jaxopt_lab.lowrank.galore` (``rank``, ``update_proj_gap`` and ``seed`` are
    ``static_args`` under ``optax.inject_hyperparams``).

    Args:
      label_fn: which matrices are weight-normalized and projected (a rank
        label sets that matrix's rank); default
        :func:`~jaxopt_lab.lowrank.default_label_fn`.
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)
    check.non_negative("weight_decay", weight_decay)
    label_fn = default_label_fn if label_fn is None else label_fn
    resolved = get_projector(projector)

    def decay_mask(tree):  # every leaf but the directions V
        flags = [not selected for selected in _selected_flags(tree)]
        return WeightNormParts(jax.tree_util.tree_structure(tree.direction).unflatten(flags),
                               jax.tree.map(lambda _: True, tree.magnitude))

    inner = optax.chain(
        scale_by_gradnorm_lorp(rank, update_proj_gap, scale, scale_by_adam_moments(b1, b2, eps), resolved, side,
                               label_fn, stagger, seed),
        scale_by_adam_bias_correction(b1, b2),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    tx = weight_normalized(inner, label_fn)

    def init_fn(params):  # name errors (rank, shapes) after the user's tree, before the reparameterization
        leaf_specs(params, rank=rank, update_proj_gap=update_proj_gap, side=side, label_fn=label_fn,
                   projector=resolved, stagger=stagger)
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, tx.update)
