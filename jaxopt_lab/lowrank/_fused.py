"""GaLore / Fira on the fused low-rank kernels (:mod:`jaxopt_lab.kernels.lowrank_step`).

``fused=True`` (or an ``impl`` name) in :func:`~jaxopt_lab.lowrank.galore` /
:func:`~jaxopt_lab.lowrank.fira` swaps two steps of the shared machinery for
the kernels: the projection ``R = PᵀG`` (pass 1, which also returns Fira's
column norms ``‖G_{:,j}‖²``, reading G once, as stored) and the projection
back with Fira's residual ``U = P M + G·diag(s)`` (pass 2, writing U once).
The inner optimizer still runs on the r × k arrays in between. The numbers
are those of the unfused path (tested); only the memory traffic changes.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxopt_lab.kernels.dispatch import check_impl
from jaxopt_lab.kernels.lowrank_step import lowrank_apply, lowrank_project
from jaxopt_lab.kernels.lowrank_step_reference import fira_combine
from jaxopt_lab.lowrank.projectors import BasisState


def fused_impl(fused):
    """``fused`` as a kernel ``impl``: True → None (auto: Pallas on GPU/TPU), a string → itself."""
    if fused is True:
        return None
    check_impl(fused)
    return fused


def basis_matrix(spec, pstate):
    """The projector's P (d × r) as a matrix (dequantized / regenerated if not stored)."""
    if isinstance(pstate, BasisState):
        return pstate.basis
    return spec.project_back(pstate, jnp.eye(spec.rank, dtype=jnp.float32))


def fused_prepare(impl):
    def prepare(spec, pstate, raw):
        p = basis_matrix(spec, pstate)
        low, g2 = lowrank_project(raw, p, transpose=spec.transpose, impl=impl)
        return low, {"raw": raw, "g2": g2, "p": p}

    return prepare


def galore_fused_finish(scale, impl):
    def finish(spec, pstate, g, low, direction, extra, count, raw, g2, p):
        out = lowrank_apply(None, p, scale * direction, None, transpose=spec.transpose, out_dtype=raw.dtype, impl=impl)
        return spec.orient(out), extra

    return finish


def fira_fused_finish(scale, growth_limit, impl, state_type):
    def finish(spec, pstate, g, low, direction, extra, count, raw, g2, p):
        def exact_norm(phi):  # the unfused residual, for a gradient nearly inside the projection (see fira_combine)
            # in G's stored layout: the oriented view of a tall G would be a transposing copy made every step
            back = spec.orient(spec.project_back(pstate, low))
            col = phi[:, None] if spec.transpose else phi[None, :]
            return jnp.linalg.norm((raw.astype(jnp.float32) - scale * back) * col)

        m, s, norm = fira_combine(low, direction.astype(jnp.float32), g2, p, extra.previous_norm, scale=scale,
                                  growth_limit=growth_limit, exact_norm=exact_norm)
        out = lowrank_apply(raw, p, m, s, transpose=spec.transpose, impl=impl)
        return spec.orient(out), state_type(norm)

    return finish
