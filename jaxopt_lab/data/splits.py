"""Seeded train/test splits of a data set's example indices."""

import numpy as np

from jaxopt_lab.data._checks import check_fraction, check_int


def num_test_examples(num_examples: int, test_fraction: float) -> int:
    """Size of the test split, ``round(test_fraction * num_examples)``, checked.

    Args:
      num_examples: number of examples to split, at least 2.
      test_fraction: fraction of examples in the test split, in (0, 1).

    Returns:
      The number of test examples; raises ``ValueError`` unless both splits
      get at least one example.
    """
    num_examples = check_int("num_examples", num_examples, 2)
    test_fraction = check_fraction("test_fraction", test_fraction)
    num_test = round(test_fraction * num_examples)
    if num_test < 1 or num_test > num_examples - 1:
        raise ValueError(
            f"test_fraction={test_fraction} of {num_examples} examples gives {num_test} test and "
            f"{num_examples - num_test} train examples; both splits need at least 1"
        )
    return num_test


def shuffled_split(num_examples: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``range(num_examples)`` into train and test after a seeded shuffle.

    The test split gets ``round(test_fraction * num_examples)`` examples.

    Args:
      num_examples: number of examples to split.
      test_fraction: fraction of examples in the test split, in (0, 1).
      seed: non-negative seed of the shuffle.

    Returns:
      ``(train_indices, test_indices)``, each sorted int64, disjoint, together
      covering every index once.
    """
    num_test = num_test_examples(num_examples, test_fraction)
    seed = check_int("seed", seed, 0)
    perm = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into train and test with the class mix preserved.

    The test split gets ``round(test_fraction * N)`` examples in all; they are
    shared out over classes in proportion to class size (largest remainders
    win the rounding), and drawn from each class after a seeded shuffle.

    Args:
      labels: 1-D integer class labels, one per example.
      test_fraction: fraction of examples in the test split, in (0, 1).
      seed: non-negative seed of the shuffle.

    Returns:
      ``(train_indices, test_indices)``, each sorted int64, disjoint, together
      covering every index once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    num_examples = labels.shape[0]
    num_test = num_test_examples(num_examples, test_fraction)
    seed = check_int("seed", seed, 0)

    classes, counts = np.unique(labels, return_counts=True)
    ideal = counts * (num_test / num_examples)
    per_class = np.floor(ideal).astype(np.int64)
    short = num_test - int(per_class.sum())
    # Largest remainders get the leftover test slots; ties go to the lower class.
    order = np.argsort(-(ideal - per_class), kind="stable")
    per_class[order[:short]] += 1

    rng = np.random.default_rng(seed)
    test_parts = []
    for c, k in zip(classes, per_class):
        members = np.flatnonzero(labels == c)
        test_parts.append(rng.permutation(members)[:k])
    test = np.sort(np.concatenate(test_parts)).astype(np.int64)
    mask = np.ones(num_examples, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask).astype(np.int64), test
