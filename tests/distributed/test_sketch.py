"""Sketch compressor: float64 references of R x and R^T R x rebuilt from the random draws, E[R^T R] = I
(unbiased de-sketch), JL norm statistics, shared R across workers, DP noise scale, bytes, bad arguments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, data_parallel
from jaxopt_lab.distributed.compression import compressed_pmean, dp_sigma, sketch
from jaxopt_lab.distributed.compression.sketch import (
    apply_desketch,
    apply_sketch,
    sketch_ingredients,
    sketch_keys,
    sketch_rows,
)

KINDS = ("gaussian", "srht", "countsketch")


def dense_r64(kind, ing, s, n):
    """R in float64 numpy from the random draws (independent of the fast transforms)."""
    ing = {k: np.asarray(v) for k, v in ing.items()}
    if kind == "gaussian":
        return ing["g"].astype(np.float64) / math.sqrt(s)
    if kind == "srht":
        m = ing["signs"].shape[0]
        h = scipy.linalg.hadamard(m).astype(np.float64) / math.sqrt(m)
        r = math.sqrt(m / s) * (h * ing["signs"].astype(np.float64)[None, :])[ing["rows"]]
        return r[:, :n]
    r = np.zeros((s, n))
    r[ing["buckets"], np.arange(n)] = ing["signs"]
    return r


@pytest.mark.parametrize("kind", KINDS)
def test_compress_matches_float64_reference(kind):
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(6, 7)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    comp = sketch(kind, ratio=0.4, seed=3)
    step = jnp.int32(5)
    decoded, _, nbytes = jax.jit(comp.compress)(tree, comp.init(tree), jax.random.key(0), step)
    leaves, treedef = jax.tree.flatten(tree)
    keys = sketch_keys(3, step, len(leaves))
    expect_bytes = 0
    for x, k, got in zip(leaves, keys, treedef.flatten_up_to(decoded)):
        n = x.size
        s = sketch_rows(n, 0.4)
        r = dense_r64(kind, sketch_ingredients(kind, k, s, n), s, n)
        ref = r.T @ (r @ x.ravel().astype(np.float64))
        np.testing.assert_allclose(np.asarray(got).ravel(), ref, rtol=1e-4, atol=1e-4)
        expect_bytes += 4 * s
    assert int(nbytes) == expect_bytes == 4 * (math.ceil(0.4 * 42) + math.ceil(0.4 * 5))


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_desketch_and_jl_norm(kind):
    """E[R^T R] = I (Monte Carlo over 4000 draws) and E||Rx||^2 = ||x||^2 (Gaussian: Var = 2/s)."""
    n, s, draws = 24, 8, 3000
    x = jnp.asarray(np.random.default_rng(1).normal(size=n), jnp.float32)

    def one(key):
        ing = sketch_ingredients(kind, key, s, n)
        y = apply_sketch(kind, ing, x, s)
        return apply_desketch(kind, ing, y, n), jnp.sum(y**2) / jnp.sum(x**2)

    dec, ratio = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(2), draws))
    dec, ratio = np.asarray(dec, np.float64), np.asarray(ratio, np.float64)
    # per coordinate, the mean of R^T R x is x within 5 standard errors
    se = dec.std(axis=0) / math.sqrt(draws)
    assert np.all(np.abs(dec.mean(axis=0) - np.asarray(x)) < 5 * se + 1e-6)
    # a biased de-sketch (e.g. missing sqrt(m/s)) would miss by far more
    assert abs(ratio.mean() - 1) < 5 * ratio.std() / math.sqrt(draws)
    if kind == "gaussian":
        assert abs(ratio.var() - 2 / s) < 0.25 * (2 / s)
    # with s = n the Gaussian/count sketches are not exact, but SRHT with all rows is orthogonal: exact
    if kind == "srht":
        ing = sketch_ingredients(kind, jax.random.key(9), 32, 32)
        v = jnp.asarray(np.random.default_rng(3).normal(size=32), jnp.float32)
        np.testing.assert_allclose(apply_desketch(kind, ing, apply_sketch(kind, ing, v, 32), 32), v, atol=1e-5)


def test_expected_rtr_is_identity_matrix():
    n, s = 10, 4
    for kind in KINDS:
        ings = jax.jit(jax.vmap(lambda k: sketch_ingredients(kind, k, s, n)))(jax.random.split(jax.random.key(4), 1500))
        ings = {k: np.asarray(v) for k, v in ings.items()}
        rs = [dense_r64(kind, {k: v[i] for k, v in ings.items()}, s, n) for i in range(1500)]
        mean = np.mean([r.T @ r for r in rs], axis=0)
        np.testing.assert_allclose(mean, np.eye(n), atol=0.15, err_msg=kind)


def test_workers_share_r_so_mean_of_desketch_is_desketch_of_mean():
    w, n = 4, 30
    trees = {"a": np.random.default_rng(5).normal(size=(w, n)).astype(np.float32)}
    comp = sketch("countsketch", ratio=0.3, seed=1)

    def one(tree, key):
        mean, _, nbytes = compressed_pmean(tree, comp.init(tree), key, jnp.int32(2), comp, "workers")
        return mean, nbytes

    mean, nbytes = jax.jit(jax.vmap(one, axis_name="workers"))(trees, jax.random.split(jax.random.key(0), w))
    direct, _, _ = jax.jit(comp.compress)({"a": trees["a"].mean(0)}, (), jax.random.key(0), jnp.int32(2))
    np.testing.assert_allclose(mean["a"][0], direct["a"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nbytes, [4 * 9] * w)
    # another step draws another R; refresh=False keeps step 0's
    other, _, _ = jax.jit(comp.compress)({"a": trees["a"][0]}, (), jax.random.key(0), jnp.int32(3))
    same, _, _ = jax.jit(comp.compress)({"a": trees["a"][0]}, (), jax.random.key(0), jnp.int32(2))
    assert not np.allclose(other["a"], same["a"])
    fixed = sketch("countsketch", ratio=0.3, seed=1, refresh=False)
    f0, _, _ = jax.jit(fixed.compress)({"a": trees["a"][0]}, (), jax.random.key(0), jnp.int32(0))
    f7, _, _ = jax.jit(fixed.compress)({"a": trees["a"][0]}, (), jax.random.key(0), jnp.int32(7))
    np.testing.assert_array_equal(f0["a"], f7["a"])


def test_dp_sigma_clipping_and_noise():
    assert dp_sigma(0.5, 1e-5, 2.0) == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e5)) / 0.5, rel=1e-12)
    n = 64
    x = {"v": jnp.full((n,), 10.0)}  # norm 80, clipped to 1
    clipped = sketch("srht", ratio=1.0, clip_norm=1.0)  # SRHT with s = n: R^T R = I, so decoded = clipped x
    dec, _, _ = jax.jit(clipped.compress)(x, (), jax.random.key(0), jnp.int32(0))
    np.testing.assert_allclose(np.linalg.norm(dec["v"]), 1.0, rtol=1e-5)
    noisy = sketch("srht", ratio=1.0, clip_norm=1.0, noise_sigma=0.5)
    decs = jax.vmap(lambda k: jax.jit(noisy.compress)(x, (), k, jnp.int32(0))[0]["v"])(jax.random.split(jax.random.key(1), 400))
    resid = np.asarray(decs) - np.asarray(dec["v"])
    assert abs(resid.std() - 0.5) < 0.02 and abs(resid.mean()) < 0.01
    dp = sketch("gaussian", ratio=0.5, dp=(0.9, 1e-5), clip_norm=1.0)
    a, _, _ = jax.jit(dp.compress)(x, (), jax.random.key(0), jnp.int32(0))
    b, _, _ = jax.jit(dp.compress)(x, (), jax.random.key(1), jnp.int32(0))
    assert not np.allclose(a["v"], b["v"])  # per-worker noise from the worker's key


def test_in_data_parallel_bytes_and_descent():
    from tests.distributed.problem import run  # noqa: F401  (the shared least-squares harness exists)

    w, d = 4, 40
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(w, 16, d)), jnp.float32)
    xstar = jnp.asarray(rng.normal(size=d), jnp.float32)
    b = a @ xstar
    tx = data_parallel(optax.sgd(0.02), compressor=sketch("gaussian", ratio=0.5, seed=0))
    params = {"x": jnp.zeros((d,))}
    runner = WorkerRunner(w)
    state = runner.replicate(tx.init(params))
    ps = runner.replicate(params)

    def loss(p, ai, bi):
        return 0.5 * jnp.mean((ai @ p["x"] - bi) ** 2)

    @jax.jit
    def step(ps, state):
        def one(p, st, ai, bi):
            g = jax.grad(loss)(p, ai, bi)
            u, st = tx.update(g, st, p)
            return optax.apply_updates(p, u), st
        return jax.vmap(one, axis_name="workers")(ps, state, a, b)

    l0 = float(jnp.mean(jax.vmap(loss)(ps, a, b)))
    for _ in range(150):
        ps, state = step(ps, state)
    assert float(jnp.mean(jax.vmap(loss)(ps, a, b))) < 0.2 * l0
    np.testing.assert_array_equal(communicated_bytes(state), [150 * 4 * 20] * w)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="fft"), "kind"),
    (dict(ratio=0.0), "ratio"),
    (dict(ratio=1.5), "ratio"),
    (dict(seed=-1), "seed"),
    (dict(dp=(0.5, 1e-5)), "clip_norm"),
    (dict(dp=(2.0, 1e-5), clip_norm=1.0), "epsilon"),
    (dict(dp=(0.5, 0.0), clip_norm=1.0), "delta"),
    (dict(noise_sigma=1.0), "clip_norm"),
    (dict(noise_sigma=1.0, dp=(0.5, 1e-5), clip_norm=1.0), "not both"),
    (dict(clip_norm=-1.0), "clip_norm"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sketch(**kwargs)


def test_huge_dense_gaussian_is_refused_before_compute():
    big = jax.ShapeDtypeStruct((1 << 16, 1 << 12), jnp.float32)  # 2**28 entries, s = 2**26 rows at ratio 0.25
    comp = sketch("gaussian", ratio=0.25)
    with pytest.raises(ValueError, match="srht"):
        jax.eval_shape(comp.compress, big, (), jax.random.key(0), jnp.int32(0))


@pytest.mark.parametrize("method", ["diloco", "choco_gossip"])
def test_plugs_into_diloco_and_choco_gossip(method):
    from jaxopt_lab.distributed import choco_gossip, diloco
    from tests.distributed.problem import run

    w, steps = 4, 6
    comp = sketch("srht", ratio=0.5, seed=2)
    if method == "diloco":
        tx = diloco(optax.sgd(0.05), optax.sgd(1.0), sync_every=3, compressor=comp)
    else:
        tx = choco_gossip(optax.sgd(0.05), "ring", compressor=comp, consensus_lr=0.5)
    params, state = run(WorkerRunner(w), tx, steps, w)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    per_payload = 4 * (3 + 1)  # w: ceil(0.5 * 5) = 3 values, b (a scalar): 1 value
    expected = 2 * per_payload if method == "diloco" else steps * 2 * per_payload  # 2 syncs / 2 ring neighbours a step
    np.testing.assert_array_equal(communicated_bytes(state), [expected] * w)
