r"""DiPaCo: paths through shared modules, each path trained by one worker, modules kept in sync DiLoCo-style.

Douillard et al., "DiPaCo: Distributed Path Composition" (2024),
https://arxiv.org/abs/2403.10616.

The model is a set of *modules* arranged in levels; a *path* picks one module
per level (a 2-level grid of K1 x K2 modules has K1·K2 paths, e.g. the first
half of a GPT's blocks from level 1, the second half from level 2). Each worker
holds one path (a model of one path's size) and trains it on the data the
router sends to that path. Every H inner steps the outer gradient of module m
is averaged over the workers whose paths contain m only, and the outer
optimizer steps module m:

.. math::
    \Delta_m = \frac{1}{|W_m|}\sum_{w \in W_m} \bigl(\theta_m^{(t-H)} - \theta_{w,m}^{(t)}\bigr), \qquad
    \theta_m^{(t)} = \theta_m^{(t-H)} + \mathrm{OuterOpt}(\Delta_m),

with :math:`W_m` the workers whose path contains m: the uniform mean over the
paths that contain the module, the paper's rule as we read it (no official
code is public; a weighting by shard size would be an option to add).
Parameters shared by every path (here: the embeddings, final norm and head,
``level = SHARED``) are averaged over all workers, as DiLoCo does. With one
path (every level a single module) this is DiLoCo (tested bit for bit).

At inference one path runs per input, the router's. As in the paper, sequences
are assigned to paths offline from a fixed feature of the text, so each
worker's shard and each test input's path are known before training. The paper
clusters a pretrained model's embedding of the first tokens with k-means
(:func:`kmeans_router`, :func:`route`); with no pretrained model here the
feature is a byte histogram (:func:`byte_histogram`), and :func:`grid_router`
(:func:`route_grid`) makes the assignment balanced: one principal direction
per level, cut at quantiles, so every module gets an equal share of the data
(k-means on the byte histogram did not: see ``scripts/dipaco_lm.py``).

Not done: absent workers (DiLoCo's ``present``), compressed outer gradients,
and routing again every few tokens at test time (a variant the paper evaluates).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed import collectives
from jaxopt_lab.distributed.accounting import CommBytes, add_bytes, axis_size, ring_all_reduce_bytes, zero_comm
from jaxopt_lab.distributed.diloco import diloco_inner, diloco_outer
from jaxopt_lab.distributed.sync import NO_SYNC, check_sync

AxisName = Any
SHARED = -1  # the level of parameters every path contains (averaged over all workers)


class DiPaCoState(NamedTuple):
    step: jax.Array  # inner steps taken
    anchor: optax.Params  # this worker's path at the last synchronization
    inner_state: optax.OptState
    outer_state: optax.OptState
    # one CommBytes per group of parameters: bytes_sent[0] the shared parameters, bytes_sent[1 + l]
    # this worker's module at level l (so communicated_bytes(state) is the worker's total)
    bytes_sent: tuple
    next_sync: jax.Array  # int32: 0 if the next update synchronizes, else -1 (see distributed.sync)


def grid_paths(*modules_per_level: int) -> list[tuple[int, ...]]:
    """Every path of a grid: ``grid_paths(2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]`` (row-major)."""
    for k in modules_per_level:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"modules per level must be ints >= 1, got {modules_per_level!r}")
    return list(itertools.product(*(range(k) for k in modules_per_level)))


def check_paths(paths: Sequence[Sequence[int]]) -> np.ndarray:
    """``paths`` as an int array (W, L); every module index of a level from 0 to its max is in some path."""
    try:
        table = np.asarray(paths)
    except ValueError:
        table = None
    if table is None or table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1 \
            or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"paths must be a non-empty list of equal-length tuples of module indices, got {paths!r}")
    if (table < 0).any():
        raise ValueError(f"module indices in paths must be >= 0, got {paths!r}")
    for level in range(table.shape[1]):
        missing = sorted(set(range(table[:, level].max() + 1)) - set(table[:, level].tolist()))
        if missing:
            raise ValueError(f"module(s) {missing} of level {level} are in no worker's path: no worker "
                             f"would train them (paths {table.tolist()})")
    return table.astype(np.int32)


def module_counts(paths: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per level, the number of workers whose path contains each module: ``counts[l][k]``."""
    table = check_paths(paths)
    return [np.bincount(table[:, level]) for level in range(table.shape[1])]


def gpt_levels(params: Any, num_levels: int = 2) -> Any:
    """Levels of a :class:`~jaxopt_lab.models.gpt.GPT`'s parameters (an ``nnx.to_pure_dict``).

    Block ``b`` of ``L`` goes to level ``b * num_levels // L`` (contiguous groups
    of blocks, the first group level 0); everything else (embeddings, final
    norm, head) is :data:`SHARED`. Returns a tree of ints with ``params``'s structure.
    """
    if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
        raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
    if not isinstance(params, dict) or "blocks" not in params:
        raise ValueError("gpt_levels expects a GPT's parameters as a pure dict with a 'blocks' entry")
    blocks = sorted(params["blocks"], key=int)
    if len(blocks) < num_levels:
        raise ValueError(f"a GPT of {len(blocks)} blocks cannot be split into {num_levels} levels")
    levels = {k: jax.tree.map(lambda _: SHARED, v) for k, v in params.items() if k != "blocks"}
    levels["blocks"] = {b: jax.tree.map(lambda _, i=i: i * num_levels // len(blocks), params["blocks"][b])
                        for i, b in enumerate(blocks)}
    return levels


def _labels(level_of: Any, params: Any) -> list[int]:
    tree = level_of(params) if callable(level_of) else level_of
    labels, treedef = jax.tree.flatten(tree)
    if treedef != jax.tree.structure(params):
        raise ValueError(f"level_of must give one level per parameter leaf (a tree like params), got {tree!r}")
    return [int(x) for x in labels]


def dipaco(
    paths: Sequence[Sequence[int]],
    level_of: Callable[[Any], Any] | Any,
    inner: optax.GradientTransformation | None = None,
    outer: optax.GradientTransformation | None = None,
    sync_every: int = 500,
    axis_name: AxisName = "workers",
) -> optax.GradientTransformationExtraArgs:
    r"""DiPaCo for one worker of a named worker axis; worker ``w`` trains path ``paths[w]``.

    Each worker's parameters are its path (one module per level plus the shared
    parameters). Every ``H = sync_every`` inner steps each module's outer
    gradient is averaged over the workers whose path contains it (module
    docstring) and the outer optimizer steps it; the shared parameters are
    averaged over all workers. Workers that share a module hold the same
    anchor, outer gradient and outer state for it, so they leave the
    synchronization with the same module parameters.

    How the per-module average is computed: for a level with K modules, each
    worker puts its outer gradient in row k = its module of a (K, ...) stack
    of zeros, the stack is summed over the worker axis
    (:func:`jaxopt_lab.distributed.collectives.psum`), and each worker divides
    row k by the static count of workers in module k. This masked psum moves K
    times the level's bytes across all workers; a deployed system all-reduces
    each module among its own workers only, which is what the byte accounting
    counts: per module, payload its bytes, wire a ring all-reduce among its
    :math:`c_m` workers, :math:`2 (c_m - 1)/c_m` times its bytes (nothing when
    one worker holds it). ``state.bytes_sent`` is a tuple: the shared
    parameters' count, then one per level (the worker's module there);
    :func:`module_bytes` sums them per module over the workers.

    Defaults are DiLoCo's and the paper's: inner AdamW (lr 4e-4, β = (0.9,
    0.95), weight decay 0.1), outer SGD with Nesterov momentum (lr 0.7,
    momentum 0.9). The outer optimizer runs once on the whole path with the
    per-module averages, so it must act leaf by leaf (SGD, Nesterov, Adam do;
    a global-norm clip would mix modules).

    Synchronization: as :func:`~jaxopt_lab.distributed.diloco`, ``update(...,
    sync=False/True)`` static (what ``state.next_sync`` says; used by
    ``WorkerRunner.map_sync``), or ``sync=None`` decided in the graph.

    Args:
      paths: one path per worker, ``paths[w][l]`` the module of level l on
        worker w (e.g. :func:`grid_paths` ``(2, 2)`` for 4 workers). Several
        workers may hold the same path (they average it as DiLoCo would). Every
        module index from 0 to a level's largest must be in some path.
      level_of: the level of each parameter leaf, ``SHARED`` (-1) for
        parameters in every path: a tree of ints like the parameters, or a
        function of the parameters returning one (e.g. :func:`gpt_levels`).
      inner: each worker's optimizer (default :func:`~jaxopt_lab.distributed.diloco_inner`).
      outer: the outer optimizer (default :func:`~jaxopt_lab.distributed.diloco_outer`).
      sync_every: H, inner steps between synchronizations.
      axis_name: the worker axis (its size must be ``len(paths)``).
    """
    table = check_paths(paths)
    counts = module_counts(table)
    num_levels = table.shape[1]
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if not callable(level_of) and not jax.tree.leaves(level_of):
        raise ValueError(f"level_of must be a tree of levels or a function of the parameters, got {level_of!r}")
    inner = optax.with_extra_args_support(diloco_inner() if inner is None else inner)
    outer = diloco_outer() if outer is None else outer

    def groups(params):
        """Leaf indices of each group: [shared, level 0, ..., level L-1]."""
        labels = _labels(level_of, params)
        bad = sorted({x for x in labels if not SHARED <= x < num_levels})
        if bad:
            raise ValueError(f"level_of gives level(s) {bad}; paths have {num_levels} levels "
                             f"(0..{num_levels - 1}, or SHARED = -1)")
        return [[i for i, x in enumerate(labels) if x == g] for g in range(SHARED, num_levels)]

    def next_sync_after(step):
        return jnp.where((step + 1) % sync_every == 0, 0, NO_SYNC).astype(jnp.int32)

    def init_fn(params):
        groups(params)  # checks level_of
        return DiPaCoState(
            step=jnp.zeros((), jnp.int32),
            anchor=params,
            inner_state=inner.init(params),
            outer_state=outer.init(params),
            bytes_sent=tuple(zero_comm() for _ in range(num_levels + 1)),
            next_sync=next_sync_after(jnp.zeros((), jnp.int32)),
        )

    def update_fn(grads, state, params=None, *, sync=None, **extra_args):
        sync = check_sync(sync, 1, "dipaco")
        if params is None:
            raise ValueError("dipaco needs params: call update(grads, state, params)")
        if "present" in extra_args:
            raise ValueError("dipaco does not take present (absent workers) yet")
        num_workers = axis_size(axis_name)
        if num_workers != table.shape[0]:
            raise ValueError(f"dipaco has {table.shape[0]} paths (one per worker) but the worker axis "
                             f"{axis_name!r} has {num_workers} workers")
        leaf_groups = groups(params)
        inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        step = state.step + 1

        def synchronize(_):
            local = optax.apply_updates(params, inner_updates)
            outer_grad, treedef = jax.tree.flatten(jax.tree.map(lambda a, p: a - p, state.anchor, local))
            worker = jax.lax.axis_index(axis_name)
            mine = jnp.asarray(table)[worker]  # this worker's module at each level
            averaged = list(outer_grad)
            sent = list(state.bytes_sent)
            for g, leaves in enumerate(leaf_groups):
                if not leaves:
                    continue
                deltas = [outer_grad[i] for i in leaves]
                nbytes = sum(math.prod(d.shape) * np.dtype(d.dtype).itemsize for d in deltas)
                level = g - 1
                if level == SHARED or len(counts[level]) == 1:  # every worker holds it: plain DiLoCo mean
                    means = collectives.pmean(deltas, axis_name)
                    wire = ring_all_reduce_bytes(nbytes, num_workers)
                else:  # masked psum: row k of the stack sums the workers of module k
                    k = mine[level]
                    onehot = jnp.arange(len(counts[level])) == k
                    stacks = [jnp.where(onehot.reshape((-1,) + (1,) * d.ndim), d[None], jnp.zeros((), d.dtype))
                              for d in deltas]
                    sums = collectives.psum(stacks, axis_name)
                    count = jnp.asarray(counts[level], jnp.float32)[k]
                    means = [(s[k] / count).astype(d.dtype) for s, d in zip(sums, deltas)]
                    per_module = np.array([ring_all_reduce_bytes(nbytes, int(c)) for c in counts[level]], np.int32)
                    wire = jnp.asarray(per_module)[k]
                for i, m in zip(leaves, means):
                    averaged[i] = m
                sent[g] = CommBytes(add_bytes(sent[g].payload, nbytes), add_bytes(sent[g].wire, wire))
            averaged = jax.tree.unflatten(treedef, averaged)
            outer_updates, outer_state = outer.update(averaged, state.outer_state, state.anchor)
            anchor = optax.apply_updates(state.anchor, outer_updates)
            updates = jax.tree.map(lambda n, p: n - p, anchor, params)
            return updates, anchor, outer_state, tuple(sent)

        def keep_going(_):  # the inner update as it is: no collective, no outer step
            updates = jax.tree.map(lambda u, p: jnp.asarray(u, p.dtype), inner_updates, params)
            return updates, state.anchor, state.outer_state, state.bytes_sent

        if sync is None:  # decided in the graph (under vmap: both branches run)
            out = jax.lax.cond(step % sync_every == 0, synchronize, keep_going, None)
        else:
            out = synchronize(None) if sync == 0 else keep_going(None)
        updates, anchor, outer_state, sent = out
        return updates, DiPaCoState(step, anchor, inner_state, outer_state, sent, next_sync_after(step))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _as_float(count) -> np.ndarray:
    return np.asarray(count.mib, np.float64) * (1 << 20) + np.asarray(count.rem, np.float64)


def module_bytes(state: DiPaCoState, paths: Sequence[Sequence[int]]) -> dict[Any, dict[str, float]]:
    """Bytes communicated per module, summed over the workers that hold it.

    ``state`` is the worker-stacked :class:`DiPaCoState` (leading axis W, on the
    host). Returns ``{"shared": {...}, (level, k): {"payload": ..., "wire": ...,
    "workers": c}}``: the payload and wire bytes all ``c`` workers holding the
    module sent for it (see :func:`dipaco` for the model).
    """
    table = check_paths(paths)
    out = {}
    shared = state.bytes_sent[0]
    out["shared"] = {"payload": float(_as_float(shared.payload).sum()), "wire": float(_as_float(shared.wire).sum()),
                     "workers": table.shape[0]}
    for level in range(table.shape[1]):
        count = state.bytes_sent[1 + level]
        payload, wire = _as_float(count.payload), _as_float(count.wire)
        for k in range(table[:, level].max() + 1):
            members = table[:, level] == k
            out[(level, k)] = {"payload": float(payload[members].sum()), "wire": float(wire[members].sum()),
                               "workers": int(members.sum())}
    return out


def modules_of(stacked_params: Any, paths: Sequence[Sequence[int]], level_of: Callable | Any) -> dict[Any, list]:
    """The modules held by the workers: ``{"shared": leaves, (level, k): leaves}`` (flat leaf lists).

    Taken from the first worker holding each module. ``stacked_params`` has a
    leading worker axis: pass the anchors (``state.anchor``), which every holder
    of a module has bit for bit after a synchronization; the parameters equal
    them to float rounding (a worker adds ``anchor - params`` to its parameters).
    """
    table = check_paths(paths)
    leaves, _ = jax.tree.flatten(stacked_params)
    labels = _labels(level_of, jax.tree.map(lambda x: x[0], stacked_params))
    out = {"shared": [leaf[0] for leaf, lab in zip(leaves, labels) if lab == SHARED]}
    for level in range(table.shape[1]):
        for k in range(table[:, level].max() + 1):
            w = int(np.flatnonzero(table[:, level] == k)[0])
            out[(level, k)] = [leaf[w] for leaf, lab in zip(leaves, labels) if lab == level]
    return out


def compose(modules: dict[Any, list], path: Sequence[int], like: Any, level_of: Callable | Any) -> Any:
    """The parameters of ``path`` assembled from :func:`modules_of`'s modules (a tree like ``like``)."""
    leaves, treedef = jax.tree.flatten(like)
    labels = _labels(level_of, like)
    taken = {"shared": iter(modules["shared"])}
    for level, k in enumerate(path):
        if (level, k) not in modules:
            raise ValueError(f"path {tuple(path)}: module {k} of level {level} does not exist")
        taken[level] = iter(modules[(level, k)])
    return jax.tree.unflatten(treedef, [next(taken["shared" if lab == SHARED else lab]) for lab in labels])


# --------------------------------------------------------------------------- routing


def byte_histogram(windows: np.ndarray, vocab: int = 256) -> np.ndarray:
    """The router's feature of each byte window (N, T): its normalized byte histogram (N, vocab), float64."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 1:
        raise ValueError(f"windows must be (N, T) with T >= 1, got shape {windows.shape}")
    hist = np.zeros((windows.shape[0], vocab))
    np.add.at(hist, (np.repeat(np.arange(windows.shape[0]), windows.shape[1]), windows.reshape(-1).astype(np.int64)), 1.0)
    return hist / windows.shape[1]


def kmeans_router(features: np.ndarray, num_paths: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Centroids (num_paths, D) of k-means (Lloyd, k-means++ seeding) on ``features`` (N, D); deterministic per seed.

    The paper routes offline with k-means on a fixed feature of each sequence;
    :func:`route` sends a sequence to its nearest centroid. A cluster that
    empties keeps its previous centroid.
    """
    x = np.asarray(features, np.float64)
    if not isinstance(num_paths, int) or isinstance(num_paths, bool) or num_paths < 1:
        raise ValueError(f"num_paths must be an int >= 1, got {num_paths!r}")
    if x.ndim != 2 or x.shape[0] < num_paths:
        raise ValueError(f"features must be (N, D) with N >= num_paths={num_paths}, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(x.shape[0])]]
    for _ in range(1, num_paths):  # k-means++: next centroid drawn by squared distance to the nearest
        d2 = np.min(((x[:, None, :] - np.asarray(centroids)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centroids.append(x[rng.choice(x.shape[0], p=d2 / total)] if total > 0 else x[rng.integers(x.shape[0])])
    centroids = np.asarray(centroids)
    for _ in range(iters):
        assign = route(x, centroids)
        for k in range(num_paths):
            if (assign == k).any():
                centroids[k] = x[assign == k].mean(axis=0)
    return centroids


def route(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The path of each sequence: the index of its nearest centroid (N,) int32."""
    x = np.asarray(features, np.float64)
    d2 = (x * x).sum(1)[:, None] - 2 * x @ np.asarray(centroids).T + (np.asarray(centroids) ** 2).sum(1)[None]
    return np.argmin(d2, axis=1).astype(np.int32)


class GridRouter(NamedTuple):
    """A product router for a grid of paths (:func:`grid_router`): level l's module from the l-th principal direction."""

    mean: np.ndarray  # (D,) feature mean
    directions: np.ndarray  # (L, D): the top-L principal directions of the features
    thresholds: tuple  # per level, the K_l - 1 quantiles of the projections that split it into K_l equal parts


def grid_router(features: np.ndarray, modules_per_level: Sequence[int]) -> GridRouter:
    """Fit a balanced product router on ``features`` (N, D): one principal direction per level, cut at quantiles.

    Level l's module is the bin, among ``modules_per_level[l]`` equal-count
    bins of the training features, of the projection on the l-th principal
    direction; so every module of a level gets the same share of the training
    sequences (k-means on a byte histogram gave shards of 36973, 296, 104 and
    897 windows on the Python-docs corpus, ``scripts/dipaco_lm.py --router kmeans``).
    The paper's router is k-means on a pretrained model's features
    (:func:`kmeans_router`); this is the same idea (an offline, fixed
    assignment from a feature) made balanced per level. Deterministic (an SVD).
    """
    x = np.asarray(features, np.float64)
    ks = list(modules_per_level)
    grid_paths(*ks)  # checks
    if x.ndim != 2 or x.shape[0] < max(ks) or x.shape[1] < len(ks):
        raise ValueError(f"features must be (N, D) with N >= {max(ks)} and D >= {len(ks)} levels, got {x.shape}")
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    directions = vt[: len(ks)] * np.sign(vt[: len(ks)].sum(axis=1, keepdims=True) + 1e-300)  # a fixed sign
    proj = (x - mean) @ directions.T
    thresholds = tuple(np.quantile(proj[:, level], np.arange(1, k) / k) for level, k in enumerate(ks))
    return GridRouter(mean, directions, thresholds)


def route_grid(features: np.ndarray, router: GridRouter) -> np.ndarray:
    """Each sequence's path as its row-major index into ``grid_paths(*modules_per_level)`` (N,) int32."""
    proj = (np.asarray(features, np.float64) - router.mean) @ router.directions.T
    index = np.zeros(proj.shape[0], np.int64)
    for level, cuts in enumerate(router.thresholds):
        index = index * (len(cuts) + 1) + np.searchsorted(cuts, proj[:, level], side="right")
    return index.astype(np.int32)
