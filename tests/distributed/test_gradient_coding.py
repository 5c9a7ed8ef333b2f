"""Gradient coding (Tandon et al.) and sequential gradient coding (Krishnan et al.): the full gradient recovered
exactly (float64, against the uncoded sum) for EVERY straggler pattern up to s, undecodable beyond; the worker-axis
decode under vmap; the SGC schemes over every straggler pattern of a few rounds; simulated round times against
independent order statistics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.distributed.gradient_coding import (
    coded_psum,
    cyclic_repetition_code,
    decoding_vector,
    encode,
    fractional_repetition_code,
    gradient_code,
)
from jaxopt_lab.distributed.sequential_gradient_coding import (
    SGCScheme,
    plain_gc,
    selective_repetition,
    unit_times,
    wait_for_all,
)

CASES = [("cyclic", n, s) for n in (4, 5, 6) for s in range(n)] + [
    ("fractional", n, s) for n in (4, 6) for s in range(n) if n % (s + 1) == 0
]


def patterns(n, max_stragglers):
    for k in range(max_stragglers + 1):
        for dead in itertools.combinations(range(n), k):
            alive = np.ones(n, bool)
            alive[list(dead)] = False
            yield alive


@pytest.mark.parametrize("kind, n, s", CASES)
def test_every_pattern_up_to_s_recovers_the_full_gradient(kind, n, s):
    code = gradient_code(kind, n, s, seed=n + s)
    # support: every worker computes exactly s + 1 partitions; every partition is held by s + 1 workers
    assert np.all((np.abs(code.B) > 0).sum(axis=1) == s + 1)
    assert np.all((np.abs(code.B) > 0).sum(axis=0) == s + 1)
    g = np.random.default_rng(0).normal(size=(n, 3))  # partition gradients
    full = g.sum(axis=0)
    messages = code.B @ g
    count = 0
    for alive in patterns(n, s):
        a = decoding_vector(code, alive)
        assert a is not None, alive
        assert np.all(a[~alive] == 0)
        np.testing.assert_allclose(a @ messages, full, rtol=1e-9, atol=1e-9)
        count += 1
    assert count == sum(len(list(itertools.combinations(range(n), k))) for k in range(s + 1))


@pytest.mark.parametrize("kind, n, s", [c for c in CASES if c[2] < c[1] - 1])
def test_more_than_s_stragglers_can_defeat_the_code(kind, n, s):
    code = gradient_code(kind, n, s, seed=1)
    defeated = [decoding_vector(code, alive) is None for alive in patterns(n, s + 1)
                if (~alive).sum() == s + 1]
    if kind == "cyclic":
        assert all(defeated)  # n - s - 1 rows of an (n - s)-dim space never span 1 (generic H)
    else:
        assert any(defeated)  # a whole group gone


def test_cyclic_code_rows_in_null_space_and_bad_arguments():
    code = cyclic_repetition_code(7, 3, seed=2)
    assert code.load == 4 / 7
    np.testing.assert_allclose(np.diag(code.B), 1.0)
    with pytest.raises(ValueError, match="s \\+ 1 to divide n"):
        fractional_repetition_code(5, 1)
    with pytest.raises(ValueError, match="s \\(stragglers\\)"):
        cyclic_repetition_code(4, 4)
    with pytest.raises(ValueError, match="kind"):
        gradient_code("mds", 4, 1)
    with pytest.raises(ValueError, match="alive"):
        decoding_vector(code, np.ones(3, bool))


def test_worker_axis_encode_and_coded_psum_under_vmap():
    n, s = 6, 2
    code = cyclic_repetition_code(n, s, seed=3)
    rng = np.random.default_rng(4)
    g = {"w": rng.normal(size=(n, 4, 3)).astype(np.float32), "b": rng.normal(size=(n, 3)).astype(np.float32)}
    alive = np.array([1, 0, 1, 1, 0, 1], bool)
    a = decoding_vector(code, alive)

    def worker(row, coef):
        # each worker sees all partition gradients here; only its row's support is used
        return coded_psum(encode(row, g), coef, "workers")

    out = jax.jit(jax.vmap(worker, axis_name="workers"))(jnp.asarray(code.B, jnp.float32), jnp.asarray(a, jnp.float32))
    for k in g:
        for w in range(n):
            np.testing.assert_allclose(out[k][w], g[k].astype(np.float64).sum(0), rtol=1e-4, atol=1e-4)


# --- sequential gradient coding -------------------------------------------------------------------


def coded_and_repeated(n, s, delay, rep_fraction):
    """The package's simplified coded + repeated scheme (the paper's M-SGC is tested in test_multiplexed_sgc.py)."""
    return SGCScheme(gradient_code("cyclic", n, s), rep_fraction=rep_fraction, delay=delay)


def check_exact(scheme, res, grads):
    for j in range(len(res.decoded_round)):
        assert 0 <= res.decoded_round[j] <= j + scheme.delay
        np.testing.assert_allclose(scheme.decode(res, j, grads[j]), grads[j].sum(axis=0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["gc", "sr_sgc", "m_sgc"])
def test_sgc_every_straggler_pattern_of_three_rounds(name):
    """n = 4, s = 1, 2 jobs, T = 1 (3 rounds): all 4096 straggler patterns. Whenever the run does not raise,
    every job is decoded by its deadline and equals the uncoded sum; patterns with <= s stragglers per round never
    raise; SR-SGC survives patterns with s + 1 stragglers in a round that plain GC cannot."""
    n, s, jobs = 4, 1, 2
    scheme = {"gc": plain_gc(n, s), "sr_sgc": selective_repetition(n, s, delay=1),
              "m_sgc": coded_and_repeated(n, s, delay=1, rep_fraction=0.5)}[name]
    rounds = jobs + scheme.delay
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(jobs, 2 * n, 2))
    if scheme.rep_fraction == 0:
        grads[:, :n] = 0.0  # no repetition part
    masks = [np.array(bits, bool) for bits in itertools.product([0, 1], repeat=n)]
    survived_heavy = 0
    for pat in itertools.product(masks, repeat=rounds):
        stragglers = np.stack(pat)
        try:
            res = scheme.run(jobs, stragglers=stragglers)
        except RuntimeError:
            if name != "m_sgc":
                assert stragglers[:jobs].sum(axis=1).max() > s  # only more than s stragglers can defeat GC codes
            continue
        check_exact(scheme, res, grads)
        survived_heavy += int(stragglers[:jobs].sum(axis=1).max() > s)
    if name == "gc":
        assert survived_heavy == 0
    elif name == "sr_sgc":
        assert survived_heavy > 0


def test_sgc_round_times_match_order_statistics():
    n, s, jobs = 6, 2, 12
    u = unit_times(n, jobs + 2, seed=3)
    res = wait_for_all(n).run(jobs, unit_time=u[:jobs])
    np.testing.assert_allclose(res.round_times, (u[:jobs] / n).max(axis=1), rtol=1e-12)
    res = plain_gc(n, s).run(jobs, unit_time=u[:jobs])
    np.testing.assert_allclose(res.round_times, np.sort(u[:jobs] * (s + 1) / n, axis=1)[:, n - s - 1], rtol=1e-12)
    assert res.stragglers.sum(axis=1).tolist() == [s] * jobs
    grads = np.random.default_rng(1).normal(size=(jobs, 2 * n, 3))
    grads[:, :n] = 0.0
    check_exact(plain_gc(n, s), res, grads)
    for scheme in (selective_repetition(n, 1, delay=2), coded_and_repeated(n, 1, delay=2, rep_fraction=0.3)):
        res = scheme.run(jobs, unit_time=u)
        g = grads.copy()
        if scheme.rep_fraction:
            g[:, :n] = np.random.default_rng(2).normal(size=(jobs, n, 3))
        check_exact(scheme, res, g)
        assert res.total_time > 0


def test_sgc_waiting_for_n_minus_lambda_with_a_lighter_code():
    """SR-SGC with s = 0 < lambda = 2: a round ends at the (n - 2)-th return unless a deadline job needs more;
    every job still exact by its deadline; bad lambda without delay raises."""
    n, jobs = 6, 10
    u = unit_times(n, jobs + 1, seed=7)
    scheme = selective_repetition(n, 0, delay=1, stragglers_per_round=2)
    res = scheme.run(jobs, unit_time=u)
    assert np.all(res.stragglers.sum(axis=1) <= 2)
    grads = np.random.default_rng(3).normal(size=(jobs, 2 * n, 2))
    grads[:, :n] = 0.0
    check_exact(scheme, res, grads)
    # round 0 has no deadline job: it ends exactly at the 4th of the 6 finish times
    np.testing.assert_allclose(res.round_times[0], np.sort(u[0] / n)[n - 3], rtol=1e-12)
    with pytest.raises(ValueError, match="needs a delay"):
        selective_repetition(n, 0, delay=0, stragglers_per_round=2)
    with pytest.raises(ValueError, match="stragglers_per_round"):
        selective_repetition(n, 0, delay=1, stragglers_per_round=n)


def test_unit_times_are_seeded_and_bursty():
    u1, u2 = unit_times(8, 50, seed=5), unit_times(8, 50, seed=5)
    np.testing.assert_array_equal(u1, u2)
    flat = unit_times(8, 50, burst_prob=0.0, jitter_sigma=0.0, speeds="homogeneous")
    np.testing.assert_array_equal(flat, np.ones((50, 8)))
    with pytest.raises(ValueError, match="burst_length"):
        unit_times(4, 3, burst_length=0)
