"""Q-GaLore: parity with a float64 replay of the official projector and lazy refresh, the refresh schedules
(hand-computed), int4 projector, GaLore identity, int8 weights, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import (
    LazyRefreshState,
    int8_weights,
    q_galore,
    scale_by_q_galore,
    stochastic_round_int8,
    stochastic_round_uint8,
)
from jaxopt_lab.lowrank.projectors import Int4State, dequantize_int4, int4_projector, svd_projector

RNG = np.random.default_rng(3)
D, K = 6, 10


def _unit(v):
    return v / np.linalg.norm(v)


V1, V2 = _unit(RNG.standard_normal(K)), _unit(RNG.standard_normal(K))
EYE = np.eye(D)


def _grad(i, j):
    """A rank-2 gradient whose leading left singular vector is e_i (σ = 5 vs 1)."""
    return {"w": jnp.asarray(5 * np.outer(EYE[i], V1) + np.outer(EYE[j], V2), jnp.float32)}


@pytest.fixture(scope="module", params=["official", "robust"])
def lazy_step(request):
    tx = scale_by_q_galore(rank=2, update_proj_gap=2, inner=optax.identity(), queue_size=5, cos_threshold=0.4,
                           gamma_proj=2, label_fn={"w": True}, refresh=request.param)
    return tx, jax.jit(tx.update), request.param


def _refresh_steps(lazy_step, grad_at, steps=40):
    tx, step, _ = lazy_step
    state = tx.init({"w": jnp.zeros((D, K))})
    refreshed = []
    for t in range(steps):
        before = int(state.next_refresh[0])
        updates, state = step(grad_at(t), state)
        if int(state.next_refresh[0]) != before:  # a refresh at step t sets a later next refresh
            refreshed.append(t)
    # the update is GaLore's α P Pᵀ G (identity inner, α = 0.25) with P the stored int4 basis, dequantized
    basis = np.asarray(dequantize_int4(Int4State(*(f["w"] for f in state.projectors)), (D, 2)), np.float64)
    g = np.asarray(grad_at(steps - 1)["w"], np.float64)
    np.testing.assert_allclose(np.asarray(updates["w"]), 0.25 * basis @ (basis.T @ g), rtol=1e-5, atol=1e-6)
    return refreshed, state


def test_period_doubles_once_the_queue_is_full_of_stable_subspaces(lazy_step):
    refreshed, state = _refresh_steps(lazy_step, lambda t: _grad(0, 1))
    # T = 2: refreshes at 0, 2, ..., 10; the 5th similarity (pushed at step 10) fills the queue, whose mean is 1,
    # so T doubles at every refresh from then on. official (step % T == 0): 12 (T = 4), 16 (T = 8), 32 (T = 16),
    # then T = 32, next 64; robust (T steps after the last one): 10 + 4 = 14, 14 + 8 = 22, 22 + 16 = 38, next 70
    if lazy_step[2] == "official":
        assert refreshed == [0, 2, 4, 6, 8, 10, 12, 16, 32]
        assert int(state.period[0]) == 32 and int(state.next_refresh[0]) == 64
    else:
        assert refreshed == [0, 2, 4, 6, 8, 10, 14, 22, 38]
        assert int(state.period[0]) == 32 and int(state.next_refresh[0]) == 70
    extra = LazyRefreshState(*(f["w"] for f in state.extra))
    assert int(extra.filled) == 5 and int(extra.refreshes) == 9
    np.testing.assert_allclose(np.asarray(extra.queue), 1.0, atol=1e-6)
    assert isinstance(state.projectors, Int4State) and state.projectors.packed["w"].dtype == jnp.uint8


def test_host_refresh_decision_follows_the_lazy_schedule(lazy_step):
    # wt-sync's update(..., refresh=False) on the steps where the host sees no projector due
    # (count < next_refresh, as jaxopt_lab.distributed.sync reads it) gives the in-graph run exactly,
    # with the official (step % T == 0) and the robust schedule alike, after the period has grown
    from jaxopt_lab.distributed.sync import refresh_counters

    tx, step, _ = lazy_step
    host_step = jax.jit(tx.update, static_argnames="refresh")
    graph = host = tx.init({"w": jnp.zeros((D, K))})
    skipped = []
    for t in range(40):
        g = _grad(0, 1)
        due = any(bool(jnp.any(c >= n)) for c, n in refresh_counters(host))
        _, graph = step(g, graph)
        _, host = host_step(g, host, refresh=None if due else False)
        skipped.append(not due)
    assert skipped.count(False) == 9  # the refreshes of test_period_doubles_once_the_queue_is_full...
    for u, v in zip(jax.tree.leaves(graph), jax.tree.leaves(host), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_rotating_subspaces_keep_the_period(lazy_step):
    # the leading vector moves to the next coordinate axis at every refresh: |cos| = 0
    refreshed, state = _refresh_steps(lazy_step, lambda t: _grad((t // 2) % D, (t // 2 + 3) % D))
    assert refreshed == list(range(0, 40, 2))
    assert int(state.period[0]) == 2
    np.testing.assert_allclose(np.asarray(state.extra.queue["w"]), 0.0, atol=1e-6)


def test_lazy_state_checkpoints_and_resumes_bit_identically(lazy_step, tmp_path):
    import orbax.checkpoint as ocp

    tx, step, rule = lazy_step
    params = {"w": jnp.zeros((D, K))}
    g = _grad(0, 1)

    def run(state, n):
        for _ in range(n):
            _, state = step(g, state)
        return state

    state = run(tx.init(params), 12)  # the period has grown to 4 (at step 10); next refresh at 12 or 14
    assert int(state.period[0]) == 4 and int(state.next_refresh[0]) == (12 if rule == "official" else 14)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
        ckpt.wait_until_finished()
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(params))  # a fresh process's state
        restored = ckpt.restore(tmp_path / "ckpt", template)
    resumed, uninterrupted = run(restored, 12), run(tx.init(params), 24)
    for u, v in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert (int(resumed.period[0]), int(resumed.next_refresh[0])) == ((16, 32) if rule == "official" else (16, 38))


# ---------------------------------------------------------------------------------------------
# Parity with the official projector (VITA-Group/Q-GaLore, q_galore_torch/q_galore_projector.py)

P_RANK, P_GAP, P_QUEUE, P_THRESHOLD, P_STEPS, P_ALPHA = 2, 2, 2, 0.6, 18, 0.25


def _canonical(vectors):
    """Each row flipped so that its largest-magnitude entry is positive (our SVD projector's convention)."""
    rows = np.abs(vectors).argmax(axis=1)
    return vectors * np.sign(vectors[np.arange(len(vectors)), rows])[:, None]


def _official_quantize(w, group_size):
    """``GaLoreProjector._quantize`` with n_bit = 4, dequantized as its ``project`` does."""
    g = w.reshape(-1, group_size)
    scales = np.maximum(g.max(1, keepdims=True) - g.min(1, keepdims=True), 1e-5) / 15
    zeros = np.clip(-np.round(g.min(1, keepdims=True) / scales), 0, 15)
    q = np.clip(np.round(g / scales) + zeros, 0, 15)
    return (scales * (q - zeros)).reshape(w.shape)


def _official_replay(grads, group_size, inner=lambda low, it: low):
    """float64 replay of GaLoreProjector.project / project_back (quant=True, n_bit=4) with an identity inner
    optimizer (or ``inner(low, iter)``): the update α·P inner(Pᵀ G), and the steps at which the projector
    refreshed. ``iter`` is the 0-based step."""
    gap, queue, past, stored, refreshed, updates = P_GAP, [], None, None, [], []
    for it, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        tall = g.shape[0] >= g.shape[1]
        if stored is None or it % gap == 0:
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            ortho = _canonical(vh[:P_RANK]) if tall else _canonical(u[:, :P_RANK].T).T  # B (r × n) or A (m × r)
            lead = ortho[0] if tall else ortho[:, 0]
            if past is not None:
                if len(queue) == P_QUEUE:
                    queue.pop(0)
                queue.append(lead @ past / max(np.linalg.norm(lead) * np.linalg.norm(past), 1e-8))  # signed
                if len(queue) == P_QUEUE and sum(queue) / P_QUEUE >= P_THRESHOLD:
                    gap = int(gap * 2)
            past = lead
            stored = _official_quantize(ortho, group_size)
            refreshed.append(it)
        low = inner(g @ stored.T if tall else stored.T @ g, it)
        updates.append(P_ALPHA * (low @ stored if tall else stored @ low))
    return np.stack(updates), refreshed


def _parity_grads(shape):
    """Fixed gradients whose leading singular vector (on the projected side) is a for steps 0-1, then b, with
    ⟨a, b⟩ < 0 after the sign convention: the signed and the absolute cosine disagree at step 2."""
    rng = np.random.default_rng(11)
    d = min(shape)
    a = np.zeros(d); a[:3] = (0.8, 0.6, 0.0)
    b = np.zeros(d); b[:3] = (-0.6, 0.0, 0.8)
    other = np.zeros(d); other[3] = 1.0
    v1, v2 = (x / np.linalg.norm(x) for x in rng.standard_normal((2, max(shape))))
    out = []
    for t in range(P_STEPS):
        u = a if t < 2 else b
        g = 5 * np.outer(u, v1) + np.outer(other, v2) + 0.05 * rng.standard_normal((d, max(shape)))
        out.append((g if shape[0] == d else g.T).astype(np.float32))
    return out


def _run_q_galore(grads, group_size, **kwargs):
    tx = scale_by_q_galore(rank=P_RANK, update_proj_gap=P_GAP, scale=P_ALPHA, inner=optax.identity(),
                           queue_size=P_QUEUE, cos_threshold=P_THRESHOLD, gamma_proj=2, label_fn={"w": True},
                           proj_group_size=group_size, **kwargs)
    state = tx.init({"w": jnp.zeros(grads[0].shape)})
    step = jax.jit(tx.update)
    updates, refreshed = [], []
    for t, g in enumerate(grads):
        before = int(state.next_refresh[0])
        u, state = step({"w": jnp.asarray(g)}, state)
        updates.append(np.asarray(u["w"], np.float64))
        if t == 0 or int(state.next_refresh[0]) != before:
            refreshed.append(t)
    return np.stack(updates), refreshed


# P (6 × 2) in 3 groups of 4 values: for the wide matrix U[:, :2] row by row, for the tall one Vh[:2] row by row
@pytest.mark.parametrize("shape", [(6, 16), (16, 6)], ids=["wide", "tall"])
def test_matches_float64_replay_of_the_official_projector_and_refresh(shape):
    group_size = 4
    grads = _parity_grads(shape)
    expected, expected_refreshed = _official_replay(grads, group_size)
    # signed cos at 2 is < 0, so the queue [c2, c4] stays below 0.6; [c4, c6] ≈ [1, 1] doubles T to 4 at step 6,
    # the next multiple of 4 is 8 (doubles again, T = 8), then 16
    assert expected_refreshed == [0, 2, 4, 6, 8, 16]
    got, refreshed = _run_q_galore(grads, group_size)
    assert refreshed == expected_refreshed
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    scale = np.abs(expected).max()
    # today's choices, now options, give a different trajectory: |cos| (T doubles at 4, then 8, 16) ...
    robust, robust_refreshed = _run_q_galore(grads, group_size, refresh="robust")
    assert robust_refreshed == [0, 2, 4, 8, 16]
    assert np.abs(robust - expected).max() > 1e-2 * scale
    # ... and symmetric int4 storage
    symmetric, _ = _run_q_galore(grads, group_size, projector="int4_sym_svd")
    assert np.abs(symmetric - expected).max() > 1e-2 * scale
    # the layout matters: one row-major layout for every matrix matches the official code on wide matrices only
    row_major, _ = _run_q_galore(grads, group_size, projector=int4_projector(svd_projector(), group_size))
    if shape[0] < shape[1]:
        np.testing.assert_allclose(row_major, expected, rtol=1e-4, atol=1e-5)
    else:
        assert np.abs(row_major - expected).max() > 1e-2 * scale


def _bnb_adam(lr, b1, b2, eps):
    """float64 replay of bitsandbytes' ADAM kernel step on a zero parameter (the official QGaLoreAdamW8bit zeroes
    p.data, runs the kernel with weight_decay 0, and projects p.data back): -lr √(1-β₂ᵗ)/(1-β₁ᵗ) · s1 / (√s2 + ε √(1-β₂ᵗ))."""
    st = {}

    def step(low, it):
        t = it + 1
        st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * low
        st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * low * low
        c1, c2 = 1 - b1**t, np.sqrt(1 - b2**t)
        return -lr * c2 / c1 * st["m"] / (np.sqrt(st["v"]) + eps * c2)

    return step


@pytest.mark.parametrize("wd", [0.1, None], ids=["decay", "default_decay"])
@pytest.mark.parametrize("shape", [(6, 16), (16, 6)], ids=["wide", "tall"])
def test_q_galore_step_matches_the_official_adamw8bit_arithmetic(shape, wd):
    # eps = 1e-2 makes its place visible: beside bitsandbytes' corrected √v̂, not GaLore's uncorrected √v.
    # The 2 × 16 low-rank moments are below min_8bit_size (4096): float32 in the official AdamW8bit and in
    # our default alike (its 8-bit moments: tests/lowrank/test_adam8bit.py)
    # wd None: q_galore's default against QGaLoreAdamW8bit's constructor default, weight_decay=1e-2
    lr, eps = 0.05, 1e-2
    decay = {} if wd is None else {"weight_decay": wd}
    wd = 1e-2 if wd is None else wd
    grads = _parity_grads(shape)[:8]
    w0 = np.random.default_rng(5).standard_normal(shape)
    deltas, _ = _official_replay(grads, 4, inner=_bnb_adam(lr, 0.9, 0.999, eps))
    w = w0.copy()
    for d in deltas:
        w = (w + d) * (1 - lr * wd)  # p.data = saved + project_back(step); p.data.add_(p.data, alpha=-lr*wd)
    tx = q_galore(lr, rank=P_RANK, update_proj_gap=P_GAP, scale=P_ALPHA, eps=eps, queue_size=P_QUEUE,
                  cos_threshold=P_THRESHOLD, label_fn={"w": True}, proj_group_size=4, **decay)
    params = {"w": jnp.asarray(w0, jnp.float32)}
    state, step = tx.init(params), jax.jit(tx.update)
    for g in grads:
        u, state = step({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, u)
    np.testing.assert_allclose(np.asarray(params["w"], np.float64), w, rtol=1e-4, atol=1e-5)
    # GaLore's split (ε beside the uncorrected √v) is caught
    galore_like = _official_replay(grads, 4, inner=lambda low, it: _bnb_adam(lr, 0.9, 0.999, eps / np.sqrt(1 - 0.999))(low, it))
    assert np.abs(galore_like[0][0] - deltas[0]).max() > 1e-3 * np.abs(deltas[0]).max()


def test_stochastic_rounding_is_unbiased_and_lands_on_the_neighbouring_grid_points():
    x = jnp.asarray(RNG.standard_normal((3, 50)), jnp.float32)  # 150 values: groups of 64, the last one padded
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    values, scales = jax.jit(jax.vmap(lambda k: stochastic_round_int8(x, k, 64)))(keys)
    values, scales = np.asarray(values, np.float64), np.asarray(scales[0], np.float64)
    s = np.repeat(scales, 64)[:150].reshape(3, 50)
    q = values / s
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)  # on the grid
    assert np.abs(np.round(q)).max() <= 127
    lo = np.floor(np.asarray(x, np.float64) / s - 1e-6)
    assert ((np.round(q) >= lo) & (np.round(q) <= lo + 2)).all()  # one of the two neighbours (float slack)
    # E[SR(x)] = x: the mean of 4000 draws is within 5 standard errors (≤ s / (2·√4000)) of x
    np.testing.assert_array_less(np.abs(values.mean(axis=0) - np.asarray(x)), 5 * s / (2 * np.sqrt(4000)))


def test_int8_weights_keep_params_on_the_grid_and_leave_the_rest_alone():
    params = {"w": jnp.asarray(RNG.standard_normal((D, K)), jnp.float32), "b": jnp.zeros((K,))}
    grads = [jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), params) for _ in range(3)]
    tx = int8_weights(optax.sgd(0.1), group_size=16, seed=1, label_fn={"w": True, "b": False}, grid="symmetric")
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    keys = [np.asarray(state.key)]
    b_ref = np.zeros(K)
    for g in grads:
        u, state = step(g, state, p)
        p = optax.apply_updates(p, u)
        keys.append(np.asarray(state.key))
        b_ref = b_ref - 0.1 * np.asarray(g["b"])
        scales = np.asarray(state.scales["w"], np.float64)
        q = np.asarray(p["w"], np.float64).reshape(-1) / np.repeat(scales, 16)[: D * K]
        np.testing.assert_allclose(q, np.round(q), atol=1e-4)
        assert np.abs(q).max() <= 127 + 1e-4 and scales.shape == (4,)
    np.testing.assert_allclose(np.asarray(p["b"]), b_ref, atol=1e-6)  # not selected: plain SGD
    assert isinstance(state.scales["b"], optax.MaskedNode)  # kept in float: no scales (laid out like the params)
    assert all(not np.array_equal(a, b) for a, b in zip(keys, keys[1:]))  # the key advances every step
    with pytest.raises(ValueError, match="int8_weights needs params"):
        tx.update(grads[0], state)


def official_quantize_stochastic_round(w, u, q_group_size):
    """float64 transcription of ``_quantize_stochastic_round`` + ``_dequantize`` (VITA-Group/Q-GaLore,
    q_galore_torch/q_galore_adamw8bit.py), with the uniform draws ``u`` given (its ``torch.rand_like``)."""
    w = np.asarray(w, np.float64).reshape(-1, q_group_size)
    max_val, min_val = w.max(axis=1, keepdims=True), w.min(axis=1, keepdims=True)
    scales = np.maximum(max_val - min_val, 1e-5) / 255
    zeros = np.clip(-np.round(min_val / scales), 0, 255)
    w_round = w / scales
    up, down = np.ceil(w_round), np.floor(w_round)
    q = np.where(u < w_round - down, up, down)
    q = np.clip(q + zeros, 0, 255)
    return (q - zeros) * scales, scales[:, 0], zeros[:, 0]


def test_uint8_rounding_matches_the_official_quantizer():
    x = jnp.asarray(RNG.standard_normal((4, 32)) + 0.7, jnp.float32)  # 2 groups of 64, an offset (zero point != 128)
    key = jax.random.PRNGKey(3)
    values, scales, zeros = jax.jit(stochastic_round_uint8, static_argnums=2)(x, key, 64)
    u = np.asarray(jax.random.uniform(key, (2, 64), jnp.float32), np.float64)
    want, want_s, want_z = official_quantize_stochastic_round(x, u, 64)
    np.testing.assert_allclose(np.asarray(scales), want_s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zeros), want_z)
    np.testing.assert_allclose(np.asarray(values, np.float64).reshape(2, 64), want, rtol=1e-5, atol=1e-6)
    q = np.asarray(values, np.float64).reshape(2, 64) / want_s[:, None] + want_z[:, None]
    assert np.abs(q - np.round(q)).max() < 1e-3 and q.min() > -1e-3 and q.max() < 255 + 1e-3  # on the uint8 grid
    # not the symmetric grid: its values differ
    sym, _ = stochastic_round_int8(x, key, 64)
    assert np.abs(np.asarray(sym) - np.asarray(values)).max() > 1e-3


def test_uint8_rounding_is_unbiased_inside_the_grid_and_pads_with_the_last_value():
    x = jnp.asarray(RNG.standard_normal((3, 50)), jnp.float32)  # 150 values: groups of 64, the last one partial
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    values, scales, zeros = jax.jit(jax.vmap(lambda k: stochastic_round_uint8(x, k, 64)))(keys)
    last = np.asarray(x).reshape(-1)[128:]
    np.testing.assert_allclose(float(scales[0, 2]), max(last.max() - last.min(), 1e-5) / 255, rtol=1e-6)
    s = np.repeat(np.asarray(scales[0], np.float64), 64)[:150].reshape(3, 50)
    inside = np.ones((3, 50), bool)  # away from the clipped ends of each group's grid
    xs = np.asarray(x, np.float64)
    for g in range(3):
        sl = np.zeros(150, bool)
        sl[g * 64:(g + 1) * 64] = True
        sl = sl.reshape(3, 50)
        inside &= ~sl | ((xs > xs[sl].min() + 2 * s) & (xs < xs[sl].max() - 2 * s))
    err = np.abs(np.asarray(values, np.float64).mean(axis=0) - xs)
    np.testing.assert_array_less(err[inside], 5 * s[inside] / (2 * np.sqrt(4000)))


def test_int8_weights_default_is_the_official_grid():
    params = {"w": jnp.asarray(RNG.standard_normal((4, 16)), jnp.float32)}
    g = jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), params)
    tx = int8_weights(optax.sgd(0.1), group_size=16, seed=1, label_fn={"w": True})
    state = tx.init(params)
    u, new_state = jax.jit(tx.update)(g, state, params)
    step_key = jax.random.split(jax.random.wrap_key_data(state.key, impl="threefry2x32"))[1]
    target = np.asarray(params["w"], np.float64) - 0.1 * np.asarray(g["w"], np.float64)
    draws = np.asarray(jax.random.uniform(jax.random.fold_in(step_key, 0), (4, 16), jnp.float32), np.float64)
    want, want_s, want_z = official_quantize_stochastic_round(target, draws, 16)
    got = np.asarray(optax.apply_updates(params, u)["w"], np.float64)
    np.testing.assert_allclose(got.reshape(-1, 16), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state.scales["w"]), want_s, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(new_state.zeros["w"]), want_z)


PARAMS = {"w": jnp.zeros((8, 12)), "t": jnp.zeros((10, 6)), "b": jnp.zeros((12,))}
ALL = {"w": True, "t": True, "b": False}


def test_int8_q_galore_state_round_trips_through_orbax(tmp_path):
    # The state of int8_weights(q_galore(...)) holds MaskedNode (not zero-size arrays, which orbax cannot
    # save) at the leaves it does not quantize or project, and uint8 int4 codes for the wide and the tall
    # matrix: saved and restored into a fresh transformation's template, a resumed run is bit-identical.
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"w": jnp.asarray(RNG.standard_normal((8, 12)), jnp.float32),
              "t": jnp.asarray(RNG.standard_normal((10, 6)), jnp.float32),
              "b": jnp.zeros((12,), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), params)
             for _ in range(6)]
    labels = {"w": True, "t": True, "b": False}

    def make():
        return int8_weights(q_galore(1e-2, rank=2, update_proj_gap=2, label_fn=labels, proj_group_size=8),
                            group_size=16, seed=3, label_fn=labels)

    def run(state, params, grads):
        for g in grads:
            updates, state = step(g, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    tx = make()
    step = jax.jit(tx.update)
    params_3, state_3 = run(tx.init(params), params, grads[:3])
    assert isinstance(state_3.scales["b"], optax.MaskedNode)
    assert isinstance(state_3.inner[0].projectors.packed["b"], optax.MaskedNode)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", (params_3, state_3))
        ckpt.wait_until_finished()
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, make().init(params)))
        restored = ckpt.restore(tmp_path / "ckpt", template)
    assert jax.tree.structure(restored) == jax.tree.structure((params_3, state_3))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves((params_3, state_3)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed = run(restored[1], restored[0], grads[3:])
    uninterrupted = run(tx.init(params), params, grads)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs, message", [
    ({"label_fn": {"w": True, "t": 7, "b": False}},
     r"the label function gives \['t'\] \(10, 6\) rank 7, larger than its smaller dimension 6"),
    ({"rank": 0}, "rank must be > 0, got 0"),
    ({"rank": -1}, "rank must be > 0, got -1"),
    ({"update_proj_gap": 0}, r"update_proj_gap \(the refresh period T\) must be an int > 0, got 0"),
    ({"update_proj_gap": -5}, r"update_proj_gap \(the refresh period T\) must be an int > 0, got -5"),
    ({"label_fn": {"w": True, "t": True, "b": True}}, r"selected \['b'\] of shape \(12,\): only 2-D"),
    ({"queue_size": 0}, "queue_size must be an int >= 1, got 0"),
    ({"cos_threshold": 1.5}, r"cos_threshold must be in \[0, 1\], got 1.5"),
    ({"gamma_proj": 0}, "gamma_proj must be an int >= 1, got 0"),
    ({"projector": "random"}, "lazy refresh needs a projector with a leading vector"),
    ({"refresh": "lazy"}, r"refresh must be one of \('official', 'robust'\), got 'lazy'"),
    ({"proj_group_size": 0}, "proj_group_size must be an int >= 2, got 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        q_galore(1e-2, **{"rank": 2, "label_fn": ALL, **kwargs}).init(PARAMS)


@pytest.mark.parametrize("kwargs, message", [
    ({"group_size": 0}, "group_size must be an int > 0, got 0"),
    ({"grid": "int8"}, r"grid must be one of \('official', 'symmetric'\), got 'int8'"),
    ({"label_fn": {"w": True, "i": True}}, r"int8_weights: \['i'\] has dtype int32, not a float"),
])
def test_int8_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        int8_weights(optax.sgd(0.1), **kwargs).init({"w": jnp.zeros((4, 4)), "i": jnp.zeros((3,), jnp.int32)})
