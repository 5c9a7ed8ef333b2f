"""Refined schedules (Defazio et al. 2023, arXiv 2310.07831)."""

import json
import statistics

import jax
import numpy as np
import pytest

from jaxopt_lab.schedules import (
    grad_norms_from_run,
    median_smooth,
    refined_schedule,
    refined_schedule_from_run,
    refined_schedule_weights,
)

NORMS = [3.0, 1.0, 2.5, 0.5, 4.0, 2.0, 1.5, 0.8, 5.0, 1.2]


def reference_weights(norms, window, power):
    """Plain-Python float64 version of ŵ_t = ĝ_t^{-p} Σ_{s>t} ĝ_s^{-p}, normalized to max 1."""
    n = len(norms)
    # the authors' padding: the end mirrored (np.pad "reflect", 2 * window values), the start repeated
    ext = [float(v) for v in norms]
    while len(ext) < n + 2 * window:  # reflect about the last value, bouncing off both ends
        ext = ext + ext[-2::-1]
    ext = ext[: n + 2 * window]
    smoothed = []
    for i in range(n):
        idx = [max(j, 0) for j in range(i - window // 2, i + (window - 1) // 2 + 1)]
        smoothed.append(statistics.median_high([ext[j] for j in idx]))  # scipy's rank window // 2
    w = []
    for t in range(n):
        tail = sum(smoothed[s] ** -power for s in range(t + 1, n))
        w.append(smoothed[t] ** -power * tail)
    top = max(w)
    return [x / top for x in w]


@pytest.mark.parametrize("method,power", [("sgd", 2), ("adam", 1)])
@pytest.mark.parametrize("window", [1, 2, 3, 4])
def test_matches_reference(method, power, window):
    got = refined_schedule_weights(NORMS, smoothing_window=window, method=method)
    want = reference_weights(NORMS, window, power)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert got.max() == 1.0 and got[-1] == 0.0


def test_hand_computed_sgd_no_smoothing():
    # g = (1, 2, 1): g^-2 = (1, 1/4, 1); w = (1*(1/4+1), 1/4*1, 0) = (5/4, 1/4, 0).
    np.testing.assert_allclose(refined_schedule_weights([1.0, 2.0, 1.0], 1, "sgd"), [1.0, 0.2, 0.0])
    # adam: g^-1 = (1, 1/2, 1); w = (3/2, 1/2, 0).
    np.testing.assert_allclose(refined_schedule_weights([1.0, 2.0, 1.0], 1, "adam"), [1.0, 1 / 3, 0.0])


def test_median_smooth_is_the_authors_recipe():
    # facebookresearch/adaptive_scheduling README: median_filter(np.pad(g, (0, pad), mode='reflect'),
    # size=width, mode='nearest')[:-pad] with pad = 2 * width
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).uniform(0.1, 5.0, size=37)
    for k in (1, 2, 3, 4, 5, 9, 21):
        want = ndimage.median_filter(np.pad(x, (0, 2 * k), mode="reflect"), size=k, mode="nearest")[: -2 * k]
        np.testing.assert_allclose(median_smooth(x, k), want, rtol=0, atol=0)


def test_default_window_is_the_authors_tenth_of_the_run():
    # sigma2 = 0.1 in their scripts: width 2 * (int(0.1 * T) // 2) + 1 (odd)
    norms = np.random.default_rng(1).uniform(0.5, 3.0, size=57)
    np.testing.assert_allclose(refined_schedule_weights(norms), refined_schedule_weights(norms, smoothing_window=5))
    assert not np.allclose(refined_schedule_weights(norms), refined_schedule_weights(norms, smoothing_window=1))


def test_median_filter_removes_spike():
    norms = np.ones(20)
    norms[7] = 100.0
    np.testing.assert_allclose(
        refined_schedule_weights(norms, smoothing_window=3), refined_schedule_weights(np.ones(20), smoothing_window=3)
    )


@pytest.mark.parametrize("method", ["sgd", "adam"])
@pytest.mark.parametrize("window", [1, 5, None])
def test_constant_norms_give_linear_decay_to_zero(method, window):
    T = 50
    w = refined_schedule_weights(np.full(T, 0.37), smoothing_window=window, method=method)
    np.testing.assert_allclose(w, (T - 1 - np.arange(T)) / (T - 1), rtol=1e-12, atol=1e-15)


def test_growing_late_norms_anneal_faster_than_linear():
    T = 40
    w = refined_schedule_weights(np.linspace(1.0, 4.0, T), smoothing_window=1)
    linear = (T - 1 - np.arange(T)) / (T - 1)
    assert np.all(w[1:-1] < linear[1:-1])


def test_shrinking_early_norms_give_warmup():
    # large early norms -> small early learning rates: the peak is not at step 0.
    norms = np.concatenate([np.linspace(10.0, 1.0, 10), np.ones(30)])
    w = refined_schedule_weights(norms, smoothing_window=1)
    assert np.argmax(w) > 0 and w[0] < 0.1


def test_schedule_is_jittable_with_peak_and_tail():
    norms = np.random.default_rng(1).uniform(0.5, 2.0, size=30)
    peak = 0.3
    sched = refined_schedule(norms, peak, smoothing_window=3)
    steps = np.arange(40)
    vals = np.asarray(jax.jit(jax.vmap(sched))(steps))
    want = peak * refined_schedule_weights(norms, smoothing_window=3)
    np.testing.assert_allclose(vals[:30], want, rtol=1e-6, atol=1e-7)
    assert np.isclose(vals.max(), peak, rtol=1e-6)
    np.testing.assert_array_equal(vals[30:], vals[29])  # past the end: last value (0)
    assert float(jax.jit(sched)(29)) == 0.0 and float(jax.jit(sched)(10_000)) == 0.0


def test_schedule_works_in_optax_optimizer():
    import jax.numpy as jnp
    import optax

    sched = refined_schedule(np.ones(5), 0.1, smoothing_window=1)
    tx = optax.sgd(sched)
    params = jnp.ones(3)
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(jnp.ones(3), state, params)
    np.testing.assert_allclose(updates, -0.1 * np.ones(3), rtol=1e-6)
    updates, state = step(jnp.ones(3), state, params)
    np.testing.assert_allclose(updates, -0.075 * np.ones(3), rtol=1e-6)


def test_warmup_ramps_linearly():
    T, warm = 20, 4
    sched = jax.jit(refined_schedule(np.ones(T), 1.0, warmup_steps=warm, smoothing_window=1))
    base = refined_schedule_weights(np.ones(T), smoothing_window=1)
    got = np.array([float(sched(t)) for t in range(T)])
    ramp = np.minimum(1.0, np.arange(T) / warm)
    np.testing.assert_allclose(got, base * ramp, rtol=1e-6, atol=1e-7)
    assert got[0] == 0.0


def _write_metrics(run_dir, records, trailing_partial=False):
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        if trailing_partial:
            f.write('{"step": 99, "grad_')


def test_from_run_reads_metrics(tmp_path):
    norms = [2.0, 1.0, 3.0, 0.5, 1.5, 1.0]
    records = [{"step": 0, "eval_loss": 1.0, "wall_time": 0.0}]
    records += [{"step": i + 1, "loss": 0.1, "grad_norm": g, "wall_time": 0.1 * i} for i, g in enumerate(norms)]
    _write_metrics(tmp_path, records, trailing_partial=True)
    np.testing.assert_array_equal(grad_norms_from_run(str(tmp_path)), norms)
    sched = refined_schedule_from_run(str(tmp_path), 0.5, smoothing_window=1)
    got = np.asarray(jax.jit(jax.vmap(sched))(np.arange(len(norms))))
    np.testing.assert_allclose(got, 0.5 * refined_schedule_weights(norms, smoothing_window=1), rtol=1e-6, atol=1e-7)


def test_from_run_other_key_and_gaps(tmp_path):
    records = [{"step": 1, "upd_l1": 1.0}, {"step": 3, "upd_l1": 3.0}, {"step": 2, "loss": 0.0}, {"step": 4, "upd_l1": 2.0}]
    _write_metrics(tmp_path, records)
    np.testing.assert_allclose(grad_norms_from_run(str(tmp_path), key="upd_l1"), [1.0, 2.0, 3.0, 2.0])
    sched = refined_schedule_from_run(str(tmp_path), 1.0, key="upd_l1", method="adam", smoothing_window=1)
    assert float(sched(3)) == 0.0


def test_from_run_missing_key(tmp_path):
    _write_metrics(tmp_path, [{"step": 0, "loss": 1.0}])
    with pytest.raises(ValueError, match="'grad_norm'"):
        refined_schedule_from_run(str(tmp_path), 0.1)
    with pytest.raises(ValueError, match="'grad_norm'"):
        refined_schedule_from_run(str(tmp_path / "nowhere"), 0.1)


@pytest.mark.parametrize(
    "norms,match",
    [
        ([], "got 0"),
        ([1.0], "got 1"),
        ([1.0, 0.0, 2.0], r"grad_norms\[1\] = 0.0"),
        ([1.0, 2.0, -3.0], r"grad_norms\[2\] = -3.0"),
        ([1.0, float("nan")], r"grad_norms\[1\] = nan"),
        ([1.0, float("inf")], r"grad_norms\[1\] = inf"),
        ([[1.0, 2.0]], "1-D"),
    ],
)
def test_bad_norms(norms, match):
    with pytest.raises(ValueError, match=match):
        refined_schedule_weights(norms)
    with pytest.raises(ValueError, match=match):
        refined_schedule(norms, 0.1)


@pytest.mark.parametrize("peak", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_peak(peak):
    with pytest.raises(ValueError, match="peak_value"):
        refined_schedule([1.0, 2.0], peak)


@pytest.mark.parametrize("window", [0, -2, 1.5, True])
def test_bad_window(window):
    with pytest.raises(ValueError, match=rf"smoothing_window must be .*got {window!r}"):
        refined_schedule_weights([1.0, 2.0, 3.0], smoothing_window=window)


def test_bad_method_and_warmup():
    with pytest.raises(ValueError, match="'adagrad'"):
        refined_schedule_weights([1.0, 2.0], method="adagrad")
    with pytest.raises(ValueError, match="warmup_steps.*-1"):
        refined_schedule([1.0, 2.0], 0.1, warmup_steps=-1)
