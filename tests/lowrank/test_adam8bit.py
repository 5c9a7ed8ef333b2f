"""8-bit Adam (bitsandbytes' block-wise quantized moments): the dynamic maps and the block quantizer against
bitsandbytes' CPU functions, the optimizer step against a float64 replay of its CUDA kernel
(kOptimizerStatic8bit2StateBlockwise), the float32 fallback against optax, the state's bytes, and Q-GaLore's
default (8-bit moments) against a replay of the official optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import optimizer_state_bytes, q_galore, scale_by_adam_8bit
from jaxopt_lab.lowrank.adam8bit import (
    SIGNED_MAP,
    UNSIGNED_MAP,
    create_dynamic_map,
    dequantize_blockwise,
    quantize_blockwise,
    quantize_codes,
)

def _spread(n, rng):
    """Values over eight decades, as Adam's moments are: the dynamic map's small codes get used."""
    return (rng.standard_normal(n) * np.exp(rng.uniform(-18, 0, n))).astype(np.float32)


def _bnb():
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch = pytest.importorskip("torch")
    return bnb, torch


# ---------------------------------------------------------------------------------------------
# the maps and the block quantizer


def test_dynamic_maps_equal_bitsandbytes():
    F, _ = _bnb()
    for signed, ours in ((True, SIGNED_MAP), (False, UNSIGNED_MAP)):
        ref = F.create_dynamic_map(signed=signed).numpy()
        assert ours.dtype == np.float32 and ours.shape == (256,)
        np.testing.assert_array_equal(ours, ref)  # bit for bit (torch.linspace's fused multiply-adds)
        np.testing.assert_array_equal(create_dynamic_map(signed), ref)
    # the layout the kernel relies on: sorted, 127 negatives, 0 at 127, 1 at 255 (signed); 0 at 0 (unsigned)
    assert (np.diff(SIGNED_MAP) > 0).all() and (np.diff(UNSIGNED_MAP) > 0).all()
    assert SIGNED_MAP[127] == 0 and (SIGNED_MAP[:127] < 0).all() and SIGNED_MAP[255] == 1 and UNSIGNED_MAP[0] == 0


def _nearest(x, code):
    """float64 index of the nearest map entry (an independent argmin)."""
    return np.abs(np.asarray(x, np.float64)[:, None] - np.asarray(code, np.float64)[None, :]).argmin(axis=1)


def _bnb_cpu_lut_codes(normalized, code):
    """bitsandbytes 0.50's CPU quantizer (csrc/cpu_ops.cpp, quantize_cpu_impl): x·(1/absmax) is rounded to a
    grid of 65536 points over [-1, 1] (norm_to_lut_index), and the grid point's code is the count of midpoints
    below it (build_quantize_lut). Finer than the map's spacing near ±1, coarser near 0."""
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    k = ((np.clip(normalized, -1, 1) + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5))
    grid = (np.float32(-1) + np.float32(2) * k.astype(np.uint16).astype(np.float32) / np.float32(65535))
    return np.searchsorted(mid, grid.astype(np.float32), side="left")


@pytest.mark.parametrize("block_size", [256, 2048])
def test_block_quantizer_matches_bitsandbytes_cpu(block_size):
    F, torch = _bnb()
    n = 2 * block_size + 333  # a partial last block
    rng = np.random.default_rng(block_size)
    for signed, code in ((True, SIGNED_MAP), (False, UNSIGNED_MAP)):
        x = _spread(n, rng)
        x = x if signed else np.abs(x)
        codes, absmax = jax.jit(quantize_blockwise, static_argnums=(2, 3))(x, code, block_size, signed)
        codes, absmax = np.asarray(codes), np.asarray(absmax)
        ref_codes, ref_state = F.quantize_blockwise(torch.tensor(x), code=torch.tensor(code), blocksize=block_size)
        ref_codes = ref_codes.numpy()
        np.testing.assert_array_equal(absmax, ref_state.absmax.numpy())
        # dequantization: code[c] · absmax, bit for bit, of our codes and of theirs
        for c in (codes, ref_codes):
            want = F.dequantize_blockwise(torch.tensor(c), ref_state, blocksize=block_size).numpy()
            np.testing.assert_array_equal(np.asarray(dequantize_blockwise(jnp.asarray(c), absmax, code, block_size)), want)
        # codes: ours is the nearest entry to x / absmax (the kernel's binary search; no exact ties here) ...
        normalized = np.asarray(x, np.float64) / np.repeat(absmax.astype(np.float64), block_size)[:n]
        np.testing.assert_array_equal(codes, _nearest(normalized, code))
        # ... bitsandbytes' CPU code is the nearest entry to x·(1/absmax) rounded to its 65536-point grid ...
        inv = (np.float32(1) / absmax).astype(np.float32)
        np.testing.assert_array_equal(ref_codes, _bnb_cpu_lut_codes((x * np.repeat(inv, block_size)[:n]), code))
        # ... so where they differ ours is the nearer: near 0, where the map's entries (1e-7 apart) are finer
        # than the grid (3e-5), and, rarely, where the grid moves a value across a midpoint
        differ = codes != ref_codes
        err = lambda c: np.abs(normalized - code[c].astype(np.float64))  # noqa: E731
        assert differ.any() and (err(codes)[differ] < err(ref_codes)[differ]).all()
        large = np.abs(normalized) > 0.05  # the map's spacing there is >= 4e-4, the grid's 3e-5
        assert large.sum() > n // 10 and differ[large].mean() < 0.02


def test_quantize_codes_tie_rule_is_the_kernels():
    # quantize_2D: at a float32 midpoint between two entries the even index wins (the final pivot is even)
    for signed, code in ((True, SIGNED_MAP), (False, UNSIGNED_MAP)):
        mid = (code[:-1] + code[1:]) * np.float32(0.5)
        got = np.asarray(quantize_codes(mid, code, signed))
        k = np.arange(255)
        np.testing.assert_array_equal(got, np.where(k % 2 == 0, k, k + 1))
        # just off the midpoints: the nearer entry
        below, above = np.nextafter(mid, np.float32(-2)), np.nextafter(mid, np.float32(2))
        np.testing.assert_array_equal(np.asarray(quantize_codes(below, code, signed)), k)
        np.testing.assert_array_equal(np.asarray(quantize_codes(above, code, signed)), k + 1)


# ---------------------------------------------------------------------------------------------
# the optimizer step: a float64 replay of kOptimizerStatic8bit2StateBlockwise (bitsandbytes csrc/kernels.cu)


def _kernel_step(g, c1, c2, absmax1, absmax2, step, b1, b2, eps, block_size):
    """One step of the kernel in float64, lr = 1, on flat arrays: returns (update, c1, c2, absmax1, absmax2,
    m, v, normalized m and v), the update as our direction (the kernel adds −lr · update to p).

    Constants as the kernel gets them: float32 betas and eps (1 − β formed from the float32 β). The last
    block's missing entries load code 128 (m) and 0 (v) and gradient 0, and count in the block's absmax.
    A non-finite gradient zeroes its m and v and skips its update. Quantization: the nearest entry of the
    map to value / new absmax (float64 argmin), then the sign fix of m's code (uint8 wrap-around).
    """
    b1, b2, eps = (float(np.float32(b)) for b in (b1, b2, eps))
    n = g.size
    nb = -(-n // block_size)
    pad = nb * block_size - n

    def blocks(a, fill):
        return np.concatenate([a, np.full(pad, fill, a.dtype)]).reshape(nb, block_size)

    gb = blocks(np.asarray(g, np.float64), 0.0)
    finite = np.isfinite(gb)
    gb = np.where(finite, gb, 0.0)
    m = SIGNED_MAP.astype(np.float64)[blocks(c1, 128)] * absmax1[:, None]
    v = UNSIGNED_MAP.astype(np.float64)[blocks(c2, 0)] * absmax2[:, None]
    m = np.where(finite, m * b1 + (1 - b1) * gb, 0.0)
    v = np.where(finite, v * b2 + (1 - b2) * gb * gb, 0.0)
    c1_corr, c2_corr = 1 - b1**step, np.sqrt(1 - b2**step)
    update = np.where(finite, c2_corr / c1_corr * m / (np.sqrt(v) + c2_corr * eps), 0.0)
    new1, new2 = np.abs(m).max(axis=1), v.max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        x1, x2 = m / new1[:, None], v / new2[:, None]
    q1 = _nearest(np.nan_to_num(x1).reshape(-1), SIGNED_MAP).reshape(nb, block_size)
    q2 = _nearest(np.nan_to_num(x2).reshape(-1), UNSIGNED_MAP).reshape(nb, block_size)
    flip = np.signbit(SIGNED_MAP[q1]) != np.signbit(m)
    q1 = np.where(flip, np.where(m > 0, q1 + 1, q1 - 1), q1) % 256
    flat = lambda a: a.reshape(-1)[:n]  # noqa: E731
    return (flat(update), flat(q1).astype(np.uint8), flat(q2).astype(np.uint8), new1, new2, flat(m), flat(v),
            flat(x1), flat(x2))


def _midpoint_distance(x, code):
    """|x − the nearest midpoint between two map entries|: where float32 rounding can change the code."""
    mid = 0.5 * (code[:-1].astype(np.float64) + code[1:])
    return np.abs(np.asarray(x, np.float64)[:, None] - mid[None, :]).min(axis=1)


B1, B2, EPS, BLOCK = 0.9, 0.999, 1e-8, 2048
N = 2 * BLOCK + 500  # three blocks, the last one partial; >= 4096: quantized at the defaults


@pytest.fixture(scope="module")
def kernel_run():
    """Eight steps of scale_by_adam_8bit (the defaults: blocks of 2048, 4096 values and up) on one tensor;
    gradients of varied scale, one non-finite entry at step 3, and a zero block at step 1."""
    tx = scale_by_adam_8bit(B1, B2, EPS)
    params = {"w": jnp.zeros((N // 4, 4), jnp.float32)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(1)
    history = []
    for t in range(8):
        g = _spread(N, rng) * np.float32(10 ** rng.uniform(-3, 1))
        if t == 0:
            g[BLOCK:2 * BLOCK] = 0.0  # a block of zeros: absmax 0 at the first step
        if t == 3:
            g[17] = np.nan
        u, new = step({"w": jnp.asarray(g.reshape(N // 4, 4))}, state)
        history.append((g, state, u["w"], new))
        state = new
    return history


def test_state_is_uint8_codes_and_block_absmax(kernel_run):
    state = kernel_run[-1][3]
    assert state.mu["w"].dtype == jnp.uint8 and state.mu["w"].shape == (N // 4, 4)
    assert state.nu["w"].dtype == jnp.uint8 and state.mu_absmax["w"].shape == (3,)
    assert state.nu_absmax["w"].dtype == jnp.float32 and int(state.count) == 8


def test_each_step_matches_a_float64_replay_of_the_kernel(kernel_run):
    """From the same stored state, every step's update, new absmax and codes are the kernel's."""
    for t, (g, state, u, new) in enumerate(kernel_run):
        c1, c2 = np.asarray(state.mu["w"]).reshape(-1), np.asarray(state.nu["w"]).reshape(-1)
        a1, a2 = np.asarray(state.mu_absmax["w"], np.float64), np.asarray(state.nu_absmax["w"], np.float64)
        want_u, want_c1, want_c2, want_a1, want_a2, _, _, x1, x2 = _kernel_step(g, c1, c2, a1, a2, t + 1, B1, B2, EPS,
                                                                                 BLOCK)
        # (atol: where m nearly cancels, float32 loses relative precision)
        np.testing.assert_allclose(np.asarray(u, np.float64).reshape(-1), want_u, rtol=2e-5, atol=1e-6 * np.abs(want_u).max())
        np.testing.assert_allclose(np.asarray(new.mu_absmax["w"]), want_a1, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(new.nu_absmax["w"]), want_a2, rtol=1e-6)
        live = np.repeat(want_a1 > 0, BLOCK)[:N]  # a block whose absmax is 0 dequantizes to 0 whatever its codes
        for got, want, x, code in ((new.mu["w"], want_c1, x1, SIGNED_MAP), (new.nu["w"], want_c2, x2, UNSIGNED_MAP)):
            got = np.asarray(got).reshape(-1)
            differ = (got != want) & live
            # float32 vs float64: only a value within float32 rounding of a midpoint may take the other code
            assert differ.sum() <= 2, (t, np.nonzero(differ))
            assert (_midpoint_distance(x[differ], code) < 1e-6).all()
            assert (np.abs(got[differ].astype(int) - want[differ].astype(int)) == 1).all()
        if t == 0:
            assert not live[BLOCK] and np.asarray(u).reshape(-1)[BLOCK:2 * BLOCK].max() == 0
        if t == 3:  # the non-finite entry: no update, m = v = 0 (the rest of its block is unaffected)
            assert np.asarray(u).reshape(-1)[17] == 0 and np.isfinite(np.asarray(u)).all()
            deq = np.asarray(dequantize_blockwise(new.mu["w"], new.mu_absmax["w"], SIGNED_MAP, BLOCK)).reshape(-1)
            assert abs(deq[17]) <= 1e-6 * float(new.mu_absmax["w"][0])


def test_trajectory_matches_the_kernel_replayed_on_its_own(kernel_run):
    """Eight steps of the replay from its own state: the updates agree to the quantization's float32 noise."""
    c1 = c2 = np.zeros(N, np.uint8)
    a1 = a2 = np.zeros(3)
    for t, (g, _, u, new) in enumerate(kernel_run):
        want_u, c1, c2, a1, a2, m, v, _, _ = _kernel_step(g, c1, c2, a1, a2, t + 1, B1, B2, EPS, BLOCK)
        got = np.asarray(u, np.float64).reshape(-1)
        close = np.isclose(got, want_u, rtol=1e-4, atol=1e-30)
        assert close.mean() > 0.999, (t, close.mean())
        np.testing.assert_allclose(np.asarray(new.mu_absmax["w"]), a1, rtol=1e-4)
    # the quantization is not a no-op: the kernel with float32 moments (optax's Adam) differs by far more
    exact = optax.scale_by_adam(B1, B2, EPS)
    s = exact.init({"w": jnp.zeros(N)})
    for g, _, u, _ in kernel_run:
        e, s = exact.update({"w": jnp.asarray(np.nan_to_num(g))}, s)
    rel = np.abs(np.asarray(u).reshape(-1) - np.asarray(e["w"])) / np.abs(np.asarray(e["w"])).max()
    assert rel.max() > 1e-2


# ---------------------------------------------------------------------------------------------
# the float32 fallback, the state's bytes


def test_small_tensors_stay_float32_and_equal_optax_scale_by_adam():
    shapes = {"small": (10, 10), "vec": (7,), "big": (64, 80)}
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    tx, ref = scale_by_adam_8bit(block_size=256), optax.scale_by_adam()
    state, ref_state = tx.init(params), ref.init(params)
    assert state.mu["small"].dtype == jnp.float32 and state.mu["big"].dtype == jnp.uint8
    assert isinstance(state.mu_absmax["small"], optax.MaskedNode) and state.mu_absmax["big"].shape == (20,)
    step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
    rng = np.random.default_rng(2)
    for _ in range(5):
        g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        u, state = step(g, state)
        v, ref_state = ref_step(g, ref_state)
        for k in ("small", "vec"):  # bit for bit
            np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(v[k]))
            np.testing.assert_array_equal(np.asarray(state.mu[k]), np.asarray(ref_state.mu[k]))
            np.testing.assert_array_equal(np.asarray(state.nu[k]), np.asarray(ref_state.nu[k]))
        assert not np.array_equal(np.asarray(u["big"]), np.asarray(v["big"]))
    # min_8bit_size is a threshold on the size: 4096 values and up are quantized at the default
    at = scale_by_adam_8bit().init({"a": jnp.zeros((4095,)), "b": jnp.zeros((4096,))})
    assert at.mu["a"].dtype == jnp.float32 and at.mu["b"].dtype == jnp.uint8 and at.mu_absmax["b"].shape == (2,)


def test_state_bytes_shrink_to_codes_plus_one_absmax_per_block():
    params = {"big": jax.ShapeDtypeStruct((N,), jnp.float32), "small": jax.ShapeDtypeStruct((100,), jnp.float32)}
    ours = optimizer_state_bytes(jax.eval_shape(scale_by_adam_8bit().init, params))
    adam = optimizer_state_bytes(jax.eval_shape(optax.scale_by_adam().init, params))
    assert adam == 4 + 2 * 4 * (N + 100)
    assert ours == 4 + 2 * (N + 4 * 3) + 2 * 4 * 100  # uint8 codes + three float32 absmax, twice; small in float32


def test_q_galore_default_state_is_8bit():
    # a 64 × 2048 matrix at rank 2 has 2 × 2048 = 4096 low-rank moments (quantized), a 100 × 64 embedding
    # on plain Adam 6400 (quantized), a bias 64 (float32)
    params = {"w": jax.ShapeDtypeStruct((64, 2048), jnp.float32), "emb": jax.ShapeDtypeStruct((100, 64), jnp.float32),
              "b": jax.ShapeDtypeStruct((64,), jnp.float32)}
    labels = {"w": True, "emb": False, "b": False}
    nbytes = {}
    for adam_state in ("8bit", "float32"):
        tx = q_galore(1e-3, rank=2, label_fn=labels, adam_state=adam_state)
        state = jax.eval_shape(tx.init, params)
        nbytes[adam_state] = optimizer_state_bytes(state)
        inner = state[0].inner
        assert inner.mu["b"].dtype == jnp.float32
        assert inner.mu["w"].dtype == (jnp.uint8 if adam_state == "8bit" else jnp.float32)
    saved = sum(2 * (4 * n - (n + 4 * -(-n // 2048))) for n in (4096, 6400))
    assert nbytes["float32"] - nbytes["8bit"] == saved


# ---------------------------------------------------------------------------------------------
# Q-GaLore with 8-bit moments = the official optimizer (projection replayed in tests/lowrank/test_q_galore.py)


def test_q_galore_8bit_moments_match_a_replay_of_the_official_optimizer():
    from tests.lowrank.test_q_galore import P_ALPHA, P_QUEUE, P_RANK, P_THRESHOLD, _official_replay, _parity_grads

    # small sizes so that the 2 × 16 low-rank moments are quantized: min_8bit_size 16, blocks of 8
    lr, wd, eps, block = 0.05, 0.1, 1e-3, 8
    shape = (6, 16)
    grads = _parity_grads(shape)[:8]
    state = {}

    def kernel(low, it):
        flat = low.reshape(-1)
        c1, c2, a1, a2 = state.get("s", (np.zeros(flat.size, np.uint8),) * 2 + (np.zeros(4),) * 2)
        u, c1, c2, a1, a2, *_ = _kernel_step(flat, c1, c2, a1, a2, it + 1, 0.9, 0.999, eps, block)
        state["s"] = (c1, c2, a1, a2)
        return -lr * u.reshape(low.shape)

    deltas, _ = _official_replay(grads, 4, inner=kernel)
    w0 = np.random.default_rng(5).standard_normal(shape)
    w = w0.copy()
    for d in deltas:
        w = (w + d) * (1 - lr * wd)
    run = {}
    for adam_state in ("8bit", "float32"):
        tx = q_galore(lr, rank=P_RANK, update_proj_gap=2, scale=P_ALPHA, eps=eps, weight_decay=wd, queue_size=P_QUEUE,
                      cos_threshold=P_THRESHOLD, label_fn={"w": True}, proj_group_size=4, adam_state=adam_state,
                      min_8bit_size=16, adam_block_size=block)
        params = {"w": jnp.asarray(w0, jnp.float32)}
        s, step = tx.init(params), jax.jit(tx.update)
        for g in grads:
            u, s = step({"w": jnp.asarray(g)}, s, params)
            params = optax.apply_updates(params, u)
        run[adam_state] = np.asarray(params["w"], np.float64)
        assert s[0].inner.mu["w"].shape == (2, 16)  # the low-rank moments
        assert s[0].inner.mu["w"].dtype == (jnp.uint8 if adam_state == "8bit" else jnp.float32)
    np.testing.assert_allclose(run["8bit"], w, rtol=1e-4, atol=1e-5)
    # the float32 moments take a visibly different trajectory
    assert np.abs(run["float32"] - w).max() > 10 * 1e-5 + 1e-4 * np.abs(w).max()


def test_state_round_trips_through_orbax(tmp_path):
    # uint8 codes, float32 absmax and MaskedNode (not zero-size arrays, which orbax cannot save) at the float
    # leaves: restored into a fresh transformation's template, a resumed run is bit-identical
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"big": jnp.zeros((40,)), "small": jnp.zeros((3,))}
    tx = scale_by_adam_8bit(block_size=16, min_8bit_size=8)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(4)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(4)]

    def run(state, gs):
        out = []
        for g in gs:
            u, state = step(g, state)
            out.append(u)
        return out, state

    _, state = run(tx.init(params), grads[:2])
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
        ckpt.wait_until_finished()
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, scale_by_adam_8bit(block_size=16, min_8bit_size=8).init(params))
        restored = ckpt.restore(tmp_path / "ckpt", template)
    resumed = run(restored, grads[2:])
    uninterrupted = run(tx.init(params), grads)
    uninterrupted = (uninterrupted[0][2:], uninterrupted[1])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.mu["big"].dtype == jnp.uint8 and isinstance(restored.mu_absmax["small"], optax.MaskedNode)


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "block_size must be an int >= 1, got 0"),
    ({"min_8bit_size": 1.5}, "min_8bit_size must be an int >= 1, got 1.5"),
    ({"b1": 1.5}, "b1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scale_by_adam_8bit(**kwargs)


def test_q_galore_adam_state_is_checked():
    with pytest.raises(ValueError, match=r"adam_state must be one of \('8bit', 'float32'\), got 'int8'"):
        q_galore(1e-2, adam_state="int8")
