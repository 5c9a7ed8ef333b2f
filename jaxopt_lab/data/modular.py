"""Modular arithmetic tables ``a op b mod p`` (the grokking task)."""

import numpy as np

from jaxopt_lab.data._checks import check_choice, check_fraction, check_int
from jaxopt_lab.data.arrays import ArrayDataset, load_npz

OPS = ("+", "-", "*", "/")
_OP_NAMES = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (trial division; meant for small moduli).

    Args:
      n: the integer to test.

    Returns:
      True if ``n`` is a prime number.
    """
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def modular_table(p: int, op: str) -> tuple[np.ndarray, np.ndarray]:
    """Every equation ``a op b = c (mod p)``, in row-major order of ``(a, b)``.

    ``a`` and ``b`` range over ``[0, p)``, except for ``"/"`` where ``b``
    ranges over ``[1, p)`` and ``c = a * b^{-1} mod p`` (``p`` must be prime).

    Args:
      p: the modulus, at least 2.
      op: one of ``"+", "-", "*", "/"``.

    Returns:
      ``(x, y)``: int32 pairs ``(a, b)`` of shape ``(N, 2)`` and int32 ``c``
      of shape ``(N,)``.
    """
    p = check_int("p", p, 2)
    check_choice("op", op, OPS)
    if p > 46340:  # p * p must fit in int32 indices and in memory
        raise ValueError(f"p must be <= 46340 (p*p pairs are materialised), got {p}")
    if op == "/" and not is_prime(p):
        raise ValueError(f"op '/' needs a prime modulus p, got p={p}")
    first_b = 1 if op == "/" else 0
    a, b = np.meshgrid(np.arange(p, dtype=np.int64), np.arange(first_b, p, dtype=np.int64), indexing="ij")
    a, b = a.ravel(), b.ravel()
    if op == "+":
        c = (a + b) % p
    elif op == "-":
        c = (a - b) % p
    elif op == "*":
        c = (a * b) % p
    else:
        # Fermat: b^(p-2) is b's inverse mod prime p; tabulated once per b.
        inverse = np.array([0] + [pow(v, p - 2, p) for v in range(1, p)], dtype=np.int64)
        c = (a * inverse[b]) % p
    x = np.stack([a, b], axis=1).astype(np.int32)
    return x, c.astype(np.int32)


def modular_arithmetic(
    p: int = 97,
    op: str = "+",
    train_fraction: float = 0.3,
    seed: int = 0,
    path: str | None = None,
) -> ArrayDataset:
    """All equations ``a op b mod p``, shuffled and split into train and test.

    Args:
      p: the modulus, at least 2 (prime for ``"/"``).
      op: one of ``"+", "-", "*", "/"``.
      train_fraction: fraction of equations used for training, in (0, 1);
        after a seeded shuffle, the first ``round(train_fraction * N)`` go to
        train and the rest to test.
      seed: non-negative seed of the shuffle.
      path: optional ``.npz`` file to load instead (see ``load_npz``); its own
        split is used as stored, and the other arguments do not apply.

    Returns:
      A ``p``-class ``ArrayDataset``: x int32 ``(N, 2)`` holding ``(a, b)``,
      y int32 holding ``c``.
    """
    if path is not None:
        return load_npz(path, name="modular")
    p = check_int("p", p, 2)
    check_choice("op", op, OPS)
    train_fraction = check_fraction("train_fraction", train_fraction)
    seed = check_int("seed", seed, 0)
    if op == "/" and not is_prime(p):
        raise ValueError(f"op '/' needs a prime modulus p, got p={p}")
    num_pairs = p * (p - 1) if op == "/" else p * p
    num_train = round(train_fraction * num_pairs)
    if not 1 <= num_train <= num_pairs - 1:
        raise ValueError(
            f"train_fraction={train_fraction} of {num_pairs} equations gives {num_train} train and "
            f"{num_pairs - num_train} test equations; both splits need at least 1"
        )
    x, y = modular_table(p, op)
    perm = np.random.default_rng(seed).permutation(num_pairs)
    train, test = perm[:num_train], perm[num_train:]
    return ArrayDataset(
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        num_classes=p,
        task="classification",
        name=f"modular_{_OP_NAMES[op]}_{p}",
    )
