"""Synthetic least-squares and logistic-regression problems."""

import numpy as np
import pytest

from jaxopt_lab.data import least_squares, logistic_regression, true_weights


def test_least_squares_solution_recovers_true_weights():
    ds = least_squares(num_examples=2048, dim=16, noise=0.1, seed=3)
    w = true_weights(16, 3)
    np.testing.assert_array_equal(ds.extras["w_true"], w)
    w_hat, *_ = np.linalg.lstsq(ds.x_train.astype(np.float64), ds.y_train.astype(np.float64), rcond=None)
    np.testing.assert_allclose(w_hat, w, atol=0.02)
    # And the fit generalises to the test split at the noise level.
    resid = ds.y_test - ds.x_test.astype(np.float64) @ w_hat
    assert 0.08 < np.sqrt(np.mean(resid**2)) < 0.12


def test_least_squares_noise_level():
    ds = least_squares(num_examples=4000, dim=4, noise=0.5, seed=0)
    w = ds.extras["w_true"]
    resid = ds.y_train - ds.x_train.astype(np.float64) @ w
    assert abs(resid.mean()) < 0.03  # zero-mean noise
    assert abs(np.sqrt(np.mean(resid**2)) - 0.5) < 0.03
    exact = least_squares(num_examples=64, dim=4, noise=0.0, seed=0)
    np.testing.assert_allclose(exact.y_train, exact.x_train.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_least_squares_shapes_and_types():
    ds = least_squares()
    assert ds.task == "regression" and ds.num_classes is None
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.float32
    assert ds.x_train.shape == (410, 16) and ds.y_train.shape == (410,)
    assert ds.num_test == round(0.2 * 512)
    x = np.concatenate([ds.x_train, ds.x_test])
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05  # standard normal
    assert len(np.unique(x[:, 0])) == 512  # no example duplicated across the split


def test_deterministic_per_seed_and_weights_independent_of_size():
    a, b = least_squares(seed=2), least_squares(seed=2)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(least_squares(seed=3).x_train, a.x_train)
    np.testing.assert_array_equal(least_squares(num_examples=100, seed=2).extras["w_true"], a.extras["w_true"])
    assert not np.array_equal(true_weights(16, 2), true_weights(16, 3))


def test_logistic_labels_follow_the_sigmoid():
    ds = logistic_regression(num_examples=20000, dim=8, seed=1)
    assert ds.task == "classification" and ds.num_classes == 2
    assert ds.y_train.dtype == np.int32 and set(np.unique(ds.y_train)) == {0, 1}
    w = true_weights(8, 1)
    np.testing.assert_array_equal(ds.extras["w_true"], w)
    x = np.concatenate([ds.x_train, ds.x_test]).astype(np.float64)
    y = np.concatenate([ds.y_train, ds.y_test])
    prob = 1 / (1 + np.exp(-(x @ w)))
    # Labels are Bernoulli(prob): mean matches, and the Bayes rule agrees with
    # them as often as expected (not always, as a deterministic rule would).
    assert abs(y.mean() - prob.mean()) < 0.015
    agreement = np.mean((prob > 0.5) == (y == 1))
    assert abs(agreement - np.maximum(prob, 1 - prob).mean()) < 0.015
    assert agreement < 0.99


@pytest.mark.parametrize(
    "loader, kwargs, match",
    [
        (least_squares, dict(noise=-1.0), "noise must be >= 0, got -1.0"),
        (least_squares, dict(dim=0), "dim must be >= 1, got 0"),
        (least_squares, dict(num_examples=1), "num_examples must be >= 2, got 1"),
        (least_squares, dict(test_fraction=1.0), r"test_fraction must be in the open interval \(0, 1\), got 1.0"),
        (least_squares, dict(num_examples=4, test_fraction=0.05), "gives 0 test"),
        (logistic_regression, dict(seed=-2), "seed must be >= 0, got -2"),
        (logistic_regression, dict(test_fraction=0.0), "got 0.0"),
        (logistic_regression, dict(dim=-4), "dim must be >= 1, got -4"),
    ],
)
def test_errors(loader, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loader(**kwargs)


def test_path_loads_npz(tmp_path):
    path = tmp_path / "ls.npz"
    np.savez(path, x_train=np.ones((3, 2), np.float32), y_train=np.array([1.0, 2.0, 3.0]),
             x_test=np.ones((1, 2), np.float32), y_test=np.array([4.0]))
    ds = least_squares(path=str(path))
    assert ds.task == "regression" and ds.num_train == 3
    np.testing.assert_array_equal(ds.y_test, [4.0])
