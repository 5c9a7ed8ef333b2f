"""Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients (Zhang et al., 2024, https://arxiv.org/abs/2407.08296).

GaLore (see :mod:`jaxopt_lab.lowrank.galore`) with three changes:

1. **int4 projection.** Each projector's basis P is stored in int4, per group
   of 256 values, asymmetrically with a scale and a zero point, as the
   official ``q_galore_projector.py`` (:func:`~jaxopt_lab.lowrank.int4_projector`
   over the exact SVD projector, by default), laid out as it stores the basis:
   U[:, :r] row by row for a wide matrix, Vh[:r] row by row (the groups run
   along each singular vector) for a tall or square one.
2. **Lazy, layer-adaptive refresh.** At each refresh of a matrix's projector
   the new basis is computed and the cosine similarity of the successive
   leading singular vectors (taken before quantization, as the official code)::

       c_k = ⟨p_k, p_{k−1}⟩ / (‖p_k‖ ‖p_{k−1}‖)      (p = first column of P)

   is pushed into that matrix's queue of the last ``queue_size`` values
   (first-in first-out). When the queue is full and its mean is at least
   ``cos_threshold``, the matrix's refresh period is multiplied by
   ``gamma_proj``:  T ← γ · T (the queue is not cleared, so every further
   refresh of a stable matrix multiplies T again). The projector refreshes
   at the steps where ``step % T == 0`` (step = 0, 1, ...). A matrix whose
   subspace has stopped moving pays fewer and fewer SVDs; one whose subspace
   keeps rotating keeps T.
3. **int8 weights with stochastic rounding** (optional, :func:`int8_weights`):
   the parameters live on a per-group 8-bit grid (by default the official
   asymmetric uint8 grid with a zero point) and every update lands them on
   the grid with stochastic rounding, instead of being stored in 16/32 bits.
   Here the parameters stay float arrays holding grid values: a simulation
   of 8-bit weight storage.

The update of a projected matrix is GaLore's projection over the official
optimizer's Adam, bitsandbytes' (the official ``QGaLoreAdamW8bit`` runs
bitsandbytes' Adam kernel on the projected gradient): in the low-rank space
``R = Pᵀ G``, with the moments m, v of R and t the step,

    ΔW = α · P · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε),

ε beside the bias-corrected √v̂ (bitsandbytes' ``s1 / (√s2 + ε √(1 − β₂ᵗ))``
with ``step_size = lr √(1 − β₂ᵗ) / (1 − β₁ᵗ)``, i.e. optax's Adam; GaLore's
own code puts ε beside the uncorrected √v), and the weights are decayed after
the step, ``W ← (1 − lr λ)(W − lr ΔW)``, as the official optimizer does for
projected matrices and bitsandbytes' kernel for the others.

Defaults follow the official code (``VITA-Group/Q-GaLore``): queue size 5,
cosine threshold 0.4, γ = 2, int4 projection in groups of 256, int8 weights in
groups of 256, α = 0.25 and T = 200 (its pre-training scripts), weight decay
1e-2 and ε = 1e-8 (the ``QGaLoreAdamW8bit`` constructor, bitsandbytes' AdamW8bit).

``refresh="robust"`` (opt-in) changes two things of the lazy refresh. The
similarity is taken in absolute value, ``|c_k|``: a singular vector's sign is
arbitrary, and an SVD that flips it between two refreshes (LAPACK may, for
nearly the same matrix) turns c ≈ 1 into c ≈ −1, which stops the period from
growing for ``queue_size`` refreshes; our SVD projector fixes the signs, but
a user's projector may not. And the next refresh is ``T`` steps after the
current one, so a matrix is never refreshed sooner than its period; the
official ``step % T == 0`` refreshes at the next multiple of the new period,
which after a growth at a step that is not one comes only T_old steps later.

Adam's moments are stored as the official optimizer stores them: in 8 bits
(:func:`~jaxopt_lab.lowrank.scale_by_adam_8bit`, bitsandbytes' block-wise
dynamic quantization with its kernel's rounding and sign fix, blocks of 2048
as in the bitsandbytes 0.43.1 the official code pins; a state tensor, e.g. a
projected matrix's r × k moments, of fewer than 4096 values stays float32).
``adam_state="float32"`` (opt-in) keeps exact float32 moments.

Remaining differences from the official code:

* the singular vectors' signs are fixed (largest-magnitude entry positive);
  the official code takes LAPACK's, so its signed cosine can see a sign flip;
* :func:`int8_weights` starts from the float initial weights (an optax
  ``init`` cannot change the parameters); the official code rounds them onto
  the grid to nearest when it builds the model, so the two agree from the
  first update on;
* the 8-bit moments follow bitsandbytes' CUDA kernel up to float32 rounding
  (its ``__fdividef``, ``__powf`` and fused multiply-adds round differently
  from XLA's), so a moment within a float32 rounding of the midpoint between
  two codes may be stored with the neighbouring code.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.lowrank._projected import default_label_fn, scale_by_projected
from jaxopt_lab.lowrank._weight_decay import decay_updated_weights
from jaxopt_lab.lowrank.adam8bit import BLOCK_SIZE, MIN_8BIT_SIZE, _blocks, scale_by_adam_8bit
from jaxopt_lab.lowrank.galore import _galore_finish
from jaxopt_lab.lowrank.projectors import PROJECTORS, get_projector, int4_projector
from jaxopt_lab.transforms import _validation as check

MAX_PERIOD = 2**30  # the period stops growing here, so that step + period stays an int32


REFRESH_RULES = ("official", "robust")
ADAM_STATES = ("8bit", "float32")


class LazyRefreshState(NamedTuple):
    """One projected matrix's lazy-refresh bookkeeping.

    Attributes:
      previous: (d,) the leading vector of the previous basis (before quantization).
      queue: (queue_size,) the last similarities, oldest first.
      filled: how many entries of ``queue`` are valid (int32, at most queue_size).
      refreshes: how many refreshes this matrix had (int32).
    """

    previous: jax.Array
    queue: jax.Array
    filled: jax.Array
    refreshes: jax.Array


def _check_int(name, value, minimum):
    if isinstance(value, jax.Array):  # e.g. injected by optax.inject_hyperparams without static_args
        raise check.not_static(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _lazy_refresh(queue_size: int, cos_threshold: float, gamma_proj: int, signed: bool):
    def init_extra(spec):
        return LazyRefreshState(jnp.zeros((spec.d,), jnp.float32), jnp.zeros((queue_size,), jnp.float32),
                                jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def on_refresh(spec, old, new, extra, period):
        del old
        vec = spec.projector.leading_vector(new, spec.d, spec.rank).astype(jnp.float32)
        prev = extra.previous
        cos = jnp.vdot(vec, prev) / jnp.maximum(jnp.linalg.norm(vec) * jnp.linalg.norm(prev), 1e-8)
        cos = cos if signed else jnp.abs(cos)
        has_previous = extra.refreshes > 0
        queue = jnp.where(has_previous, jnp.concatenate([extra.queue[1:], cos[None]]), extra.queue)
        filled = jnp.where(has_previous, jnp.minimum(extra.filled + 1, queue_size), extra.filled)
        stable = (filled == queue_size) & (jnp.mean(queue) >= cos_threshold)  # mean of a full queue
        # T·γ capped at MAX_PERIOD (where T > MAX_PERIOD // γ the int32 product may wrap; it is discarded)
        grown = jnp.where(period > MAX_PERIOD // gamma_proj, jnp.asarray(MAX_PERIOD, period.dtype), period * gamma_proj)
        period = jnp.where(stable, grown, period)
        return period, LazyRefreshState(vec, queue, filled, extra.refreshes + 1)

    return init_extra, on_refresh


def _projectors(projector, group_size):
    """The projectors of the wide and of the tall matrices (those projected on their second dimension).

    int4 storage given by default or by name (``"int4_svd"``, ``"int4_sym_svd"``, ...) is laid out as the
    official code stores the basis: U[:, :r] row by row for a wide matrix, Vh[:r] row by row (groups along
    each singular vector) for a tall one, in groups of ``group_size``. A Projector object serves both.
    """
    if projector is None:
        projector = "int4_svd"
    if isinstance(projector, str) and projector.startswith("int4_"):
        symmetric = projector.startswith("int4_sym_")
        base = projector[len("int4_sym_" if symmetric else "int4_"):]
        if base in PROJECTORS:
            make = PROJECTORS[base]
            return (int4_projector(make(), group_size, symmetric),
                    int4_projector(make(), group_size, symmetric, vector_major=True))
    projector = get_projector(projector)
    return projector, projector


def scale_by_q_galore(
    rank: int | float = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    inner: Optional[optax.GradientTransformation] = None,
    projector: Any = None,
    queue_size: int = 5,
    cos_threshold: float = 0.4,
    gamma_proj: int = 2,
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
    refresh: str = "official",
    proj_group_size: int = 256,
) -> optax.GradientTransformation:
    """Q-GaLore's direction: GaLore's ``α·P·inner(PᵀG)`` with an int4 basis and lazy refresh.

    Args:
      rank: projection rank r, an int (capped at min(m, n) per matrix) or a fraction
        of the smaller dimension in (0, 1].
      update_proj_gap: the initial refresh period T of each projector.
      scale: α, applied to the projected-back update.
      inner: the optimizer run on the low-rank gradients (and every
        non-projected parameter); by default Adam with 8-bit moments,
        :func:`~jaxopt_lab.lowrank.scale_by_adam_8bit` (the official
        optimizer's bitsandbytes ``AdamW8bit``).
      projector: a Projector or its name; default ``"int4_svd"``: the exact
        SVD basis in asymmetric int4 storage, laid out as the official code
        stores it (row by row for a wide matrix, along each singular vector
        for a tall one; :func:`~jaxopt_lab.lowrank.int4_projector` with
        ``vector_major``). A name ``"int4_<name>"`` gets the same layout; a
        Projector object is used as given for every matrix. It must have a
        leading vector (an SVD projector, int4 or not; not the random one).
      queue_size: how many successive similarities must be collected before
        the period can grow (official default 5).
      cos_threshold: the period grows when the mean of a full queue is at
        least this (in [0, 1]; official default 0.4).
      gamma_proj: the factor the period is multiplied by (an int ≥ 1;
        official default 2; 1 disables lazy refresh).
      side, label_fn, stagger, seed: as :func:`~jaxopt_lab.lowrank.scale_by_galore`
        (with ``stagger`` a matrix refreshes at the steps ≡ its offset mod T).
      refresh: ``"official"`` (default: signed cosine, refresh where
        ``step % T == 0``, as the official code) or ``"robust"`` (``|cos|``,
        refresh T steps after the last one: robust to SVD sign flips; see the
        module docstring).
      proj_group_size: values per int4 group of a projector given by default
        or by name (official default 256).

    The state is a :class:`~jaxopt_lab.lowrank.LowRankState` whose ``period``
    holds each matrix's current period and whose ``extra`` is a
    :class:`LazyRefreshState` laid out like the params (``state.extra.queue["w"]``;
    ``optax.MaskedNode()`` at a leaf that is not projected).
    """
    check.positive("scale", scale)
    _check_int("queue_size", queue_size, 1)
    _check_int("gamma_proj", gamma_proj, 1)
    check.require("cos_threshold", cos_threshold, lambda v: 0 <= v <= 1, "in [0, 1]")
    if refresh not in REFRESH_RULES:
        raise ValueError(f"refresh must be one of {REFRESH_RULES}, got {refresh!r}")
    _check_int("proj_group_size", proj_group_size, 2)
    projector, tall_projector = _projectors(projector, proj_group_size)
    try:  # a projector without a leading vector fails here, before any compute
        jax.eval_shape(lambda g: projector.leading_vector(projector.init(g, 1, jax.random.PRNGKey(0)), 2, 1),
                       jax.ShapeDtypeStruct((2, 2), jnp.float32))
    except ValueError as err:
        raise ValueError(f"Q-GaLore's lazy refresh needs a projector with a leading vector: {err}") from None
    official = refresh == "official"
    init_extra, on_refresh = _lazy_refresh(queue_size, cos_threshold, gamma_proj, signed=official)
    return scale_by_projected(
        inner=scale_by_adam_8bit() if inner is None else inner,
        rank=rank, update_proj_gap=update_proj_gap, projector=projector, side=side,
        label_fn=label_fn, stagger=stagger, seed=seed, finish=_galore_finish(scale),
        init_extra=init_extra, on_refresh=on_refresh, aligned_refresh=official, transposed_projector=tall_projector,
    )


def q_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    projector: Any = None,
    queue_size: int = 5,
    cos_threshold: float = 0.4,
    gamma_proj: int = 2,
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
    refresh: str = "official",
    proj_group_size: int = 256,
    adam_state: str = "8bit",
    min_8bit_size: int = MIN_8BIT_SIZE,
    adam_block_size: int = BLOCK_SIZE,
) -> optax.GradientTransformation:
    """Q-GaLore-AdamW: :func:`scale_by_q_galore` over Adam, learning rate, then decoupled weight decay.

    ``W ← (1 − lr·λ) · (W − lr · α · P · Adam(PᵀG))`` with P stored in int4 and
    refreshed lazily, Adam as bitsandbytes' 8-bit AdamW (ε beside the
    bias-corrected √v̂, moments stored in 8 bits), the weights decayed after
    the step, as the official optimizer; see the module docstring. For int8
    weights wrap the result: ``int8_weights(q_galore(...))``.

    The other arguments are those of :func:`scale_by_q_galore`.

    Args:
      learning_rate, b1, b2, eps: AdamW's (defaults: the official
        ``QGaLoreAdamW8bit``'s, bitsandbytes' AdamW8bit's).
      weight_decay: λ; default 1e-2, the official ``QGaLoreAdamW8bit``
        constructor's (its pre-training scripts pass 0).
      adam_state: ``"8bit"`` (default, as the official optimizer:
        :func:`~jaxopt_lab.lowrank.scale_by_adam_8bit`, the moments of every
        state tensor of at least ``min_8bit_size`` values, projected or
        not, stored as bitsandbytes' block-wise 8-bit codes) or
        ``"float32"`` (opt-in: :func:`optax.scale_by_adam`, exact float32
        moments, 4 bytes a value instead of about 1: no quantization error
        in the moments, e.g. to study the projection alone, or where memory
        is not the constraint).
      min_8bit_size: state tensors with fewer values keep float32 moments
        (bitsandbytes' default 4096).
      adam_block_size: values per quantization block (2048, as bitsandbytes
        0.43.1, which the official code pins; 256 from bitsandbytes 0.44).

    Under ``optax.inject_hyperparams`` list the int arguments ``rank``,
    ``update_proj_gap``, ``seed``, ``queue_size``, ``gamma_proj``,
    ``proj_group_size``, ``min_8bit_size`` and ``adam_block_size`` in
    ``static_args``.
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)
    check.non_negative("weight_decay", weight_decay)
    if adam_state not in ADAM_STATES:
        raise ValueError(f"adam_state must be one of {ADAM_STATES}, got {adam_state!r}")
    if adam_state == "8bit":
        adam = scale_by_adam_8bit(b1, b2, eps, block_size=adam_block_size, min_8bit_size=min_8bit_size)
    else:
        adam = optax.scale_by_adam(b1, b2, eps)
    return optax.chain(
        scale_by_q_galore(rank, update_proj_gap, scale, adam, projector, queue_size,
                          cos_threshold, gamma_proj, side, label_fn, stagger, seed, refresh, proj_group_size),
        optax.scale_by_learning_rate(learning_rate),
        decay_updated_weights(learning_rate, weight_decay),
    )


# ---------------------------------------------------------------------------------------------
# int8 weights with stochastic rounding


GRIDS = ("official", "symmetric")


class Int8WeightsState(NamedTuple):
    """State of :func:`int8_weights`.

    Attributes:
      key: (2,) uint32 raw key data, split at every step for the rounding.
      scales: a tree like the params: at each leaf stored in 8 bits, the
        (n_groups,) float32 grid scales of its current values;
        ``optax.MaskedNode()`` at a leaf kept in float (as the rest of the
        low-rank state: orbax cannot save the zero-size arrays stored there
        before, and ``optax.tree.map_params`` maps over it).
      zeros: likewise, the (n_groups,) float32 zero points (the official
        grid's; all 0 on the symmetric grid).
      inner: the wrapped transformation's state.
    """

    key: jax.Array
    scales: Any
    zeros: Any
    inner: optax.OptState


def stochastic_round_int8(x: jax.Array, key: jax.Array, group_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """``x`` rounded stochastically onto its symmetric per-group int8 grid.

    ``x`` is flattened and cut into groups of ``group_size`` (the last one
    zero-padded); each group has the scale ``s = max|x| / 127`` and its values
    become ``s · q`` with ``q = ⌊x / s + u⌋``, ``u ~ U[0, 1)``: q is one of the
    two integers around ``x / s`` (all within [−127, 127]) and ``E[s q] = x``.

    Returns ``(values, scales)``: the rounded values in ``x``'s shape and dtype,
    and the (n_groups,) float32 scales.
    """
    groups = _blocks(x.astype(jnp.float32), group_size)
    scales = jnp.max(jnp.abs(groups), axis=1) / 127.0
    safe = jnp.where(scales > 0, scales, 1.0)[:, None]
    u = jax.random.uniform(key, groups.shape, jnp.float32)
    q = jnp.clip(jnp.floor(groups / safe + u), -127, 127)  # the clip only removes float error at ±127
    values = (q * safe).reshape(-1)[: x.size].reshape(x.shape)
    return values.astype(x.dtype), scales


def stochastic_round_uint8(x: jax.Array, key: jax.Array, group_size: int = 256) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x`` rounded stochastically onto its asymmetric per-group uint8 grid, as the official Q-GaLore.

    The official ``_quantize_stochastic_round`` (``VITA-Group/Q-GaLore``,
    ``q_galore_torch/q_galore_adamw8bit.py``): per group of ``group_size``
    values (``x`` flattened; the official code requires ``group_size`` to
    divide the size, here a last partial group is padded with its last value,
    which leaves its min and max as they are)::

        s = max(max x − min x, 1e-5) / 255,      z = clip(−round(min x / s), 0, 255)
        y = x / s,  q = ⌈y⌉ if u < y − ⌊y⌋ else ⌊y⌋   (u ~ U[0, 1)),   q = clip(q + z, 0, 255)
        value = (q − z) · s

    Unbiased except where the clip bites (a value within one step of the
    grid's ends, off by the rounding of z).

    Returns ``(values, scales, zeros)``: the rounded values in ``x``'s shape
    and dtype, and the (n_groups,) float32 scales and zero points.
    """
    flat = x.astype(jnp.float32).reshape(-1)
    groups = _blocks(flat, group_size, pad_value=flat[-1])
    lo, hi = jnp.min(groups, axis=1), jnp.max(groups, axis=1)
    scales = jnp.maximum(hi - lo, 1e-5) / 255.0
    zeros = jnp.clip(-jnp.round(lo / scales), 0, 255)
    y = groups / scales[:, None]
    down = jnp.floor(y)
    u = jax.random.uniform(key, groups.shape, jnp.float32)
    q = jnp.clip(jnp.where(u < y - down, jnp.ceil(y), down) + zeros[:, None], 0, 255)
    values = ((q - zeros[:, None]) * scales[:, None]).reshape(-1)[: x.size].reshape(x.shape)
    return values.astype(x.dtype), scales, zeros


def int8_weights(
    tx: optax.GradientTransformation,
    group_size: int = 256,
    seed: int = 0,
    label_fn: Any = None,
    grid: str = "official",
) -> optax.GradientTransformation:
    """Simulated 8-bit weight storage (Q-GaLore): ``tx``'s updates land the weights on an 8-bit grid.

    For every selected parameter W, with ``U`` the update ``tx`` proposes:

        W_new = SR_8bit(W + U),     returned update = W_new − W

    where ``SR_8bit`` is, by default (``grid="official"``), the official
    code's stochastic rounding onto an asymmetric uint8 grid with a zero point
    recomputed from the new values' min and max
    (:func:`stochastic_round_uint8`). ``grid="symmetric"`` (opt-in) uses
    :func:`stochastic_round_int8` instead: symmetric scale ``max|x| / 127``,
    so that the rounding never needs clamping and is exactly unbiased (the
    official grid clamps at its ends and rounds its zero point, which can
    bias a group's extreme values by up to one step). The parameters stay float arrays that hold grid values
    (after the first update; the initial weights are taken as they are), which
    simulates storing them as int8 plus one float scale per group; the state
    holds the rounding key and the current scales. Rounding ``W + U`` instead
    of ``W + U`` rounded to nearest keeps small updates alive in expectation,
    which is why Q-GaLore uses stochastic rounding.

    ``optax.apply_updates`` computes ``W + (W_new − W)``, which equals ``W_new``
    up to one float rounding.

    Args:
      tx: the optimizer whose updates are rounded (e.g. :func:`q_galore`).
      group_size: values per quantization group (official default 256).
      seed: seeds the rounding noise.
      label_fn: which parameters are stored in int8: a function of the params
        (or a tree) giving True/False per leaf; default
        :func:`~jaxopt_lab.lowrank.default_label_fn` (the attention and MLP
        matrices, as the official code). Selected leaves must be floating.
      grid: ``"official"`` (default) or ``"symmetric"``, above.

    Under ``optax.inject_hyperparams`` list ``group_size`` and ``seed`` in
    ``static_args``.

    Returns:
      A transformation whose ``update`` needs ``params``.
    """
    if isinstance(group_size, jax.Array):  # e.g. injected by optax.inject_hyperparams without static_args
        raise check.not_static("group_size")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be an int > 0, got {group_size!r}")
    seed = check.static_int("seed", seed)
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    label_fn = default_label_fn if label_fn is None else label_fn

    def selected(params):
        labels = label_fn(params) if callable(label_fn) else label_fn
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        flags = []
        for (path, leaf), label in zip(leaves_with_path, treedef.flatten_up_to(labels)):
            on = label is not None and label is not False
            if on and not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise ValueError(f"int8_weights: {jax.tree_util.keystr(path)} has dtype {leaf.dtype}, not a float")
            flags.append(bool(on))
        return flags, treedef

    def init_fn(params):
        flags, treedef = selected(params)
        leaves = jax.tree_util.tree_leaves(params)
        groups = lambda: [jnp.zeros((-(-leaf.size // group_size),), jnp.float32) if on else optax.MaskedNode()  # noqa: E731
                          for on, leaf in zip(flags, leaves)]
        key = jax.random.key_data(jax.random.PRNGKey(seed)).astype(jnp.uint32)
        return Int8WeightsState(key, jax.tree_util.tree_unflatten(treedef, groups()),
                                jax.tree_util.tree_unflatten(treedef, groups()), tx.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("int8_weights needs params: call update(grads, state, params)")
        inner_updates, inner_state = tx.update(updates, state.inner, params, **extra_args) \
            if extra_args else tx.update(updates, state.inner, params)
        flags, treedef = selected(params)
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key, impl="threefry2x32"))
        out, scales, zeros = [], [], []
        leaves = zip(flags, jax.tree_util.tree_leaves(params), treedef.flatten_up_to(inner_updates),
                     treedef.flatten_up_to(state.scales), treedef.flatten_up_to(state.zeros))  # MaskedNode: kept in float
        for i, (on, p, u, s, z) in enumerate(leaves):
            if on:
                target = p.astype(jnp.float32) + u.astype(jnp.float32)
                leaf_key = jax.random.fold_in(step_key, i)
                if grid == "official":
                    rounded, s, z = stochastic_round_uint8(target, leaf_key, group_size)
                else:
                    rounded, s = stochastic_round_int8(target, leaf_key, group_size)
                u = (rounded - p.astype(jnp.float32)).astype(u.dtype)
            out.append(u)
            scales.append(s)
            zeros.append(z)
        new_state = Int8WeightsState(jax.random.key_data(key), jax.tree_util.tree_unflatten(treedef, scales),
                                     jax.tree_util.tree_unflatten(treedef, zeros), inner_state)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
