"""The 8x8 handwritten digits that ship inside scikit-learn (no download)."""

import functools

import numpy as np

from jaxopt_lab.data.arrays import ArrayDataset, load_npz
from jaxopt_lab.data.splits import stratified_split


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (float32 images in [0, 1] of shape (N, 8, 8, 1), int32 labels)."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[..., None]
    labels = np.asarray(bunch.target, dtype=np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits(path: str | None = None, test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """The scikit-learn digits, split into train and test stratified by class.

    Args:
      path: optional ``.npz`` file to load instead (see ``load_npz``); its own
        train/test split is used as stored, so ``test_fraction`` and ``seed``
        do not apply to it.
      test_fraction: fraction of the 1797 images held out for test, in (0, 1).
        The test split gets ``round(test_fraction * 1797)`` images, with each
        class represented in proportion.
      seed: non-negative seed of the split.

    Returns:
      A 10-class ``ArrayDataset`` named ``"digits"``: x float32 of shape
      ``(N, 8, 8, 1)`` with pixels in [0, 1], y int32.
    """
    if path is not None:
        return load_npz(path, name="digits")
    images, labels = _raw_digits()
    train, test = stratified_split(labels, test_fraction, seed)
    return ArrayDataset(
        x_train=images[train],
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        num_classes=10,
        task="classification",
        name="digits",
    )
