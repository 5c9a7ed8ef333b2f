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


def check_classes(classes) -> tuple[int, ...]:
    """``classes`` as a sorted tuple of distinct digits; ValueError/TypeError naming a bad one."""
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise TypeError(f"classes must be a list of digits 0..9, got {classes!r}")
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"classes must hold ints (digits 0..9), got {c!r} ({type(c).__name__}) in {list(classes)!r}")
        if not 0 <= int(c) <= 9:
            raise ValueError(f"classes: {int(c)} is not a digit (0..9), in {list(classes)!r}")
        if int(c) in out:
            raise ValueError(f"classes: {int(c)} appears twice in {list(classes)!r}")
        out.append(int(c))
    if not out:
        raise ValueError("classes must name at least one digit, got an empty list")
    return tuple(sorted(out))


def load_digits(path: str | None = None, test_fraction: float = 0.2, seed: int = 0,
                classes: list[int] | None = None) -> ArrayDataset:
    """The scikit-learn digits, split into train and test stratified by class.

    ``classes`` keeps only those digits (``[0, 1, 2, 3, 4]``), in both splits: the
    pretrain-on-0-4 / fine-tune-on-5-9 task. The split is drawn on all 1797 images first,
    then filtered, so an image is in the same split whatever ``classes`` is (the 0-4 and
    5-9 test sets are exactly the 10-class test set's images of those digits).

    Labels stay the original digits and ``num_classes`` stays 10 (they are not remapped to
    0..k-1): the pretrained and the fine-tuned model are then the same architecture (10
    logits), so ``model.init_from`` loads the head unchanged; the fine-tuned model's
    predictions and accuracy read as digits, and it can be scored on the other digits
    (forgetting). The head's rows of the new digits start untrained (pretraining only
    pushed them down), so a fine-tuning run must train the head (full fine-tuning, or
    ``model.lora.train_also = "head/.*"``). Remapping 5..9 onto 0..4 would instead reuse
    the logit of an unrelated old digit for each new one.

    Args:
      path: optional ``.npz`` file to load instead (see ``load_npz``); its own
        train/test split is used as stored, so ``test_fraction`` and ``seed``
        do not apply to it.
      test_fraction: fraction of the 1797 images held out for test, in (0, 1).
        The test split gets ``round(test_fraction * 1797)`` images, with each
        class represented in proportion.
      seed: non-negative seed of the split.
      classes: the digits to keep (distinct ints in 0..9, any order); None: all ten.
        A value outside 0..9, a repeat or an empty list is an error naming it.

    Returns:
      A 10-class ``ArrayDataset`` named ``"digits"``: x float32 of shape
      ``(N, 8, 8, 1)`` with pixels in [0, 1], y int32 (the original digits).
    """
    keep = None if classes is None else check_classes(classes)
    if path is not None:
        if keep is not None:
            raise ValueError("classes applies to the embedded digits, not to data.path (filter the .npz file instead)")
        return load_npz(path, name="digits")
    images, labels = _raw_digits()
    train, test = stratified_split(labels, test_fraction, seed)
    if keep is not None:
        train = train[np.isin(labels[train], keep)]
        test = test[np.isin(labels[test], keep)]
    return ArrayDataset(
        x_train=images[train],
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        num_classes=10,
        task="classification",
        name="digits",
    )
