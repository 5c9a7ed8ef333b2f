"""The speed-only paths of the projectors and the shared machinery give the same numbers.

* the Gram-eigh refresh (``svd_projector("gram")``, the default for d ≤ k)
  against LAPACK's SVD, in float32, on gradient-like spectra;
* the projection through a materialized Pᵀ and the back-projection in the
  stored layout of a tall matrix, against float64 numpy;
* the refresh stays inside ``lax.cond``: a step's top-level program has no
  eigensolver or SVD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import galore, svd_projector
from jaxopt_lab.lowrank.projectors import (
    BasisState,
    basis_projector,
    get_projector,
    project_onto,
)

RNG = np.random.default_rng(7)


def primitives_of(jaxpr, enter_cond=True) -> set[str]:
    """Names of the primitives in ``jaxpr`` and the jaxprs nested in it (cond branches if ``enter_cond``)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(str(eqn.primitive))
        if str(eqn.primitive) == "cond" and not enter_cond:
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= primitives_of(inner, enter_cond)
    return names


def gradient_like(d, k, decay=0.9):
    """A d × k matrix with geometrically decaying singular values (distinct, like a gradient's)."""
    u, _ = np.linalg.qr(RNG.standard_normal((d, d)))
    v, _ = np.linalg.qr(RNG.standard_normal((k, d)))
    s = 10.0 * decay ** np.arange(d)
    return ((u * s) @ v.T).astype(np.float32), u


@pytest.mark.parametrize("d, k, rank", [(32, 128, 8), (64, 64, 16), (20, 300, 5)])
def test_gram_refresh_matches_lapack_svd(d, k, rank):
    g, u = gradient_like(d, k)
    gram = np.asarray(svd_projector("gram").init(jnp.asarray(g), rank, None).basis, np.float64)
    lapack = np.asarray(svd_projector("svd").init(jnp.asarray(g), rank, None).basis, np.float64)
    np.testing.assert_allclose(gram.T @ gram, np.eye(rank), atol=1e-5)
    # the same vectors, signs fixed the same way (distinct singular values: unique up to sign)
    np.testing.assert_allclose(gram, lapack, atol=2e-4)
    # both are the top-r left singular subspace of the float64 matrix
    np.testing.assert_allclose(gram @ gram.T, u[:, :rank] @ u[:, :rank].T, atol=2e-4)


def test_auto_uses_gram_when_d_le_k_and_svd_otherwise():
    def primitives(method, shape):
        jaxpr = jax.make_jaxpr(lambda g: svd_projector(method).init(g, 2, None))(jnp.zeros(shape))
        return primitives_of(jaxpr.jaxpr)

    assert "eigh" in primitives("auto", (4, 9)) and "svd" not in primitives("auto", (4, 9))
    assert "svd" in primitives("auto", (9, 4)) and "eigh" not in primitives("auto", (9, 4))
    assert "eigh" in primitives("gram", (9, 4)) and "svd" in primitives("svd", (4, 9))
    g = RNG.standard_normal((9, 4)).astype(np.float32)  # d > k: the SVD, as LAPACK gives it
    np.testing.assert_array_equal(np.asarray(svd_projector().init(jnp.asarray(g), 3, None).basis),
                                  np.asarray(svd_projector("svd").init(jnp.asarray(g), 3, None).basis))
    with pytest.raises(ValueError, match="method must be one of"):
        svd_projector("qr")
    # selectable by name, e.g. from an experiment config
    assert [get_projector(n).name for n in ("svd", "svd_gram", "svd_lapack", "int4_svd_gram")] == [
        "svd", "svd_gram", "svd_lapack", "int4_svd_gram"]


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=["wide", "tall"])
def test_projection_fast_paths_equal_float64(shape):
    # project_onto(P, G) = Pᵀ G, and GaLore's update on a tall matrix (projected on its columns,
    # back-projected in the stored layout) = (P Pᵀ Gᵀ)ᵀ, with an identity inner optimizer
    g = RNG.standard_normal(shape).astype(np.float32)
    oriented = g if shape[0] <= shape[1] else g.T
    p = np.linalg.qr(RNG.standard_normal((oriented.shape[0], 4)))[0].astype(np.float32)
    np.testing.assert_allclose(np.asarray(project_onto(jnp.asarray(p), jnp.asarray(oriented))),
                               p.astype(np.float64).T @ oriented, rtol=1e-5, atol=1e-5)
    fixed = basis_projector("fixed", lambda grad, rank, key: jnp.asarray(p))
    from jaxopt_lab.lowrank import scale_by_galore

    tx = scale_by_galore(rank=4, update_proj_gap=5, scale=1.0, inner=optax.identity(), projector=fixed,
                         label_fn={"w": True})
    state = tx.init({"w": jnp.zeros(shape)})
    out, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state)
    step = p.astype(np.float64) @ (p.T.astype(np.float64) @ oriented)
    np.testing.assert_allclose(np.asarray(out["w"]), step if shape[0] <= shape[1] else step.T, rtol=1e-5, atol=1e-5)
    assert isinstance(state.projectors, BasisState)


@pytest.mark.parametrize("projector", ["svd", "randomized_svd"])
def test_refresh_is_only_inside_the_cond(projector):
    tx = galore(1e-3, rank=2, update_proj_gap=3, projector=projector, label_fn={"w": True})
    params = {"w": jnp.zeros((6, 10))}
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    outside = primitives_of(jaxpr.jaxpr, enter_cond=False)
    assert "cond" in outside and not outside & {"eigh", "svd", "qr", "householder_product", "geqrf"}
    assert primitives_of(jaxpr.jaxpr) & {"eigh", "svd", "householder_product", "geqrf"}  # inside the cond
