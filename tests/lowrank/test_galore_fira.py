"""GaLore / Fira: identities, the two projection sides, refresh schedule, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import default_label_fn, fira, galore, scale_by_fira, scale_by_galore

RNG = np.random.default_rng(1)
PARAMS = {"w": jnp.asarray(RNG.standard_normal((8, 12)), jnp.float32),
          "t": jnp.asarray(RNG.standard_normal((10, 6)), jnp.float32),
          "b": jnp.zeros((12,), jnp.float32)}
GRADS = [jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), PARAMS) for _ in range(5)]
ALL = {"w": True, "t": True, "b": False}


def run(tx, grads=GRADS, params=PARAMS):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_galore_full_rank_sgd_inner_equals_sgd():
    # P Pᵀ = I at full rank, so α P (Pᵀ G) = G with α = 1
    tx = optax.chain(scale_by_galore(rank=1.0, update_proj_gap=2, scale=1.0, inner=optax.identity(), label_fn=ALL),
                     optax.scale(-0.1))
    ours, _ = run(tx)
    ref, _ = run(optax.sgd(0.1))
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(ref[k]), atol=1e-5)


def test_fira_full_rank_equals_galore():
    a, _ = run(fira(1e-2, rank=1.0, update_proj_gap=2, scale=1.0, label_fn=ALL))
    b, _ = run(galore(1e-2, rank=1.0, update_proj_gap=2, scale=1.0, label_fn=ALL))
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-5)


def _galore_numpy(w_grads, rank, side, scale=1.0, lr=1.0):
    """float64 GaLore with an identity inner on one matrix: Σ_t α P_t P_tᵀ G_t, P refreshed every step."""
    total = 0.0
    for g in w_grads:
        g = np.asarray(g, np.float64)
        m, n = g.shape
        project_rows = (m < n) if side == "smaller" else (m >= n)
        x = g if project_rows else g.T
        u = np.linalg.svd(x, full_matrices=False)[0][:, :rank]
        step = u @ (u.T @ x)
        total = total + scale * (step if project_rows else step.T)
    return -lr * total


@pytest.mark.parametrize("side", ["smaller", "larger"])
def test_projection_side_matches_numpy(side):
    tx = optax.chain(scale_by_galore(rank=3, update_proj_gap=1, scale=0.5, inner=optax.identity(), side=side,
                                     label_fn=ALL), optax.scale(-1.0))
    ours, state = run(tx)
    for k in ("w", "t"):
        expected = _galore_numpy([g[k] for g in GRADS], 3, side, scale=0.5)
        np.testing.assert_allclose(np.asarray(ours[k] - PARAMS[k]), expected, atol=1e-4)
    # the low-rank moments' shapes show the side: smaller projects w's 8 rows and t's 6 columns
    lows = {k: state[0].projectors.basis[k].shape for k in ["t", "w"]}
    assert lows == ({"t": (6, 3), "w": (8, 3)} if side == "smaller" else {"t": (10, 3), "w": (12, 3)})


def test_refresh_every_T_steps_and_moments_are_kept():
    tx = scale_by_galore(rank=2, update_proj_gap=3, label_fn=ALL)
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    bases = []
    for g in GRADS:
        _, state = step(g, state)
        bases.append(np.asarray(state.projectors.basis["w"]))
    same = [np.array_equal(bases[i], bases[i + 1]) for i in range(4)]
    assert same == [True, True, False, True]  # refreshed at steps 0 and 3
    assert int(state.count) == 5 and state.next_refresh.tolist() == [6, 6]
    # Adam moments persist: mu after 5 steps is non-zero and in the r × k space
    mu = state.inner.mu["w"]
    assert mu.shape == (2, 12) and float(jnp.abs(mu).max()) > 0


def test_staggered_refresh_spreads_the_svds():
    params = {f"l{i}": jnp.zeros((6, 6)) for i in range(4)}
    tx = scale_by_galore(rank=2, update_proj_gap=8, stagger=True, label_fn=lambda p: jax.tree.map(lambda _: True, p))
    state = tx.init(params)
    step = jax.jit(tx.update)
    g = {k: jnp.asarray(RNG.standard_normal((6, 6)), jnp.float32) for k in params}
    refreshed = []
    for t in range(12):
        before = state.next_refresh
        _, state = step(g, state)
        refreshed.append(np.flatnonzero(np.asarray(state.next_refresh) != np.asarray(before)).tolist())
    assert refreshed[0] == [0, 1, 2, 3]  # the first step initializes every projector
    assert refreshed[1:] == [[], [1], [], [2], [], [3], [], [0], [], [1], []]  # offsets 0, 2, 4, 6 of T=8
    assert max(len(r) for r in refreshed[1:]) == 1  # no later step pays more than one SVD


def test_default_label_fn_projects_attention_and_mlp_matrices_only():
    params = {"token_embed": {"embedding": jnp.zeros((16, 4))}, "head": {"kernel": jnp.zeros((4, 16))},
              "mlp_in": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}, "qkv": {"kernel": jnp.zeros((4, 12))}}
    labels = default_label_fn(params)
    assert labels == {"token_embed": {"embedding": False}, "head": {"kernel": False},
                      "mlp_in": {"kernel": True, "bias": False}, "qkv": {"kernel": True}}


def test_bf16_params_keep_their_dtype():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    grads = [jax.tree.map(lambda p: p.astype(jnp.bfloat16), g) for g in GRADS[:2]]
    out, _ = run(fira(1e-2, rank=2, label_fn=ALL), grads, params)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(out))


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 2, "label_fn": {"w": True, "t": 7, "b": False}},
     r"the label function gives \['t'\] \(10, 6\) rank 7, larger than its smaller dimension 6"),
    ({"rank": 0}, "rank must be > 0, got 0"),
    ({"rank": -2}, "rank must be > 0, got -2"),
    ({"rank": 1.5}, r"fractional rank must be in \(0, 1\], got 1.5"),
    ({"rank": 2, "update_proj_gap": 0}, r"update_proj_gap \(the refresh period T\) must be an int > 0, got 0"),
    ({"rank": 2, "side": "left"}, "side must be 'smaller' or 'larger', got 'left'"),
    ({"rank": 2, "label_fn": {"w": True, "t": True, "b": True}}, r"selected \['b'\] of shape \(12,\): only 2-D"),
    ({"rank": 2, "projector": "qr"}, "projector must be a Projector or one of"),
])
@pytest.mark.parametrize("method", [galore, fira])
def test_bad_arguments_are_named(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tx = method(1e-2, **{"label_fn": ALL, **kwargs})
        tx.init(PARAMS)


def test_a_rank_larger_than_a_matrix_projects_it_at_full_rank():
    # as optax.contrib.galore: the method's rank applies to every matrix, min(m, n) caps it per matrix
    state = galore(1e-2, rank=7, label_fn=ALL).init(PARAMS)[0]
    assert {k: state.projectors.basis[k].shape for k in ("w", "t")} == {"w": (8, 7), "t": (6, 6)}
    assert {k: state.inner.mu[k].shape for k in ("w", "t")} == {"w": (7, 12), "t": (6, 10)}


def test_fira_limiter_caps_residual_norm_growth():
    # a gradient that jumps 100x after two steps: the limited residual grows by at most γ per step
    params = {"w": jnp.zeros((6, 10))}
    g0 = jnp.asarray(RNG.standard_normal((6, 10)), jnp.float32)
    tx = scale_by_fira(rank=2, update_proj_gap=100, growth_limit=1.01, label_fn={"w": True})
    state = tx.init(params)
    norms = []
    for scale in [1.0, 1.0, 100.0, 100.0]:
        _, state = tx.update({"w": scale * g0}, state)
        norms.append(float(state.extra.previous_norm["w"]))
    assert norms[2] <= norms[1] * 1.01 * (1 + 1e-5) and norms[3] <= norms[2] * 1.01 * (1 + 1e-5)
