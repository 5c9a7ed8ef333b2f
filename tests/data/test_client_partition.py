"""Federated client partitions: IID and Dirichlet label skew."""

import numpy as np
import pytest

from jaxopt_lab.data import dirichlet_partition, iid_partition, infer_num_classes


@pytest.fixture(scope="module")
def digit_labels():
    from jaxopt_lab.data import load_digits

    return load_digits().y_train


def assert_valid_partition(part, labels):
    everything = np.concatenate(part.indices)
    # Every example is assigned exactly once.
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))
    for k, idx in enumerate(part.indices):
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0), "indices must be sorted"
        np.testing.assert_array_equal(part.label_counts[k], np.bincount(labels[idx], minlength=part.num_classes))
    np.testing.assert_array_equal(part.sizes, [len(i) for i in part.indices])
    assert part.label_counts.shape == (part.num_clients, labels.max() + 1)


def test_iid_partition(digit_labels):
    part = iid_partition(digit_labels, 7, seed=3)
    assert part.num_clients == 7
    assert_valid_partition(part, digit_labels)
    assert part.sizes.max() - part.sizes.min() <= 1
    again = iid_partition(digit_labels, 7, seed=3)
    for a, b in zip(part.indices, again.indices):
        np.testing.assert_array_equal(a, b)
    other = iid_partition(digit_labels, 7, seed=4)
    assert not np.array_equal(other.indices[0], part.indices[0])


def test_dirichlet_partition_valid_and_deterministic(digit_labels):
    part = dirichlet_partition(digit_labels, 10, alpha=0.5, seed=2, min_size=0)
    assert_valid_partition(part, digit_labels)
    again = dirichlet_partition(digit_labels, 10, alpha=0.5, seed=2, min_size=0)
    np.testing.assert_array_equal(part.label_counts, again.label_counts)
    other = dirichlet_partition(digit_labels, 10, alpha=0.5, seed=3, min_size=0)
    assert not np.array_equal(other.label_counts, part.label_counts)


def test_dirichlet_follows_documented_procedure():
    labels = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0, 1, 2, 2, 0, 1])
    part = dirichlet_partition(labels, 4, alpha=0.7, seed=9, min_size=0)
    rng = np.random.default_rng(9)
    want = [[] for _ in range(4)]
    for c in range(3):
        members = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet([0.7] * 4)
        cuts = [int(np.floor(v * len(members))) for v in np.cumsum(p)[:-1]]
        for k, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(members)])):
            want[k].extend(members[lo:hi].tolist())
    assert [idx.tolist() for idx in part.indices] == [sorted(w) for w in want]


def test_smaller_alpha_more_skew(digit_labels):
    def classes_per_client(alpha):
        part = dirichlet_partition(digit_labels, 20, alpha=alpha, seed=0, min_size=0)
        assert_valid_partition(part, digit_labels)
        return (part.label_counts > 0).sum(axis=1).mean()

    skewed, near_iid = classes_per_client(0.05), classes_per_client(100.0)
    assert skewed < 4 < 9.5 < near_iid


def test_dirichlet_min_size_error_names_clients(digit_labels):
    loose = dirichlet_partition(digit_labels, 20, alpha=0.05, seed=1, min_size=0)
    short = np.flatnonzero(loose.sizes < 50)
    assert 0 < len(short) <= 20
    listed = ", ".join(str(k) for k in short)
    with pytest.raises(ValueError, match=rf"{len(short)} of 20 clients got fewer than min_size=50 .*"
                                         rf"\(clients {listed}; .*larger alpha or another seed"):
        dirichlet_partition(digit_labels, 20, alpha=0.05, seed=1, min_size=50)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=3, alpha=0.0), "alpha must be > 0, got 0.0"),
        (dict(num_clients=3, alpha=-0.5), "alpha must be > 0, got -0.5"),
        (dict(num_clients=0, alpha=1.0), "num_clients must be >= 1, got 0"),
        (dict(num_clients=11, alpha=1.0), r"num_clients=11 exceeds the number of examples \(10\)"),
        (dict(num_clients=4, alpha=1.0, min_size=3), "min_size=3 for each of num_clients=4 needs 12 examples"),
        (dict(num_clients=2, alpha=1.0, min_size=-1), "min_size must be >= 0, got -1"),
    ],
)
def test_dirichlet_errors(kwargs, match):
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(labels, **kwargs)


def test_iid_errors_and_label_checks():
    with pytest.raises(ValueError, match=r"num_clients=5 exceeds the number of examples \(4\)"):
        iid_partition(np.array([0, 1, 0, 1]), 5)
    with pytest.raises(ValueError, match="labels must be >= 0, got minimum -1"):
        iid_partition(np.array([0, -1, 1]), 2)
    with pytest.raises(ValueError, match=r"1-D integer array, got shape \(2, 2\)"):
        iid_partition(np.zeros((2, 2), np.int64), 2)
    with pytest.raises(ValueError, match="dtype float64"):
        iid_partition(np.zeros(4), 2)


def test_summary_and_num_classes():
    labels = np.array([0, 0, 0, 0, 0, 0, 3, 3, 3, 3])
    assert infer_num_classes(labels) == 4
    part = iid_partition(labels, 3, seed=0)  # sizes 4, 3, 3
    present = (part.label_counts > 0).sum(axis=1).mean()
    text = part.summary()
    assert "3 clients, 10 examples; size min/median/max 3/3/4" in text
    assert f"classes per client mean {present:.1f} of 4" in text
