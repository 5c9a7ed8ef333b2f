"""Splitting a data set's examples among federated-learning clients."""

import dataclasses

import numpy as np

from jaxopt_lab.data._checks import check_int, check_real

_MAX_LISTED = 20  # clients named in an error message before "... and N more"


def check_labels(labels) -> np.ndarray:
    """Checks class labels: a non-empty 1-D array of non-negative integers.

    Args:
      labels: per-example class ids.

    Returns:
      ``labels`` as an int64 numpy array.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.shape[0] == 0:
        raise ValueError("labels must hold at least one example, got 0")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    return labels.astype(np.int64)


def infer_num_classes(labels) -> int:
    """Number of classes implied by labels: ``labels.max() + 1``.

    Args:
      labels: per-example class ids (non-negative ints).

    Returns:
      The class count.
    """
    return int(check_labels(labels).max()) + 1


@dataclasses.dataclass(frozen=True, eq=False)
class ClientPartition:
    """An assignment of every example to exactly one client.

    Attributes:
      indices: per client, the sorted int64 indices of its examples.
      label_counts: int array ``(num_clients, num_classes)``; entry ``[k, c]``
        counts the examples of class ``c`` held by client ``k``.
    """

    indices: tuple[np.ndarray, ...]
    label_counts: np.ndarray

    def __post_init__(self):
        if self.label_counts.ndim != 2 or self.label_counts.shape[0] != len(self.indices):
            raise ValueError(
                f"label_counts must have shape (num_clients={len(self.indices)}, num_classes), "
                f"got {self.label_counts.shape}"
            )

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        """Number of classes counted in ``label_counts``."""
        return int(self.label_counts.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """Per-client example counts, int64 of shape ``(num_clients,)``."""
        return np.array([idx.shape[0] for idx in self.indices], dtype=np.int64)

    def summary(self) -> str:
        """One line describing client sizes and label skew.

        Returns:
          e.g. ``"20 clients, 1797 examples; size min/median/max 3/80.5/301;
          classes per client mean 2.4 of 10"``.
        """
        sizes = self.sizes
        present = (self.label_counts > 0).sum(axis=1)
        return (
            f"{self.num_clients} clients, {int(sizes.sum())} examples; size min/median/max "
            f"{int(sizes.min())}/{float(np.median(sizes)):g}/{int(sizes.max())}; classes per client "
            f"mean {float(present.mean()):.1f} of {self.num_classes}"
        )


def _build(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> ClientPartition:
    indices = tuple(np.sort(part).astype(np.int64) for part in parts)
    counts = np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in indices])
    return ClientPartition(indices=indices, label_counts=counts.astype(np.int64))


def _check_num_clients(num_clients, num_examples) -> int:
    num_clients = check_int("num_clients", num_clients, 1)
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} exceeds the number of examples ({num_examples})")
    return num_clients


def iid_partition(labels: np.ndarray, num_clients: int, seed: int = 0) -> ClientPartition:
    """Shuffles the examples and deals them out evenly (sizes differ by <= 1).

    Args:
      labels: 1-D non-negative integer class ids, one per example.
      num_clients: number of clients, between 1 and the number of examples.
      seed: non-negative seed of the shuffle.

    Returns:
      A ``ClientPartition``; the first ``N % num_clients`` clients get one
      extra example.
    """
    labels = check_labels(labels)
    num_clients = _check_num_clients(num_clients, labels.shape[0])
    seed = check_int("seed", seed, 0)
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    return _build(labels, np.array_split(perm, num_clients), int(labels.max()) + 1)


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1
) -> ClientPartition:
    """Label-skewed split: each class is shared out by Dirichlet(alpha) proportions.

    For each class ``c`` in order, the class's indices are shuffled, client
    proportions ``p_c ~ Dirichlet(alpha * ones(num_clients))`` are drawn, and
    the shuffled indices are cut at ``floor(cumsum(p_c) * n_c)``. Small
    ``alpha`` gives each client few classes; large ``alpha`` approaches IID.

    Args:
      labels: 1-D non-negative integer class ids, one per example.
      num_clients: number of clients, between 1 and the number of examples.
      alpha: Dirichlet concentration, > 0.
      seed: non-negative seed of all draws.
      min_size: every client must end up with at least this many examples
        (>= 0); otherwise a ``ValueError`` names the short clients. Nothing
        is redrawn or moved silently.

    Returns:
      A ``ClientPartition`` assigning every example exactly once.
    """
    labels = check_labels(labels)
    num_examples = labels.shape[0]
    num_clients = _check_num_clients(num_clients, num_examples)
    alpha = check_real("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    seed = check_int("seed", seed, 0)
    min_size = check_int("min_size", min_size, 0)
    if min_size * num_clients > num_examples:
        raise ValueError(
            f"min_size={min_size} for each of num_clients={num_clients} needs "
            f"{min_size * num_clients} examples, but there are only {num_examples}"
        )

    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(proportions)):
            raise ValueError(
                f"Dirichlet draw with alpha={alpha} for class {c} was not finite; use a larger alpha"
            )
        cuts = np.floor(np.cumsum(proportions)[:-1] * members.shape[0]).astype(np.int64)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].append(chunk)
    partition = _build(labels, [np.concatenate(p) for p in parts], num_classes)

    short = np.flatnonzero(partition.sizes < min_size)
    if short.size:
        listed = ", ".join(str(k) for k in short[:_MAX_LISTED])
        if short.size > _MAX_LISTED:
            listed += f", ... and {short.size - _MAX_LISTED} more"
        raise ValueError(
            f"{short.size} of {num_clients} clients got fewer than min_size={min_size} examples "
            f"with alpha={alpha}, seed={seed} (clients {listed}; smallest size "
            f"{int(partition.sizes.min())}); use a larger alpha or another seed"
        )
    return partition
