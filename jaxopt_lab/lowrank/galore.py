"""GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
(Zhao et al., ICML 2024).

For each projected matrix with gradient G (oriented d × k, d the projected
side) and projector P (d × r), refreshed from G every T steps:

    R_t = Pᵀ G_t                       (r × k)
    N_t = inner(R_t)                   (Adam: m̂_t / (√v̂_t + ε), moments r × k)
    ΔW_t = α · P N_t                   (d × k)

The inner optimizer's moments are kept across refreshes, as in the paper and
its official code. Every other parameter goes to the inner optimizer at full
size. Official defaults: T = 200, α = 0.25, the smaller side projected.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from jaxopt_lab.lowrank._adam import scale_by_adam_bias_correction, scale_by_adam_moments
from jaxopt_lab.lowrank._fused import fused_impl, fused_prepare, galore_fused_finish
from jaxopt_lab.lowrank._projected import scale_by_projected
from jaxopt_lab.lowrank._weight_decay import decay_updated_weights
from jaxopt_lab.transforms import _validation as check


def _galore_finish(scale):  # the unfused path: XLA matmuls
    def finish(spec, pstate, g, low, direction, extra, count):
        del g, low, count
        return scale * spec.project_back(pstate, direction), extra

    return finish


def scale_by_galore(
    rank: int | float = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    inner: Optional[optax.GradientTransformation] = None,
    projector: Any = "svd",
    side: str = "smaller",
    label_fn: Any = None,
    stagger: bool = False,
    seed: int = 0,
    fused: bool | str = False,
) -> optax.GradientTransformation:
    """GaLore's direction α·P·inner(PᵀG) for projected matrices, inner(G) elsewhere.

    Args:
      rank: projection rank r, an int or a fraction of the smaller dimension
        in (0, 1]. A matrix whose smaller dimension is below an int rank is
        projected at full rank min(m, n) (as ``optax.contrib.galore``); a
        rank given to one matrix by ``label_fn`` must fit it.
      update_proj_gap: refresh period T of each projector.
      scale: α, applied to the projected-back update.
      inner: the optimizer run on the low-rank gradients (and on every
        non-projected parameter); ``optax.scale_by_adam()`` by default. It
        receives no ``params``.
      projector: a :class:`~jaxopt_lab.lowrank.projectors.Projector` or its
        name: ``"svd"`` (default), ``"randomized_svd"``, ``"dct"``,
        ``"random"``, ``"int4_svd"``, ``"int4_randomized_svd"``.
      side: ``"smaller"`` projects the smaller dimension (official GaLore),
        ``"larger"`` the larger one (``optax.contrib.galore``).
      label_fn: which parameters are projected: a function of the params tree
        (or a tree) giving per leaf False/None (plain inner optimizer), True
        (project at ``rank``) or an int/fraction (project at that rank).
        Default: :func:`~jaxopt_lab.lowrank.default_label_fn` (2-D matrices
        except embeddings and the output head).
      stagger: spread the refreshes of the projected matrices evenly over the
        period, so that no step after the first pays every SVD.
      seed: seeds the randomized projectors (a refresh's key is derived from
        the seed, the matrix and the step).
      fused: project and project back with the Pallas kernels of
        :mod:`jaxopt_lab.kernels.lowrank_step` (``True``: Pallas on GPU/TPU,
        XLA elsewhere; or a kernel ``impl`` such as ``"interpret"``).
    """
    check.positive("scale", scale)
    hooks = {"finish": _galore_finish(scale)}
    if fused is not False:
        impl = fused_impl(fused)
        hooks = {"finish": galore_fused_finish(scale, impl), "prepare": fused_prepare(impl)}
    return scale_by_projected(
        inner=optax.scale_by_adam() if inner is None else inner,
        rank=rank, update_proj_gap=update_proj_gap, projector=projector, side=side,
        label_fn=label_fn, stagger=stagger, seed=seed, **hooks,
    )


def galore(
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
    fused: bool | str = False,
) -> optax.GradientTransformation:
    """GaLore-AdamW: :func:`scale_by_galore` over Adam, learning rate, then decoupled weight decay.

    ``W ← (1 − lr·λ) · (W − lr · α · P · Adam(PᵀG))``: as the official
    ``GaLoreAdamW``, the weight decay shrinks the weights *after* the Adam step
    (:func:`~jaxopt_lab.lowrank._weight_decay.decay_updated_weights`; optax's
    AdamW order ``W − lr (U + λW)`` differs by lr²·λ·U). See :func:`scale_by_galore`.

    Under ``optax.inject_hyperparams`` list the int arguments ``rank``,
    ``update_proj_gap`` and ``seed`` in ``static_args`` (they fix shapes and
    keys; a JAX array there is refused with that hint).
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    check.non_negative("eps", eps)
    check.non_negative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_galore(rank, update_proj_gap, scale, scale_by_adam_moments(b1, b2, eps), projector, side, label_fn,
                        stagger, seed, fused),
        scale_by_adam_bias_correction(b1, b2),
        optax.scale_by_learning_rate(learning_rate),
        decay_updated_weights(learning_rate, weight_decay),
    )
