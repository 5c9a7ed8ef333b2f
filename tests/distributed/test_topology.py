"""Topologies: dense mixing matrices, their structure, spectral gaps against closed forms, bad inputs."""

import math

import numpy as np
import pytest

from jaxopt_lab.distributed.topology import MixingTerm, Topology, complete, exponential, ring, torus2d


def all_matrices(topology):
    return [topology.mixing_matrix(t) for t in range(topology.period)]


@pytest.mark.parametrize(
    "topology, symmetric",
    [
        (ring(2), True),
        (ring(5), True),
        (ring(8), True),
        (torus2d(4), True),
        (torus2d(8), True),
        (torus2d(12), True),
        (torus2d(16), True),
        (complete(5), True),
        (exponential(2), True),
        (exponential(8), False),
        (exponential(16, one_peer=False), False),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_mixing_matrices_are_doubly_stochastic(topology, symmetric):
    for m in all_matrices(topology):
        assert m.shape == (topology.num_workers,) * 2
        assert (m >= 0).all()
        np.testing.assert_allclose(m.sum(axis=0), 1.0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert topology.is_symmetric == symmetric


def test_ring_and_complete_weights():
    m = ring(8).mixing_matrix()
    for i in range(8):
        expected = np.zeros(8)
        expected[[i, (i + 1) % 8, (i - 1) % 8]] = 1 / 3
        np.testing.assert_allclose(m[i], expected, atol=1e-15)
    # W = 2: the two ring neighbours are one worker, counted once
    np.testing.assert_allclose(ring(2).mixing_matrix(), np.full((2, 2), 0.5))
    np.testing.assert_allclose(complete(5).mixing_matrix(), np.full((5, 5), 0.2))
    assert (ring(8).messages(), ring(2).messages(), complete(5).messages()) == (2, 1, 4)


def test_torus_neighbours_on_the_grid():
    rows, cols = 3, 4  # torus2d(12) is the most square grid, 3 x 4
    topo = torus2d(12)
    assert topo.name == "torus2d(3x4)"
    m = topo.mixing_matrix()
    for a in range(rows):
        for b in range(cols):
            expected = np.zeros(12)
            for da, db in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]:
                expected[((a + da) % rows) * cols + (b + db) % cols] = 0.2
            np.testing.assert_allclose(m[a * cols + b], expected, atol=1e-15)
    # a side of 2: up and down coincide, degree 3
    np.testing.assert_allclose(np.diag(torus2d(8).mixing_matrix()), 0.25)
    assert torus2d(8).messages() == 3
    assert torus2d(12, shape=(2, 6)).name == "torus2d(2x6)"


def bluefog_exponential(w):
    """Bluefog's ExponentialTwoGraph as an adjacency (topo[i, j] > 0: edge i -> j, j - i a power of two or 0)
    and its one-peer schedule (GetDynamicOnePeerSendRecvRanks: at round k, i sends to its k-th successor
    clockwise, and receives from whoever sends to it)."""
    x = np.array([1.0 if i & (i - 1) == 0 else 0.0 for i in range(w)])
    topo = np.stack([np.roll(x / x.sum(), i) for i in range(w)])
    succ = [sorted((j for j in np.flatnonzero(topo[i]) if j != i), key=lambda j, i=i: (j - i) % w) for i in range(w)]

    def recv_from(i, k):
        return [r for r in range(w) if r != i and succ[r][k % len(succ[r])] == i]

    return topo, recv_from


def test_one_peer_exponential_phases_and_exact_average():
    w = 8
    topo = exponential(w)
    adjacency, recv_from = bluefog_exponential(w)
    assert topo.period == 3
    for t in range(7):
        expected = 0.5 * np.eye(w)
        for i in range(w):
            (j,) = recv_from(i, t)
            expected[i, j] += 0.5
        np.testing.assert_array_equal(topo.mixing_matrix(t), expected)
        assert topo.messages(t) == 1
    # log2 W one-peer rounds average exactly (Ying et al. 2021)
    np.testing.assert_array_equal(topo.period_matrix(), np.full((w, w), 1 / w))
    static = exponential(w, one_peer=False).mixing_matrix()
    # Bluefog's neighbor_allreduce combines the in-neighbours with the edge weights: x <- topo^T x
    np.testing.assert_allclose(static, adjacency.T)
    assert set(np.flatnonzero(static[0])) == {0, 4, 6, 7}


@pytest.mark.parametrize("w", [3, 5, 8, 16])
def test_ring_spectral_gap_closed_form(w):
    assert ring(w).spectral_gap() == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / w)) / 3, abs=1e-12)


@pytest.mark.parametrize("w, rows, cols", [(9, 3, 3), (12, 3, 4), (16, 4, 4), (20, 4, 5)])
def test_torus_spectral_gap_closed_form(w, rows, cols):
    eig = [
        (1 + 2 * math.cos(2 * math.pi * p / rows) + 2 * math.cos(2 * math.pi * q / cols)) / 5
        for p in range(rows)
        for q in range(cols)
        if (p, q) != (0, 0)
    ]
    assert torus2d(w).spectral_gap() == pytest.approx(1 - max(abs(e) for e in eig), abs=1e-12)


def test_spectral_gap_of_a_disconnected_and_a_two_worker_topology():
    # workers 0 and 1 average, worker 2 is alone: eigenvalues 1, 1, 0, so no gap
    split = Topology("split", 3, ((MixingTerm((0, 1, 2), 0.5), MixingTerm((1, 0, 2), 0.5)),))
    assert split.spectral_gap() == pytest.approx(0.0, abs=1e-12)
    assert ring(2).spectral_gap() == pytest.approx(1.0, abs=1e-12)
    assert exponential(2).spectral_gap() == pytest.approx(1.0, abs=1e-12)


def test_spectral_gap_order():
    w = 16
    gaps = {name: t.spectral_gap() for name, t in [
        ("complete", complete(w)),
        ("exp_one_peer", exponential(w)),  # per period: exact averaging
        ("exp_static", exponential(w, one_peer=False)),
        ("torus", torus2d(w)),
        ("ring", ring(w)),
    ]}
    assert gaps["complete"] == pytest.approx(1.0, abs=1e-12)
    assert gaps["exp_one_peer"] == pytest.approx(1.0, abs=1e-12)
    assert gaps["exp_static"] < 1 - 1e-3 and gaps["torus"] < 1 - 1e-3
    assert min(gaps["exp_static"], gaps["torus"]) > gaps["ring"] + 0.3
    assert gaps["ring"] > 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ring(1), r"num_workers must be an int >= 2, got 1"),
        (lambda: ring(0), r"num_workers must be an int >= 2, got 0"),
        (lambda: ring(4.0), r"num_workers must be an int >= 2, got 4.0"),
        (lambda: complete(True), r"num_workers must be an int >= 2, got True"),
        (lambda: exponential(6), r"power of two, got 6"),
        (lambda: exponential(1), r"num_workers must be an int >= 2, got 1"),
        (lambda: torus2d(7), r"num_workers=7 has no such factorization"),
        (lambda: torus2d(3), r"num_workers=3 has no such factorization"),
        (lambda: torus2d(12, shape=(2, 5)), r"rows \* cols = num_workers=12 .* got \(2, 5\)"),
        (lambda: torus2d(12, shape=(1, 12)), r"got \(1, 12\)"),
        (lambda: Topology("bad", 3, ((MixingTerm((0, 1, 1), 1.0),),)), r"not a permutation of range\(3\): \(0, 1, 1\)"),
        (lambda: Topology("bad", 2, ((MixingTerm((0, 1), 0.5), MixingTerm((1, 0), 0.4)),)), r"sum to 0.9"),
        (lambda: Topology("bad", 2, ((MixingTerm((0, 1), 1.5), MixingTerm((1, 0), -0.5)),)), r"not > 0: -0.5"),
        (lambda: Topology("bad", 2, ((MixingTerm((0, 1), 0.5), MixingTerm((0, 1), 0.5)),)), r"repeats the permutation"),
    ],
)
def test_bad_inputs_name_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()
