"""Compressors: exact cases equal pmean, quantizer error bounds / grids / unbiasedness / bytes,
top-k with error feedback, DGC and EControl against float64 numpy references, bad arguments."""

import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, wire_bytes
from jaxopt_lab.distributed.accounting import add_bytes, tree_bytes, zero_bytes
from jaxopt_lab.distributed.compression import (
    DGC_SPARSITY_SCHEDULE,
    compressed_pmean,
    dgc,
    e3m0_grid,
    econtrol,
    identity,
    quantize,
    top_k,
)
from jaxopt_lab.distributed.streaming_diloco import streaming_diloco
from tests.distributed.problem import run

W = 4
KEY = jax.random.key(0)
STEP = jnp.int32(0)


def worker_trees(seed=0, w=W):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(w, 3, 5)).astype(np.float32), "b": rng.normal(size=(w, 7)).astype(np.float32)}


def vmapped_pmean(compressor, trees):
    def one(tree, key):
        state = compressor.init(tree)
        mean, _, nbytes = compressed_pmean(tree, state, key, STEP, compressor, "workers")
        return mean, nbytes

    keys = jax.random.split(KEY, W)
    return jax.jit(jax.vmap(one, axis_name="workers"))(trees, keys)


def compress_once(compressor, x, key=KEY, step=STEP):
    decoded, _, nbytes = jax.jit(compressor.compress)(x, compressor.init(x), key, step)
    return jax.tree.map(np.asarray, decoded), int(nbytes)


# --- exact compressors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["identity", "top_k_full", "bf16"])
def test_exact_compressors_equal_plain_pmean(name):
    trees = worker_trees()
    # bf16-representable inputs: the bf16 cast is lossless on them
    trees = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), trees)
    compressor, per_worker = {
        "identity": (identity(), tree_bytes(jax.tree.map(lambda x: x[0], trees))),
        "top_k_full": (top_k(1.0, error_feedback=False), (15 + 7) * 4),  # nothing removed: sent dense
        "bf16": (quantize("bf16"), (15 + 7) * 2),
    }[name]
    mean, nbytes = vmapped_pmean(compressor, trees)
    plain = jax.vmap(lambda t: jax.lax.pmean(t, "workers"), axis_name="workers")(trees)
    for k in trees:
        np.testing.assert_array_equal(mean[k], plain[k])
    np.testing.assert_array_equal(nbytes, [per_worker] * W)
    assert nbytes.dtype == jnp.int32


def test_lossy_pmean_is_mean_of_decoded_and_bytes_accumulate():
    trees = worker_trees(1)
    compressor = quantize("int4")
    mean, nbytes = vmapped_pmean(compressor, trees)
    decoded = [compress_once(compressor, jax.tree.map(lambda x: x[w], trees))[0] for w in range(W)]
    np.testing.assert_allclose(mean["a"][0], np.mean([d["a"] for d in decoded], axis=0), rtol=1e-6, atol=1e-7)
    assert not np.allclose(mean["a"][0], trees["a"].mean(0))  # lossy
    count = add_bytes(add_bytes(zero_bytes(), nbytes[0]), nbytes[0])
    assert communicated_bytes(count) == 2 * ((8 + 4) + (4 + 4))  # ceil(15/2)+4, ceil(7/2)+4


def test_streaming_diloco_counts_e3m0_bytes():
    # fragments [b] (1 float) and [w] (5 floats), each synced twice in 8 steps
    tx = streaming_diloco(optax.sgd(0.05), optax.sgd(0.7), sync_every=4, num_fragments=2, compressor=quantize("e3m0"))
    _, state = run(WorkerRunner(W), tx, 8, W)
    np.testing.assert_array_equal(communicated_bytes(state), [2 * ((1 + 4) + (3 + 4))] * W)
    # all-gathered on the wire: each worker receives the other W - 1 workers' payloads
    np.testing.assert_array_equal(wire_bytes(state), [(W - 1) * 2 * ((1 + 4) + (3 + 4))] * W)
    # without a compressor, a ring all-reduce per fragment: ceil(2 (W-1) / W * bytes) = 6 for [b], 30 for [w]
    dense = streaming_diloco(optax.sgd(0.05), optax.sgd(0.7), sync_every=4, num_fragments=2)
    _, state = run(WorkerRunner(W), dense, 8, W)
    assert W == 4
    np.testing.assert_array_equal(communicated_bytes(state), [2 * (4 + 20)] * W)
    np.testing.assert_array_equal(wire_bytes(state), [2 * (6 + 30)] * W)


# --- quantizers -------------------------------------------------------------------------------

N = 65  # odd: the last 4-bit code sits alone in its byte


def sample(n=N, seed=3):
    x = np.random.default_rng(seed).normal(size=(n,)) * np.exp(np.random.default_rng(seed + 1).uniform(-6, 0, n))
    return x.astype(np.float32)


def block_scales(x, qmax, block_size):
    bs = x.size if block_size is None else block_size
    nb = -(-x.size // bs)
    absmax = np.abs(np.pad(x, (0, nb * bs - x.size))).reshape(nb, bs).max(1)
    return np.repeat(absmax / qmax, bs)[: x.size]


@pytest.mark.parametrize("fmt,qmax,block_size,nbytes", [
    ("int8", 127, None, N + 4),
    ("int8", 127, 16, N + 4 * 5),
    ("int4", 7, None, 33 + 4),
    ("int4", 7, 16, 33 + 4 * 5),
])
def test_int_round_to_nearest(fmt, qmax, block_size, nbytes):
    x = sample()
    dec, got_bytes = compress_once(quantize(fmt, block_size=block_size), jnp.asarray(x))
    s = block_scales(x, qmax, block_size)
    codes = dec / s
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # integer codes
    assert np.abs(np.round(codes)).max() == qmax  # each block's absmax is sent exactly
    assert np.all(np.abs(dec - x) <= s / 2 * (1 + 1e-5))
    assert got_bytes == nbytes


def test_fp8_e4m3_round_to_nearest():
    x = sample()
    dec, nbytes = compress_once(quantize("fp8_e4m3"), jnp.asarray(x))
    s = np.abs(x).max() / 448
    codes = (dec / s).astype(np.float32)
    np.testing.assert_allclose(codes.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), codes, rtol=1e-6)
    # 3 mantissa bits: half an ulp is 2**-4 relative (normal), 2**-10 s absolute (subnormal)
    bound = np.maximum(np.abs(x) * 2.0**-4, s * 2.0**-10)
    assert np.all(np.abs(dec - x) <= bound * (1 + 1e-5))
    assert np.abs(codes).max() == 448
    assert nbytes == N + 4


@pytest.mark.parametrize("block_size,nbytes", [(None, 33 + 4), (8, 33 + 4 * 9)])
def test_e3m0_values_on_grid_and_nearest(block_size, nbytes):
    x = sample()
    x[:3] = 0.0  # zeros stay zeros
    dec, got_bytes = compress_once(quantize("e3m0", block_size=block_size), jnp.asarray(x))
    s = block_scales(x, 1.0, block_size)
    grid = e3m0_grid()
    assert len(grid) == 15 and grid.max() == 1 and np.min(grid[grid > 0]) == 2.0**-6
    codes = dec / s
    dist = np.abs(codes[:, None] - grid[None, :])
    assert np.all(dist.min(1) <= 1e-6)  # on the ±s 2^e (e = -6..0) ∪ {0} grid
    np.testing.assert_array_equal(dec[:3], 0.0)
    # nearest grid point to x / s (up to a float32 ulp at ties)
    err = np.abs(x / s - codes)
    assert np.all(err <= np.abs(x[:, None] / s[:, None] - grid[None, :]).min(1) + 1e-6)
    assert got_bytes == nbytes


def test_bf16_round_to_nearest_and_bytes():
    x = sample()
    dec, nbytes = compress_once(quantize("bf16"), jnp.asarray(x))
    np.testing.assert_array_equal(dec, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert nbytes == 2 * N


FORMATS = ("bf16", "int8", "int4", "fp8_e4m3", "e3m0")
# magnitudes across the range, including e3m0's flush-to-zero region, exact zeros and the absmax
SR_X = np.array([1.0, -0.7, 0.3, -0.11, 0.0371, 0.013, -0.0052, 3e-3, 0.0, 1e-4, -0.52, 0.9], np.float32)
SR_DRAWS = 10000


@pytest.fixture(scope="module")
def rounding_draws():
    """Per format: SR_DRAWS stochastic roundings of SR_X and its nearest rounding (one compilation)."""
    stochastic = [quantize(f, stochastic_rounding=True) for f in FORMATS]
    nearest = [quantize(f) for f in FORMATS]

    @jax.jit
    def draw(x):
        keys = jax.random.split(jax.random.key(7, impl="rbg"), SR_DRAWS)  # rbg: compiles faster on CPU
        draws = [jax.vmap(lambda k, c=c: c.compress(x, (), k, STEP)[0])(keys) for c in stochastic]
        return draws, [c.compress(x, (), KEY, STEP)[0] for c in nearest]

    draws, near = draw(jnp.asarray(SR_X))
    return {f: (np.asarray(d, np.float64), np.asarray(n, np.float64)) for f, d, n in zip(FORMATS, draws, near)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased(fmt, rounding_draws):
    x = SR_X.astype(np.float64)
    draws, near = rounding_draws[fmt]
    # each draw is one of the two neighbours of x on the format's grid
    assert np.all([len(np.unique(draws[:, i])) <= 2 for i in range(x.size)])
    std = draws.std(0)
    assert np.all(std[[1, 2, 3]] > 0)  # really random off the grid
    tol = 5 * std / np.sqrt(SR_DRAWS) + 1e-7 * np.abs(x)
    assert np.all(np.abs(draws.mean(0) - x) <= tol)
    # a biased rounding (to nearest) fails the same check
    assert np.any(np.abs(near - x) > tol)


# --- top-k ------------------------------------------------------------------------------------


def topk_ref(p, k):
    out = np.zeros_like(p)
    idx = np.argsort(-np.abs(p.ravel()), kind="stable")[:k]
    out.ravel()[idx] = p.ravel()[idx]
    return out


def test_top_k_keeps_exactly_k_largest():
    rng = np.random.default_rng(4)
    tree = {"a": rng.normal(size=(10, 10)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    dec, nbytes = compress_once(top_k(0.07, error_feedback=False), tree)
    # k = ceil(0.07 * 100) = 7 (not 8: 0.07 * 100 is 7.000000000000001 in floats), max(1, ceil(0.49)) = 1
    assert np.count_nonzero(dec["a"]) == 7 and np.count_nonzero(dec["b"]) == 1
    for key in tree:
        np.testing.assert_array_equal(dec[key], topk_ref(tree[key], np.count_nonzero(dec[key])))
    assert nbytes == (7 + 1) * (4 + 4)


def test_top_k_error_feedback_matches_reference_and_loses_nothing():
    rng = np.random.default_rng(5)
    xs = [{"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=(9,)).astype(np.float32)}
          for _ in range(6)]
    compressor = top_k(0.25)
    compress = jax.jit(compressor.compress)
    state = compressor.init(xs[0])
    err = {k: np.zeros(v.shape) for k, v in xs[0].items()}
    total = {k: np.zeros(v.shape) for k, v in xs[0].items()}
    for x in xs:
        dec, state, nbytes = compress(x, state, KEY, STEP)
        for k in x:  # float64 reference: p = x + e, send top_k(p), e = p - sent
            p = x[k].astype(np.float64) + err[k]
            sent = topk_ref(p, math.ceil(0.25 * p.size))
            err[k] = p - sent
            np.testing.assert_allclose(dec[k], sent, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(state.error[k], err[k], rtol=1e-5, atol=1e-6)
            total[k] += np.asarray(dec[k], np.float64)
        assert int(nbytes) == (5 + 3) * 8
    for k in total:
        np.testing.assert_allclose(total[k] + np.asarray(state.error[k]), sum(x[k].astype(np.float64) for x in xs),
                                   rtol=1e-5, atol=1e-5)


# --- DGC --------------------------------------------------------------------------------------


def dgc_ref(grads, momentum, clip_norm, schedule, per_stage, compress_vectors=False):
    """Float64 reference of Lin et al. (2018) as synxlin/deep-gradient-compression runs it: clip, u = m u + g,
    v = v + u, send top-k of v, mask u and v (DGCSGDMemory); tensors with dim() <= 1, and every tensor at
    compress ratio 1, go dense with plain momentum (train.py / DGCSGDMemory.compensate(accumulate=False))."""
    u = {k: np.zeros(g.shape) for k, g in grads[0].items()}
    v = {k: np.zeros(g.shape) for k, g in grads[0].items()}
    out = []
    for t, g in enumerate(grads):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        g = {k: x * min(1.0, clip_norm / norm) for k, x in g.items()}
        s = schedule[min(t // per_stage, len(schedule) - 1)]
        sent, nnz = {}, {}
        for k in g:
            u[k] = momentum * u[k] + g[k]
            if s == 0 or (g[k].ndim < 2 and not compress_vectors):
                sent[k], nnz[k] = u[k].copy(), None  # dense
                continue
            v[k] = v[k] + u[k]
            kk = max(1, math.ceil(round((1 - s) * v[k].size, 6)))
            thr = np.sort(np.abs(v[k]).ravel())[::-1][kk - 1]
            mask = np.abs(v[k]) >= thr
            sent[k], nnz[k] = np.where(mask, v[k], 0.0), int(mask.sum())
            v[k], u[k] = np.where(mask, 0.0, v[k]), np.where(mask, 0.0, u[k])
        out.append((sent, nnz, {k: u[k].copy() for k in u}, {k: v[k].copy() for k in v}))
    return out


def check_dgc(grads, compressor, ref):
    compress = jax.jit(compressor.compress)
    state = compressor.init(grads[0])
    seen = []
    for t in range(len(grads)):
        dec, state, nbytes = compress(grads[t], state, KEY, jnp.int32(t))
        sent, nnz, u, v = ref[t]
        for k in sent:
            if nnz[k] is not None:
                assert np.count_nonzero(dec[k]) == nnz[k]
            np.testing.assert_allclose(dec[k], sent[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(state.momentum[k], u[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(state.accumulation[k], v[k], rtol=1e-5, atol=1e-5)
        assert int(nbytes) == sum(grads[t][k].size * 4 if n is None else n * (4 + 4) for k, n in nnz.items())
        seen.append(nnz)
    return seen


@pytest.mark.parametrize("compress_vectors", [False, True])
def test_dgc_matches_float64_reference_and_warmup_schedule(compress_vectors):
    rng = np.random.default_rng(6)
    steps, per_stage, m, clip = 12, 2, 0.9, 30.0
    grads = [{"w": rng.normal(size=(10, 100)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
             for _ in range(steps)]
    compressor = dgc(momentum=m, clip_norm=clip, warmup_steps_per_stage=per_stage, compress_vectors=compress_vectors)
    ref = dgc_ref(grads, m, clip, DGC_SPARSITY_SCHEDULE, per_stage, compress_vectors)
    assert np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads[0].values())) > clip  # clipping is active
    seen = check_dgc(grads, compressor, ref)
    expected_w = [250, 250, 63, 63, 16, 16, 4, 4, 1, 1, 1, 1]  # ceil((1 - s) 1000) per stage, then 99.9% for good
    expected_b = [1] * steps if compress_vectors else [None] * steps  # max(1, ceil(0.25 * 3)) = 1, or dense
    assert [n["w"] for n in seen] == expected_w and [n["b"] for n in seen] == expected_b


def test_dgc_stage_at_sparsity_zero_is_dense_momentum():
    # the official code's compress_ratio == 1 (e.g. its warm-up coefficients [1, 1, ...]): no compression,
    # plain momentum, nothing accumulated or masked
    rng = np.random.default_rng(7)
    grads = [{"w": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(6)]
    compressor = dgc(momentum=0.9, clip_norm=1e9, sparsity_schedule=(0.0, 0.9), warmup_steps_per_stage=3)
    seen = check_dgc(grads, compressor, dgc_ref(grads, 0.9, 1e9, (0.0, 0.9), 3))
    assert [n["w"] for n in seen] == [None] * 3 + [4] * 3


# --- EControl ---------------------------------------------------------------------------------


def test_econtrol_matches_float64_reference():
    rng = np.random.default_rng(8)
    eta, frac, steps = 0.3, 0.25, 7
    grads = [{"w": rng.normal(size=(4, 6)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
             for _ in range(steps)]
    compressor = econtrol(eta, top_k(frac, error_feedback=False))
    compress = jax.jit(compressor.compress)
    state = compressor.init(grads[0])
    e = {k: np.zeros(g.shape) for k, g in grads[0].items()}
    h = {k: np.zeros(g.shape) for k, g in grads[0].items()}
    for g in grads:
        dec, state, nbytes = compress(g, state, KEY, STEP)
        for k in g:  # delta = C(eta e + g - h); e = e + g - h - delta; h = h + delta; decoded = h
            gk = g[k].astype(np.float64)
            delta = topk_ref(eta * e[k] + gk - h[k], math.ceil(frac * gk.size))
            e[k] = e[k] + gk - h[k] - delta
            h[k] = h[k] + delta
            np.testing.assert_allclose(dec[k], h[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(state.error[k], e[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(state.estimate[k], h[k], rtol=1e-5, atol=1e-5)
        assert int(nbytes) == (6 + 2) * 8  # only the message delta is sent


def test_econtrol_with_identity_sends_the_gradient():
    g = worker_trees(9, w=1)
    compressor = econtrol(0.5, identity())
    state = compressor.init(g)
    for _ in range(2):
        dec, state, nbytes = compressor.compress(g, state, KEY, STEP)
        for k in g:
            np.testing.assert_allclose(dec[k], g[k], rtol=1e-6)
            np.testing.assert_array_equal(state.error[k], 0.0)
    assert int(nbytes) == tree_bytes(g)


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("make,message", [
    (lambda: top_k(1.5), "k_fraction must be in (0, 1], got 1.5"),
    (lambda: top_k(0.0), "k_fraction must be in (0, 1], got 0.0"),
    (lambda: top_k(0.5, error_feedback="yes"), "error_feedback must be a bool, got 'yes'"),
    (lambda: quantize("int3"), "fmt must be one of ('bf16', 'int8', 'int4', 'fp8_e4m3', 'e3m0'), got 'int3'"),
    (lambda: quantize("int8", block_size=0), "block_size must be None or an int >= 1, got 0"),
    (lambda: quantize("bf16", block_size=8), "block_size must be None for fmt='bf16' (it has no scale), got 8"),
    (lambda: quantize("int8", stochastic_rounding=1), "stochastic_rounding must be a bool, got 1"),
    (lambda: dgc(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
    (lambda: dgc(clip_norm=-1.0), "clip_norm must be None or a finite number > 0, got -1.0"),
    (lambda: dgc(sparsity_schedule=(0.5, 1.0)),
     "sparsity_schedule must be a non-empty sequence of numbers in [0, 1), got (0.5, 1.0)"),
    (lambda: dgc(sparsity_schedule=()), "sparsity_schedule must be a non-empty sequence of numbers in [0, 1), got ()"),
    (lambda: dgc(warmup_steps_per_stage=0), "warmup_steps_per_stage must be an int >= 1, got 0"),
    (lambda: dgc(compress_vectors=1), "compress_vectors must be a bool, got 1"),
    (lambda: econtrol(eta=1.5), "eta must be in [0, 1], got 1.5"),
    (lambda: econtrol(compressor="top_k"), "compressor must be a Compressor, got 'top_k'"),
])
def test_bad_arguments_raise_naming_the_value(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
