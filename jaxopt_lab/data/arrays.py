"""In-memory array data sets: seeded training batches and ordered eval batches."""

import dataclasses
import functools
import os
import zipfile
from collections.abc import Iterator

import numpy as np

from jaxopt_lab.data._checks import check_choice, check_int

TASKS = ("classification", "regression")
SPLITS = ("train", "test")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@functools.lru_cache(maxsize=16)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The (read-only) order in which epoch ``epoch`` visits the examples."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)
    return perm


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A supervised data set held as numpy arrays.

    Attributes:
      x_train: training inputs, first axis indexes examples.
      y_train: training targets (int class ids, or floats for regression).
      x_test: test inputs, same per-example shape as ``x_train``.
      y_test: test targets.
      num_classes: number of classes, or None for regression.
      task: ``"classification"`` or ``"regression"``.
      name: a short name for logs and run directories.
      extras: optional metadata (e.g. the true weights of a synthetic task).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    task: str
    name: str
    extras: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        for field in NPZ_KEYS:
            value = getattr(self, field)
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{field} must be a numpy array, got {type(value).__name__}")
            if value.ndim < 1:
                raise ValueError(f"{field} must have a leading example axis, got shape {value.shape}")
        for split in SPLITS:
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}"
                )
            if x.shape[0] < 1:
                raise ValueError(f"the {split} split must hold at least 1 example, got 0")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_train examples have shape {self.x_train.shape[1:]} but x_test examples "
                f"have shape {self.x_test.shape[1:]}"
            )
        if not isinstance(self.extras, dict):
            raise TypeError(f"extras must be a dict, got {type(self.extras).__name__}")
        if self.task == "classification":
            self._check_labels()
        else:
            if self.num_classes is not None:
                raise ValueError(f"num_classes must be None for regression, got {self.num_classes}")
            for split in SPLITS:
                y = getattr(self, f"y_{split}")
                if not np.issubdtype(y.dtype, np.floating):
                    raise ValueError(f"regression y_{split} must be floating point, got dtype {y.dtype}")

    def _check_labels(self) -> None:
        num_classes = check_int("num_classes", self.num_classes, 1)
        for split in SPLITS:
            y = getattr(self, f"y_{split}")
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"classification y_{split} must be a 1-D integer array, got shape {y.shape} "
                    f"dtype {y.dtype}"
                )
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"y_{split} labels must lie in [0, num_classes={num_classes}), "
                    f"got values from {lo} to {hi}"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    def batch_indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Training-set indices of batch ``step`` of the seeded example stream.

        The stream visits every training example once per epoch, in the order
        ``np.random.default_rng([seed, epoch]).permutation(num_train)``. Entry
        ``j`` of batch ``step`` is stream position ``k = step * batch_size + j``,
        i.e. example ``perm_e[k % num_train]`` with ``e = k // num_train``.
        A batch may straddle two (or more) epochs.

        Args:
          step: non-negative batch number.
          batch_size: examples per batch, at least 1.
          seed: non-negative seed of the stream.

        Returns:
          int64 array of shape ``(batch_size,)``.
        """
        step = check_int("step", step, 0)
        batch_size = check_int("batch_size", batch_size, 1)
        seed = check_int("seed", seed, 0)
        n = self.num_train
        k = step * batch_size + np.arange(batch_size, dtype=np.int64)
        epochs, positions = np.divmod(k, n)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = _epoch_permutation(seed, int(epoch), n)[positions[where]]
        return out

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Training batch ``step`` of the seeded stream: a pure function of its args.

        See ``batch_indices`` for which examples a batch holds.

        Args:
          step: non-negative batch number.
          batch_size: examples per batch, at least 1.
          seed: non-negative seed of the stream.

        Returns:
          ``(x, y)`` with leading axis ``batch_size``.
        """
        idx = self.batch_indices(step, batch_size, seed)
        return self.x_train[idx], self.y_train[idx]

    def eval_batches(
        self, batch_size: int, split: str = "test", max_batches: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive batches over a split, in order; the last one may be smaller.

        Args:
          batch_size: examples per batch, at least 1.
          split: ``"train"`` or ``"test"``.
          max_batches: stop after this many batches (at least 1), or None for
            the whole split.

        Returns:
          An iterator of ``(x, y)`` pairs. Arguments are checked on the call,
          not on the first ``next``.
        """
        batch_size = check_int("batch_size", batch_size, 1)
        check_choice("split", split, SPLITS)
        if max_batches is not None:
            max_batches = check_int("max_batches", max_batches, 1)
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        return _consecutive_batches(x, y, batch_size, max_batches)


def _consecutive_batches(x, y, batch_size, max_batches):
    num_batches = -(-x.shape[0] // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        yield x[sl], y[sl]


def load_npz(path: str, name: str | None = None) -> ArrayDataset:
    """Reads an ``.npz`` file with keys ``x_train, y_train, x_test, y_test``.

    Integer targets make a classification set with ``num_classes`` one more
    than the largest label (stored as int32); floating targets make a
    regression set.

    Args:
      path: the ``.npz`` file.
      name: data set name; defaults to the file name without extension.

    Returns:
      An ``ArrayDataset``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file not found: {path!r}")
    if not zipfile.is_zipfile(path):  # np.load would try it as .npy, then complain about pickles
        with open(path, "rb") as f:
            head = f.read(16)
        raise ValueError(f"{path!r} is not a .npz archive (a zip of .npy arrays, as np.savez writes; "
                         f"the file starts with {head!r})")
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path!r} lacks key(s) {missing}; it has {sorted(archive.files)}, "
                f"needs {list(NPZ_KEYS)}"
            )
        arrays = {k: archive[k] for k in NPZ_KEYS}
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    kinds = {y_train.dtype.kind, y_test.dtype.kind}
    if kinds <= {"i", "u"}:
        for key in ("y_train", "y_test"):
            y = arrays[key]
            if y.size and (int(y.min()) < 0 or int(y.max()) > np.iinfo(np.int32).max):
                raise ValueError(
                    f"{key} in {path!r} must hold class ids in [0, 2**31), "
                    f"got values from {int(y.min())} to {int(y.max())}"
                )
            arrays[key] = y.astype(np.int32)
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        task = "classification"
    elif kinds == {"f"}:
        num_classes, task = None, "regression"
    else:
        raise ValueError(
            f"y_train/y_test in {path!r} must both be integer (classification) or both "
            f"floating (regression), got dtypes {y_train.dtype} and {y_test.dtype}"
        )
    return ArrayDataset(**arrays, num_classes=num_classes, task=task, name=name)


def load_npz_dataset(path: str | None = None) -> ArrayDataset:
    """Loader-registry form of ``load_npz``: a keyword ``path`` and nothing else.

    Args:
      path: the ``.npz`` file (required, despite the None default that lets
        config tools read the signature).

    Returns:
      An ``ArrayDataset`` named after the file.
    """
    if path is None:
        raise ValueError("the 'npz' data set needs path=<file.npz>, got path=None")
    return load_npz(path)
