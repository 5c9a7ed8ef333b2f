"""The machinery every low-rank method shares: which leaves are projected,
on which side, at what rank, when each projector refreshes, and how the
inner optimizer runs on the low-rank gradients.

A method (GaLore, Fira, APOLLO, ...) is this machinery plus a ``finish`` hook
that turns, for one projected matrix, the oriented gradient ``G`` (d × k), its
projection ``R = Pᵀ G`` (r × k) and the inner optimizer's low-rank direction
``N`` (r × k) into the full-size update (d × k).

Orientation: the projected dimension comes first. ``side="smaller"`` (the
default, as the official GaLore code) projects the smaller of the matrix's two
dimensions; ``side="larger"`` projects the larger one (as
``optax.contrib.galore``). A matrix (m, n) whose projected side is ``n`` is
transposed to (n, m) before projection and transposed back after.

State layout: every per-matrix part of the state (the projectors, the
method's own state) is stored as trees like the params, one per array of the
per-matrix state, with ``optax.MaskedNode()`` at every leaf that is not
projected (as ``optax.masked`` does; ``optax.contrib.galore`` stores
zero-size arrays there, which orbax refuses to save). So the state's
structure does not depend on which leaves are matrices, and
``optax.tree.map_params`` maps a function over it, which is how sharding
specs for the optimizer state are derived from the params' specs (as for
any ``optax.masked`` state, pass ``is_leaf=lambda x: isinstance(x,
optax.MaskedNode)`` and return the node as it is)::

    optax.tree.map_params(tx, lambda v, spec: v if isinstance(v, optax.MaskedNode) else spec,
                          state, param_specs, transform_non_params=lambda _: PartitionSpec(),
                          is_leaf=lambda x: isinstance(x, optax.MaskedNode))

(the inner optimizer's moments of a projected matrix are r × k, not the
matrix's shape: ``f`` sees each value and may give those another spec).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.lowrank.projectors import Projector, get_projector
from jaxopt_lab.transforms import _validation as check

Array = jax.Array

DEFAULT_EXCLUDED = ("embed", "head")


class LowRankState(NamedTuple):
    """State of a low-rank method.

    Attributes:
      count: steps taken (int32).
      projectors: the projector's state type (e.g. ``BasisState``) whose
        every field is a tree like the params: the matrix's array at each
        projected leaf (``state.projectors.basis["w"]``), a zero-size
        ``optax.MaskedNode()`` elsewhere.
      next_refresh: (n_projected,) int32, the step at which each projector
        refreshes next (projected matrices in flatten order).
      period: (n_projected,) int32, each projector's refresh period (fixed for
        GaLore; lazy refresh doubles it).
      inner: the inner optimizer's state, over the low-rank tree (the params'
        tree with each projected matrix replaced by its r × k projection).
      extra: the method's own per-matrix state (e.g. Fira's norm-growth
        limiter, ``state.extra.previous_norm["w"]``), laid out as
        ``projectors``; ``()`` for a method without one.
    """

    count: Array
    projectors: tuple
    next_refresh: Array
    period: Array
    inner: optax.OptState
    extra: tuple


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Static facts about one projected matrix."""

    index: int  # position among all leaves (flatten order)
    path: str
    shape: tuple[int, int]
    transpose: bool  # True when the projected side is the second dimension
    rank: int
    offset: int  # first refresh after step 0 (staggering)
    projector: Projector

    @property
    def d(self) -> int:
        return self.shape[1] if self.transpose else self.shape[0]

    @property
    def k(self) -> int:
        return self.shape[0] if self.transpose else self.shape[1]

    def orient(self, x: Array) -> Array:
        return x.T if self.transpose else x

    def project(self, pstate, g: Array) -> Array:
        return self.projector.project(pstate, g, self.rank)

    def project_back(self, pstate, low: Array) -> Array:
        back = self.projector.project_back(pstate, low, self.d)
        if not self.transpose:
            return back
        # Speed only. The matrix is stored k × d: compute P·N in that layout (XLA folds the
        # inner transpose into the dot) and hand back its transpose as a view. The barrier
        # keeps XLA from folding the pair away, so the method's elementwise work on the
        # oriented (d × k) arrays and the final orient() become layout changes, not two
        # transposing copies of a d × k array (2-3× the whole step on CPU otherwise).
        return jax.lax.optimization_barrier(back.T).T


def default_label_fn(params) -> Any:
    """Projects every 2-D matrix except embeddings and the output head (as the papers).

    A leaf is projected when it is 2-D and its path contains neither
    ``"embed"`` nor ``"head"``: in :class:`jaxopt_lab.models.GPT` these are the
    attention (qkv, attn_out) and MLP (mlp_in, mlp_out) kernels.
    """

    def label(path, leaf):
        name = jax.tree_util.keystr(path).lower()
        return getattr(leaf, "ndim", 0) == 2 and not any(word in name for word in DEFAULT_EXCLUDED)

    return jax.tree_util.tree_map_with_path(label, params)


def _check_rank(rank, where: str = "") -> None:
    if isinstance(rank, jax.Array):
        raise check.not_static("rank")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int or a fraction in (0, 1], got {rank!r}{where}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"a fractional rank must be in (0, 1], got {rank!r}{where}")
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}{where}")


def resolve_rank(rank, shape, path: str, *, from_label: bool = False, cap: bool = True) -> int:
    """``rank`` as an int in [1, min(shape)]: an int as given, a float as a fraction of min(shape).

    The method's ``rank`` argument applies to every selected matrix, so a
    matrix smaller than it is projected at full rank ``min(m, n)``, as
    ``optax.contrib.galore`` does; a rank a label function gives one matrix
    (``from_label``) that is larger than it is an error. With ``cap=False``
    (a projector whose ``rank_above_dim``: random Gaussian) an int rank is
    kept as given.
    """
    smaller = min(shape)
    _check_rank(rank, f" for {path}")
    if isinstance(rank, float):
        return max(1, int(round(rank * smaller)))
    if rank > smaller and cap:
        if from_label:
            raise ValueError(f"the label function gives {path} {tuple(shape)} rank {rank}, larger than its "
                             f"smaller dimension {smaller}")
        return smaller
    return rank


def check_common(rank, update_proj_gap, side: str) -> None:
    """Errors for the arguments every low-rank method takes, raised when it is built."""
    _check_rank(rank)
    if isinstance(update_proj_gap, jax.Array):
        raise check.not_static("update_proj_gap")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
        raise ValueError(f"update_proj_gap (the refresh period T) must be an int > 0, got {update_proj_gap!r}")
    if side not in ("smaller", "larger"):
        raise ValueError(f"side must be 'smaller' or 'larger', got {side!r}")


def leaf_specs(updates, *, rank, update_proj_gap: int, side: str, label_fn, projector: Projector, stagger: bool):
    """The LeafSpec of every projected leaf of ``updates`` (flatten order)."""
    leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(updates)
    if not leaves_with_path:  # e.g. the empty placeholder tree of optax.tree.map_params
        return ()
    labels = label_fn if not callable(label_fn) else label_fn(updates)
    flat_labels = jax.tree_util.tree_structure(updates).flatten_up_to(labels)
    chosen = []
    for index, ((path, leaf), label) in enumerate(zip(leaves_with_path, flat_labels)):
        if label is None or label is False:
            continue
        name = jax.tree_util.keystr(path)
        shape = tuple(leaf.shape)
        if len(shape) != 2:
            raise ValueError(f"the label function selected {name} of shape {shape}: only 2-D matrices can be projected")
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(f"the label function selected {name} of dtype {leaf.dtype}: only real matrices can be "
                             "projected (leave complex parameters to the inner optimizer with label_fn)")
        cap = not projector.rank_above_dim
        r = (resolve_rank(rank, shape, name, cap=cap) if label is True
             else resolve_rank(label, shape, name, from_label=True, cap=cap))
        m, n = shape
        transpose = (m >= n) if side == "smaller" else (m < n)
        chosen.append((index, name, shape, transpose, r))
    total = len(chosen)
    return tuple(
        LeafSpec(index, name, shape, transpose, r, (i * update_proj_gap) // total if stagger else 0, projector)
        for i, (index, name, shape, transpose, r) in enumerate(chosen)
    )


class _Layout:
    """Stores a per-matrix state (a pytree, one structure for every matrix) as trees like the params.

    The per-matrix structure comes from ``example`` (evaluated abstractly),
    so it is known even when no leaf is projected (the empty placeholder tree
    of ``optax.tree.map_params``).
    """

    def __init__(self, example: Callable[[], Any]):
        abstract = jax.eval_shape(example)
        self.fields, self.treedef = jax.tree_util.tree_flatten(abstract)

    def scatter(self, params, specs, states) -> Any:
        """The laid-out state of ``params``: ``states[i]`` at leaf ``specs[i].index``, MaskedNode elsewhere."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        columns = [[optax.MaskedNode() for _ in leaves] for _ in self.fields]
        for spec, state in zip(specs, states):
            for column, value in zip(columns, self.treedef.flatten_up_to(state)):
                column[spec.index] = value
        return self.treedef.unflatten([treedef.unflatten(column) for column in columns])

    def gather(self, laid_out, treedef, specs) -> list:
        """The per-matrix states of ``specs`` from a laid-out state; ``treedef``: the params' structure."""
        columns = [treedef.flatten_up_to(tree) for tree in self.treedef.flatten_up_to(laid_out)]
        return [self.treedef.unflatten([column[spec.index] for column in columns]) for spec in specs]

    def replace(self, laid_out, treedef, specs, states) -> Any:
        """``laid_out`` with the states of ``specs`` replaced."""
        trees = []
        for k, tree in enumerate(self.treedef.flatten_up_to(laid_out)):
            column = treedef.flatten_up_to(tree)
            for spec, state in zip(specs, states):
                column[spec.index] = self.treedef.flatten_up_to(state)[k]
            trees.append(treedef.unflatten(column))
        return self.treedef.unflatten(trees)


def _key(seed: int, spec: LeafSpec, count: Array) -> Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), spec.index), count)


FinishFn = Callable[[LeafSpec, Any, Array, Array, Array, Any, Array], tuple[Array, Any]]
RefreshFn = Callable[[LeafSpec, Any, Any, Any, Array], tuple[Array, Any]]


def scale_by_projected(
    *,
    inner: optax.GradientTransformation,
    rank,
    update_proj_gap: int,
    projector,
    side: str,
    label_fn,
    stagger: bool,
    seed: int,
    finish: FinishFn,
    init_extra: Callable[[LeafSpec], Any] = lambda spec: (),
    on_refresh: Optional[RefreshFn] = None,
    prepare: Optional[Callable[[LeafSpec, Any, Array], tuple[Array, dict]]] = None,
    aligned_refresh: bool = False,
    transposed_projector=None,
) -> optax.GradientTransformation:
    """The shared low-rank transform; see the module docstring.

    ``finish(spec, pstate, G, R, N, extra, count) -> (update, extra)`` builds
    one matrix's oriented full-size update. ``on_refresh(spec, old_pstate,
    new_pstate, extra, period) -> (period, extra)`` may change a matrix's
    refresh period when it refreshes (lazy refresh). ``prepare(spec, pstate,
    raw_grad) -> (R, aux)`` replaces the projection ``R = Pᵀ G`` (a fused
    kernel reads the gradient as stored); ``aux`` is passed to ``finish`` as
    keyword arguments.

    A refresh at step ``count`` schedules the next one at ``count + period``;
    with ``aligned_refresh`` at the next step ≡ ``offset`` (mod period) instead
    (the official Q-GaLore's ``step % T == 0``; the same while the period is
    fixed, earlier after the period grows at a step that is not a multiple of
    the new period).

    ``transposed_projector`` (default: ``projector``) serves the matrices whose
    projected side is their second dimension (e.g. Q-GaLore's int4 storage,
    laid out as the official code stores a tall matrix's basis).

    ``update(..., refresh=False)`` (static) says no projector is due this
    step (``state.count < state.next_refresh`` everywhere), so no refresh is
    traced: under a worker ``vmap`` (a low-rank inner optimizer of DiLoCo) the
    in-graph ``lax.cond`` would be a select that decomposes every matrix on
    every step. The default ``None`` decides in the graph.
    ``jaxopt_lab.distributed.sync`` reads the state and passes it.
    """
    check_common(rank, update_proj_gap, side)
    projector = get_projector(projector)
    transposed_projector = projector if transposed_projector is None else get_projector(transposed_projector)
    label_fn = default_label_fn if label_fn is None else label_fn
    seed = check.static_int("seed", seed)
    example = LeafSpec(0, "", (2, 2), False, 1, 0, projector)  # any matrix: fixes the per-matrix structures
    pstate_layout = _Layout(lambda: projector.init(jnp.zeros((2, 2), jnp.float32), 1, jax.random.PRNGKey(0)))
    if transposed_projector is not projector:  # one laid-out tree per field: both must store the same fields
        other = _Layout(lambda: transposed_projector.init(jnp.zeros((2, 2), jnp.float32), 1, jax.random.PRNGKey(0)))
        if other.treedef != pstate_layout.treedef:
            raise ValueError(f"transposed_projector {transposed_projector.name!r} stores a state of structure "
                             f"{other.treedef}, projector {projector.name!r} one of {pstate_layout.treedef}: "
                             "the state is laid out per field, so both must store the same fields")
    extra_layout = _Layout(lambda: init_extra(example))

    def specs_of(tree):
        specs = leaf_specs(tree, rank=rank, update_proj_gap=update_proj_gap, side=side, label_fn=label_fn,
                           projector=projector, stagger=stagger)
        return tuple(dataclasses.replace(s, projector=transposed_projector) if s.transpose else s for s in specs)

    def low_rank_tree(tree, specs, lows):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        for spec, low in zip(specs, lows):
            leaves[spec.index] = low
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def init_fn(params):
        specs = specs_of(params)
        pstates = []
        for spec in specs:
            shape = jax.eval_shape(lambda g, key, r=spec.rank, p=spec.projector: p.init(g, r, key),
                                   jax.ShapeDtypeStruct((spec.d, spec.k), jnp.float32), jax.random.PRNGKey(0))
            pstates.append(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape))
        lows = [jnp.zeros((spec.rank, spec.k), jnp.float32) for spec in specs]
        inner_state = inner.init(low_rank_tree(params, specs, lows))
        next_refresh = jnp.zeros((len(specs),), jnp.int32)
        period = jnp.full((len(specs),), update_proj_gap, jnp.int32)
        return LowRankState(jnp.zeros([], jnp.int32), pstate_layout.scatter(params, specs, pstates), next_refresh,
                            period, inner_state, extra_layout.scatter(params, specs, [init_extra(s) for s in specs]))

    def update_fn(updates, state, params=None, *, refresh=None, **extra_args):
        del params, extra_args  # the inner optimizer sees low-rank gradients, which have no parameters
        if refresh not in (None, False) or isinstance(refresh, int) and not isinstance(refresh, bool):
            raise ValueError(f"refresh must be None (decided in the graph) or False (no projector is due: the "
                             f"caller knows from the state), got {refresh!r}")
        specs = specs_of(updates)
        leaves = jax.tree_util.tree_leaves(updates)
        count = state.count
        treedef = jax.tree_util.tree_structure(updates)
        old_pstates = pstate_layout.gather(state.projectors, treedef, specs)
        grads, lows, pstates, auxes, extras = [], [], [], [], extra_layout.gather(state.extra, treedef, specs)
        next_refresh, period = state.next_refresh, state.period
        for i, spec in enumerate(specs):
            raw = leaves[spec.index]
            g = spec.orient(raw.astype(jnp.float32))
            old = old_pstates[i]
            due = count >= next_refresh[i]

            def refresh_leaf(raw=raw, spec=spec, old=old, i=i):
                new = spec.projector.init(spec.orient(raw.astype(jnp.float32)), spec.rank, _key(seed, spec, count))
                leaf_period, extra = period[i], extras[i]
                if on_refresh is not None:
                    leaf_period, extra = on_refresh(spec, old, new, extra, leaf_period)
                first = jnp.where(count == 0, spec.offset, 0)  # staggered first period
                nxt = count + jnp.where(first > 0, first, leaf_period)
                if aligned_refresh:  # also gives the staggered first period: 0 + T − (−offset mod T)
                    nxt = count + leaf_period - jnp.mod(count - spec.offset, leaf_period)
                return new, leaf_period, nxt, extra

            def keep(old=old, i=i):
                return old, period[i], next_refresh[i], extras[i]

            if refresh is False:  # the host saw no projector due: no decomposition is traced
                pstate, leaf_period, nxt, extras[i] = keep()
            else:  # decided in the graph (under a worker vmap: a select that decomposes every step)
                pstate, leaf_period, nxt, extras[i] = jax.lax.cond(due, refresh_leaf, keep)
            period = period.at[i].set(leaf_period)
            next_refresh = next_refresh.at[i].set(nxt)
            grads.append(g)
            pstates.append(pstate)
            low, aux = (spec.project(pstate, g), {}) if prepare is None else prepare(spec, pstate, raw)
            lows.append(low)
            auxes.append(aux)
        directions, inner_state = inner.update(low_rank_tree(updates, specs, lows), state.inner)
        out = jax.tree_util.tree_leaves(directions)
        for i, spec in enumerate(specs):
            full, extras[i] = finish(spec, pstates[i], grads[i], lows[i], out[spec.index], extras[i], count, **auxes[i])
            out[spec.index] = spec.orient(full).astype(leaves[spec.index].dtype)
        for spec_index, leaf in enumerate(leaves):  # keep every other leaf's dtype as given
            if spec_index not in {s.index for s in specs}:
                out[spec_index] = out[spec_index].astype(leaf.dtype)
        new_updates = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), out)
        new_state = LowRankState(count + 1, pstate_layout.replace(state.projectors, treedef, specs, pstates),
                                 next_refresh, period, inner_state, extra_layout.replace(state.extra, treedef, specs, extras))
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
