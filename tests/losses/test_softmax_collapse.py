"""Softmax Collapse detector on float32 batches that do and do not collapse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.losses import softmax_collapse_fraction

LABELS = np.arange(4) % 5


@jax.jit
def both(logits, labels):
    return softmax_collapse_fraction(logits, labels), softmax_collapse_fraction(logits, labels, correct_class_only=True)


def margin_batch(*margins):
    """4 examples x 5 classes, zeros except the correct logit of example i, set to margins[i]."""
    logits = np.zeros((4, 5), np.float32)
    logits[np.arange(4), LABELS] = np.resize(np.asarray(margins, np.float32), 4)
    return logits


def fractions(logits):
    return tuple(float(f) for f in both(logits, LABELS))


def test_huge_margin_collapses_small_logits_do_not():
    assert fractions(margin_batch(1e4)) == (1.0, 1.0)
    assert fractions(margin_batch(3.0)) == (0.0, 0.0)
    assert fractions(margin_batch(1e4, 1.0, 1.0, 1.0)) == (0.25, 0.25)


def test_zero_loss_precedes_zero_gradient():
    # margin 30 in float32: p_y rounds to 1 (loss exactly 0) but e^-30 of the others is representable
    assert fractions(margin_batch(30.0)) == (0.0, 1.0)
    assert fractions(margin_batch(200.0, 30.0, 3.0, 3.0)) == (0.25, 0.5)


def test_depends_on_dtype():
    # margin 12: 4 e^-12 ~ 2.5e-5 is absorbed by 1 in bfloat16 (eps 2^-8) but not in float32
    logits = margin_batch(12.0)
    assert fractions(logits)[1] == 0.0
    assert fractions(jnp.asarray(logits, jnp.bfloat16))[1] == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        softmax_collapse_fraction(np.zeros((2, 4), np.float32), np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="int32"):
        softmax_collapse_fraction(np.zeros((2, 4), np.int32), np.zeros((2,), np.int32))
