"""The scikit-learn digits loader and the stratified split under it."""

import numpy as np
import pytest

from jaxopt_lab.data import load_digits, stratified_split


@pytest.fixture(scope="module")
def raw():
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images, bunch.target


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _rows(x, y):
    """Rows (pixels..., label) sorted lexicographically, for multiset comparison."""
    table = np.concatenate([x.reshape(len(x), -1).astype(np.float64), y[:, None]], axis=1)
    return table[np.lexsort(table.T[::-1])]


def test_shapes_types_and_scaling(digits, raw):
    images, target = raw
    assert digits.input_shape == (8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert digits.num_classes == 10 and digits.task == "classification" and digits.name == "digits"
    assert digits.num_train + digits.num_test == len(target) == 1797
    assert digits.num_test == round(0.2 * 1797)
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    # Every pixel is an original 0..16 intensity divided by 16.
    np.testing.assert_array_equal(digits.x_train * 16, np.round(digits.x_train * 16))


def test_split_is_a_partition_of_the_original_data(digits, raw):
    images, target = raw
    x = np.concatenate([digits.x_train, digits.x_test])
    y = np.concatenate([digits.y_train, digits.y_test])
    np.testing.assert_array_equal(_rows(x, y), _rows(images[..., None] / 16.0, target))


def test_split_is_stratified(digits, raw):
    _, target = raw
    full = np.bincount(target, minlength=10)
    test = np.bincount(digits.y_test, minlength=10)
    # Each class gets its proportional share of the test split, up to rounding.
    assert np.all(np.abs(test - full * digits.num_test / len(target)) < 1)


def test_deterministic_per_seed(digits):
    again = load_digits()
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_train, digits.y_train)
    other = load_digits(seed=1)
    assert not np.array_equal(other.x_test, digits.x_test)


def test_test_fraction():
    ds = load_digits(test_fraction=0.5, seed=3)
    assert ds.num_test == round(0.5 * 1797)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2])
def test_bad_test_fraction(bad):
    with pytest.raises(ValueError, match=f"test_fraction must be in the open interval \\(0, 1\\), got {bad}"):
        load_digits(test_fraction=bad)


def test_path_loads_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8, 1), np.float32), y_train=np.array([0, 1, 2, 3]),
             x_test=np.ones((2, 8, 8, 1), np.float32), y_test=np.array([1, 9]))
    ds = load_digits(path=str(path))
    assert ds.num_train == 4 and ds.num_test == 2 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x_test, np.ones((2, 8, 8, 1)))


def test_stratified_split_indices():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, test = stratified_split(labels, 0.25, seed=0)
    assert len(test) == 25
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    # Shares 12.5/7.5/5: the one leftover slot goes to the tied class with the lower id.
    np.testing.assert_array_equal(np.bincount(labels[test]), [13, 7, 5])
    train2, test2 = stratified_split(labels, 0.25, seed=0)
    np.testing.assert_array_equal(train2, train)
    np.testing.assert_array_equal(test2, test)
    assert not np.array_equal(stratified_split(labels, 0.25, seed=1)[1], test)


def test_stratified_split_needs_both_splits():
    with pytest.raises(ValueError, match="gives 0 test"):
        stratified_split(np.array([0, 1, 0, 1]), 0.1, seed=0)


@pytest.mark.parametrize("classes", [[0, 1, 2, 3, 4], [9, 5, 7]])
def test_classes_keep_only_those_digits_of_the_same_split(digits, classes):
    ds = load_digits(classes=classes)
    assert set(np.unique(ds.y_train)) == set(classes) and set(np.unique(ds.y_test)) == set(classes)
    assert ds.num_classes == 10  # labels stay the digits
    # the same images as the 10-class split's of those digits, in the same order, in each split
    for x, y, x_all, y_all in ((ds.x_train, ds.y_train, digits.x_train, digits.y_train),
                               (ds.x_test, ds.y_test, digits.x_test, digits.y_test)):
        keep = np.isin(y_all, classes)
        np.testing.assert_array_equal(y, y_all[keep])
        np.testing.assert_array_equal(x, x_all[keep])
    again = load_digits(classes=classes)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_complementary_classes_partition_the_data(digits):
    low, high = load_digits(classes=[0, 1, 2, 3, 4]), load_digits(classes=[5, 6, 7, 8, 9])
    assert low.num_train + high.num_train == digits.num_train
    assert low.num_test + high.num_test == digits.num_test


@pytest.mark.parametrize("bad, err, match", [
    ([0, 10], ValueError, "10 is not a digit"),
    ([-1], ValueError, "-1 is not a digit"),
    ([3, 3], ValueError, "3 appears twice"),
    ([], ValueError, "at least one digit"),
    ([1.5], TypeError, "1.5"),
    ("01234", TypeError, "'01234'"),
])
def test_bad_classes_are_named(bad, err, match):
    with pytest.raises(err, match=match):
        load_digits(classes=bad)


def test_bad_class_in_a_config_is_a_config_error():
    from jaxopt_lab.experiment import config as config_lib
    from jaxopt_lab.experiment.build import validate

    cfg = config_lib.from_dict({"data": {"name": "digits", "classes": [4, 11]}, "model": {"name": "cnn"},
                                "method": {"name": "adam", "learning_rate": 1e-3}})
    with pytest.raises(config_lib.ConfigError, match="11 is not a digit"):
        validate(cfg)
