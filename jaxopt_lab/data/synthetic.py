"""Synthetic linear problems with known true weights: least squares and logistic."""

import numpy as np

from jaxopt_lab.data._checks import check_int, check_real
from jaxopt_lab.data.arrays import ArrayDataset, load_npz
from jaxopt_lab.data.splits import num_test_examples, shuffled_split

# Independent random streams per seed: np.random.default_rng([seed, stream]).
# The train/test shuffle uses np.random.default_rng(seed) (see shuffled_split).
_WEIGHTS, _INPUTS, _NOISE = 0, 1, 2


def true_weights(dim: int, seed: int) -> np.ndarray:
    """The true weight vector of the synthetic problems for ``(dim, seed)``.

    Standard normal entries, drawn from their own stream so they do not depend
    on ``num_examples`` or ``noise``.

    Args:
      dim: input dimension, at least 1.
      seed: non-negative seed.

    Returns:
      float64 array of shape ``(dim,)``.
    """
    dim = check_int("dim", dim, 1)
    seed = check_int("seed", seed, 0)
    return np.random.default_rng([seed, _WEIGHTS]).standard_normal(dim)


def _inputs(num_examples: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _INPUTS])
    return rng.standard_normal((num_examples, dim)).astype(np.float32)


def _split_dataset(x, y, w, test_fraction, seed, num_classes, task, name) -> ArrayDataset:
    train, test = shuffled_split(x.shape[0], test_fraction, seed)
    return ArrayDataset(
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        num_classes=num_classes,
        task=task,
        name=name,
        extras={"w_true": w},
    )


def _check_common(num_examples, dim, test_fraction, seed):
    num_test_examples(num_examples, test_fraction)
    dim = check_int("dim", dim, 1)
    seed = check_int("seed", seed, 0)
    return int(num_examples), dim, float(test_fraction), seed


def least_squares(
    num_examples: int = 512,
    dim: int = 16,
    noise: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    path: str | None = None,
) -> ArrayDataset:
    """Linear regression ``y = x @ w_true + noise * eps``.

    Args:
      num_examples: total examples (train + test), at least 2.
      dim: input dimension, at least 1.
      noise: standard deviation of the Gaussian label noise, at least 0.
      test_fraction: fraction of examples held out for test, in (0, 1).
      seed: non-negative seed; ``w_true`` is ``true_weights(dim, seed)``.
      path: optional ``.npz`` file to load instead (see ``load_npz``); the
        other arguments do not apply to it.

    Returns:
      A regression ``ArrayDataset``: x float32 ``(N, dim)`` standard normal,
      y float32 ``(N,)``; ``extras["w_true"]`` holds the float64 true weights.
    """
    if path is not None:
        return load_npz(path, name="least_squares")
    num_examples, dim, test_fraction, seed = _check_common(num_examples, dim, test_fraction, seed)
    noise = check_real("noise", noise)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    w = true_weights(dim, seed)
    x = _inputs(num_examples, dim, seed)
    eps = np.random.default_rng([seed, _NOISE]).standard_normal(num_examples)
    y = (x.astype(np.float64) @ w + noise * eps).astype(np.float32)
    return _split_dataset(x, y, w, test_fraction, seed, None, "regression", "least_squares")


def logistic_regression(
    num_examples: int = 512,
    dim: int = 16,
    test_fraction: float = 0.2,
    seed: int = 0,
    path: str | None = None,
) -> ArrayDataset:
    """Binary classification with labels ``~ Bernoulli(sigmoid(x @ w_true))``.

    Args:
      num_examples: total examples (train + test), at least 2.
      dim: input dimension, at least 1.
      test_fraction: fraction of examples held out for test, in (0, 1).
      seed: non-negative seed; ``w_true`` is ``true_weights(dim, seed)``.
      path: optional ``.npz`` file to load instead (see ``load_npz``); the
        other arguments do not apply to it.

    Returns:
      A 2-class ``ArrayDataset``: x float32 ``(N, dim)`` standard normal,
      y int32 in {0, 1}; ``extras["w_true"]`` holds the float64 true weights.
    """
    if path is not None:
        return load_npz(path, name="logistic")
    num_examples, dim, test_fraction, seed = _check_common(num_examples, dim, test_fraction, seed)
    w = true_weights(dim, seed)
    x = _inputs(num_examples, dim, seed)
    prob = 0.5 * (1.0 + np.tanh(0.5 * (x.astype(np.float64) @ w)))  # sigmoid, overflow-free
    u = np.random.default_rng([seed, _NOISE]).random(num_examples)
    y = (u < prob).astype(np.int32)
    return _split_dataset(x, y, w, test_fraction, seed, 2, "classification", "logistic")
