"""Modular arithmetic tables checked against plain Python integer arithmetic."""

import numpy as np
import pytest

from jaxopt_lab.data import is_prime, modular_arithmetic


def expected(a, b, op, p):
    if op == "+":
        return (a + b) % p
    if op == "-":
        return (a - b) % p
    if op == "*":
        return (a * b) % p
    return (a * pow(b, -1, p)) % p


@pytest.mark.parametrize("op", ["+", "-", "*", "/"])
@pytest.mark.parametrize("p", [2, 7, 31])
def test_labels_match_python_ints_and_pairs_are_complete(op, p):
    ds = modular_arithmetic(p=p, op=op, train_fraction=0.4, seed=1)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert ds.num_classes == p and ds.input_shape == (2,)
    pairs = [tuple(int(v) for v in row) for row in x]
    first_b = 1 if op == "/" else 0
    want_pairs = {(a, b) for a in range(p) for b in range(first_b, p)}
    assert len(pairs) == len(set(pairs)) == len(want_pairs)  # no pair twice
    assert set(pairs) == want_pairs  # train and test together cover all pairs
    for (a, b), c in zip(pairs, y):
        assert int(c) == expected(a, b, op, p), (a, b, op, p)
    assert ds.num_train == round(0.4 * len(want_pairs))


def test_default_size_and_name():
    ds = modular_arithmetic()
    assert ds.num_train == round(0.3 * 97 * 97)
    assert ds.num_train + ds.num_test == 97 * 97
    assert ds.name == "modular_add_97"


def test_deterministic_per_seed():
    a = modular_arithmetic(p=13, op="*", seed=4)
    b = modular_arithmetic(p=13, op="*", seed=4)
    c = modular_arithmetic(p=13, op="*", seed=5)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_is_prime():
    sieve = [n for n in range(200) if n >= 2 and all(n % d for d in range(2, n))]
    assert [n for n in range(200) if is_prime(n)] == sieve


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p=1), "p must be >= 2, got 1"),
        (dict(op="^"), r"op must be one of '\+', '-', '\*', '/', got '\^'"),
        (dict(p=8, op="/"), "needs a prime modulus p, got p=8"),
        (dict(train_fraction=0.0), r"train_fraction must be in the open interval \(0, 1\), got 0.0"),
        (dict(train_fraction=1.0), r"got 1.0"),
        (dict(train_fraction=-0.5), r"got -0.5"),
        (dict(p=2, train_fraction=0.1), "gives 0 train"),
        (dict(seed=-1), "seed must be >= 0, got -1"),
        (dict(p=50000), "p must be <= 46340 .*got 50000"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        modular_arithmetic(**kwargs)
