"""M-SGC (Krishnan et al. 2023), the paper's layout: its load is the paper's and covers one gradient exactly; every
straggler pattern of the (B, W, lambda)-bursty model decodes every job by its deadline to the uncoded sum (float64);
the schedule and decoding rounds equal an independent replay of the authors' token simulator; out-of-model patterns
can defeat it; the two master rules on times."""

import itertools

import numpy as np
import pytest

from jaxopt_lab.distributed import MultiplexedSGC, follows_bursty_model, multiplexed, unit_times


def paper_load(n, B, W, lam):
    """The authors' ``normalized_load``."""
    if lam == n:
        return (W - 1 + B) / (n * (W - 1))
    return ((lam + 1) * (W - 1 + B)) / (n * (B + (W - 1) * (lam + 1)))


@pytest.mark.parametrize("n,B,W,lam", [(4, 1, 2, 1), (4, 2, 3, 2), (5, 1, 3, 0), (6, 3, 4, 2), (3, 1, 2, 3)])
def test_load_is_the_papers_and_the_data_is_one_gradient(n, B, W, lam):
    sch = multiplexed(n, B, W, lam)
    assert sch.delay == W - 2 + B
    assert sch.load == pytest.approx(paper_load(n, B, W, lam), rel=1e-12)
    res = sch.run(W - 1 + B, stragglers=np.zeros((2 * (W - 1 + B), n), bool))
    assert res.loads[W - 2 + B] == pytest.approx(np.full(n, paper_load(n, B, W, lam)), rel=1e-12)  # a full round
    ell = sch.task_load  # chunks: n (W-1) of ell; groups: B n partitions of ell / (lam + 1)
    data = n * (W - 1) * ell + (0 if lam == n else B * n * ell / (lam + 1))
    assert data == pytest.approx(1.0, rel=1e-12)


def authors_replay(n, B, W, lam, jobs, stragglers):
    """The authors' simulator's rule on tokens (state[worker, minitask, round]: 0 a chunk, b+1 group b's coded
    task, -1 straggled), written independently of the package: the round each job decodes in, or -1."""
    D1, mt = W - 1, W - 1 + B
    rounds = jobs + W - 2 + B
    state = np.full((n, mt, rounds), np.nan)

    def diag(job):  # (n, mt): the tokens of job's mini-tasks so far
        return np.stack([state[:, m, job + m] if job + m < rounds else np.full(n, np.nan) for m in range(mt)], 1)

    def decodable(job):
        t = diag(job)
        return bool(((t == 0).sum(1) >= D1).all() and all(((t == b + 1).sum() >= n - lam) or lam == n
                                                          for b in range(B)))

    out = np.full(jobs, -1)
    for r in range(rounds):
        res = np.full((n, mt), np.nan)
        for m in range(mt):
            job = r - m
            if not 0 <= job < jobs:
                continue
            if m < D1:
                res[:, m] = 0
            else:
                res[:, m] = np.where((diag(job) == 0).sum(1) >= D1, m - D1 + 1, 0)
        res[stragglers[r]] = -1
        state[:, :, r] = res
        for job in range(max(0, r - mt + 1), min(r + 1, jobs)):
            if out[job] < 0 and decodable(job):
                out[job] = r
    return out


def in_model_patterns(n, B, W, lam, rounds):
    """Every (rounds, n) straggler pattern of the bursty model, grown round by round."""
    masks = [np.array(bits, bool) for bits in itertools.product([0, 1], repeat=n)]
    patterns = [np.zeros((0, n), bool)]
    for _ in range(rounds):
        patterns = [np.vstack([p, m]) for p in patterns for m in masks if follows_bursty_model(p, m, B, W, lam)]
    return patterns


@pytest.mark.parametrize("n,B,W,lam", [(3, 1, 2, 1), (3, 1, 3, 1), (3, 2, 3, 1), (4, 1, 2, 2)])
def test_every_in_model_pattern_decodes_exactly_by_the_deadline(n, B, W, lam):
    jobs = 2
    sch = multiplexed(n, B, W, lam)
    rounds = jobs + sch.delay
    patterns = in_model_patterns(n, B, W, lam, rounds)
    assert len(patterns) > 10
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(jobs, sch.partitions(), 3))
    for pat in patterns:
        res = sch.run(jobs, stragglers=pat)  # raises if a job missed its deadline
        assert np.all(res.decoded_round <= np.arange(jobs) + sch.delay)
        np.testing.assert_array_equal(res.decoded_round, authors_replay(n, B, W, lam, jobs, pat))
        for j in range(jobs):
            np.testing.assert_allclose(sch.decode(res, j, grads[j]), grads[j].sum(0), rtol=1e-10, atol=1e-10)
        live = [sum(0 <= r - m < jobs for m in range(W - 1 + B)) for r in range(rounds)]  # diagonals with a job
        np.testing.assert_allclose(res.loads, np.array(live)[:, None] * sch.task_load * np.ones(n), rtol=1e-12)


def test_out_of_model_patterns_can_defeat_it_and_match_the_replay():
    n, B, W, lam, jobs = 3, 1, 2, 1, 2
    sch = multiplexed(n, B, W, lam)
    rounds = jobs + sch.delay
    masks = [np.array(bits, bool) for bits in itertools.product([0, 1], repeat=n)]
    failed = 0
    for pat in itertools.product(masks, repeat=rounds):
        pat = np.stack(pat)
        replay = authors_replay(n, B, W, lam, jobs, pat)
        late = np.any(replay > np.arange(jobs) + sch.delay) or np.any(replay < 0)
        try:
            res = sch.run(jobs, stragglers=pat)
        except RuntimeError:
            assert late
            failed += 1
            continue
        assert not late
        np.testing.assert_array_equal(res.decoded_round, replay)
    assert failed > 0


def test_master_rules_on_times():
    n, B, W, lam, jobs = 6, 2, 3, 2, 30
    u = unit_times(n, jobs + 3, seed=5, burst_prob=0.2)
    grads = np.random.default_rng(1).normal(size=(jobs, multiplexed(n, B, W, lam).partitions(), 2))
    for mu in (None, 0.0, 2.0):
        sch = multiplexed(n, B, W, lam, mu=mu)
        res = sch.run(jobs, unit_time=u)
        for r in range(res.stragglers.shape[0]):  # every round's stragglers stay in the model
            assert follows_bursty_model(res.stragglers[:r], res.stragglers[r], B, W, lam)
        for j in range(jobs):
            np.testing.assert_allclose(sch.decode(res, j, grads[j]), grads[j].sum(0), rtol=1e-10, atol=1e-10)
        finish = res.loads * u[:len(res.round_times)]
        if mu is None:  # the last returned worker ends the round; every one not returned finishes later
            for r in range(len(res.round_times)):
                back = ~res.stragglers[r]
                assert res.round_times[r] == finish[r][back].max()
                assert np.all(finish[r][res.stragglers[r]] >= res.round_times[r])
        else:  # the authors' rule: slower than (1 + mu) x the fastest straggle if that stays in the model, else all wait
            for r in range(len(res.round_times)):
                wait = (1 + mu) * finish[r].min()
                late = finish[r] > wait
                ok = follows_bursty_model(res.stragglers[:r], late, B, W, lam)
                assert res.round_times[r] == (wait if ok else finish[r].max())
                np.testing.assert_array_equal(res.stragglers[r], late if ok else np.zeros(n, bool))
            assert res.stragglers.any() or mu == 0.0  # mu = 0: n - 1 stragglers, never in the model


def test_the_authors_example_configuration():
    """Their test.py's M-SGC: n = 100, (B, W, lambda) = (2, 3, 2), mu = 0.1 (times here: equal speeds, rare bursts)."""
    n, B, W, lam, jobs = 100, 2, 3, 2, 8
    sch = multiplexed(n, B, W, lam, mu=0.1)
    assert sch.delay == 3 and sch.load == pytest.approx(3 * 4 / (100 * (2 + 2 * 3)), rel=1e-12)
    res = sch.run(jobs, unit_time=unit_times(n, jobs + 3, "homogeneous", jitter_sigma=0.02, burst_prob=0.01, seed=2))
    assert res.stragglers.any()
    np.testing.assert_array_equal(res.decoded_round, authors_replay(n, B, W, lam, jobs, res.stragglers))
    g = np.random.default_rng(0).normal(size=(sch.partitions(), 2))
    np.testing.assert_allclose(sch.decode(res, jobs - 1, g), g.sum(0), rtol=1e-10, atol=1e-10)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="B must be in"):
        MultiplexedSGC(4, 3, 3, 1)
    with pytest.raises(ValueError, match="W must be >= 2"):
        multiplexed(4, 1, 1, 1)
    with pytest.raises(ValueError, match="lam must be in"):
        multiplexed(4, 1, 2, 5)
    with pytest.raises(ValueError, match="mu must be"):
        multiplexed(4, 1, 2, 1, mu=-1.0)
    with pytest.raises(ValueError, match="shape"):
        multiplexed(4, 1, 2, 1).run(3, stragglers=np.zeros((3, 4), bool))
