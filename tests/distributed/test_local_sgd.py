"""Local SGD equals DiLoCo with plain outer SGD at lr 1; QSR's sync schedule."""

import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, diloco, wire_bytes
from jaxopt_lab.distributed.local_sgd import local_sgd, qsr_period
from tests.distributed.problem import run

W = 4
RUNNER = WorkerRunner(W)


def test_local_sgd_is_diloco_with_unit_outer_sgd():
    a, _ = run(RUNNER, local_sgd(optax.sgd(0.05), sync_every=3), 7, W)
    b, _ = run(RUNNER, diloco(optax.sgd(0.05), optax.sgd(1.0), sync_every=3), 7, W)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)


def hand_computed_syncs(schedule, base, beta, steps, warmup=0):
    # a round starting at step t lasts base during the warm-up, else max(base, floor((beta / lr(t))^2))
    syncs, t = [], 0
    while True:
        lr = float(schedule(t))
        h = base if t < warmup else max(base, int(np.floor((beta / lr) ** 2)) if lr > 0 else 2**30)
        if t + h > steps:
            return syncs
        t += h
        syncs.append(t)


def test_qsr_syncs_on_the_hand_computed_schedule():
    base, beta, steps = 2, 0.3, 40
    schedule = optax.linear_schedule(0.2, 0.02, steps)
    _, state = run(RUNNER, local_sgd(optax.sgd(schedule), base, beta, schedule), steps, W)
    syncs = hand_computed_syncs(schedule, base, beta, steps)
    assert len(syncs) >= 4 and np.diff(syncs).max() > base  # the period really grows
    np.testing.assert_array_equal(communicated_bytes(state), [len(syncs) * 4 * 6] * W)
    np.testing.assert_array_equal(wire_bytes(state), [len(syncs) * 2 * 3 * 6] * W)  # ring: 2 (W-1) chunks of 24/W
    assert int(state.period[0]) == max(base, int(np.floor((beta / float(schedule(syncs[-1]))) ** 2)))
    assert int(qsr_period(0.01, 5, 1.0)) == 10000


def test_qsr_warmup_from_zero_learning_rate_syncs_every_base_steps():
    # lr 0 at step 0 would give an endless first round; rounds starting in the warm-up last H_base
    base, beta, steps, warmup = 2, 0.3, 30, 8
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.2, warmup, steps)
    _, state = run(RUNNER, local_sgd(optax.sgd(schedule), base, beta, schedule, warmup_steps=warmup), steps, W)
    syncs = hand_computed_syncs(schedule, base, beta, steps, warmup)
    assert syncs[: warmup // base] == list(range(base, warmup + 1, base)) and len(syncs) > warmup // base
    np.testing.assert_array_equal(communicated_bytes(state), [len(syncs) * 4 * 6] * W)
    _, no_warmup = run(RUNNER, local_sgd(optax.sgd(schedule), base, beta, schedule), steps, W)
    np.testing.assert_array_equal(communicated_bytes(no_warmup), [0] * W)  # what the warm-up is for


def test_bad_arguments():
    with pytest.raises(ValueError, match="qsr_beta needs learning_rate"):
        local_sgd(optax.sgd(0.1), qsr_beta=0.1)
    with pytest.raises(ValueError, match="qsr_beta must be > 0, got -1"):
        local_sgd(optax.sgd(0.1), qsr_beta=-1, learning_rate=0.1)
    with pytest.raises(ValueError, match="sync_every must be an int >= 1, got 0"):
        local_sgd(optax.sgd(0.1), sync_every=0)
    with pytest.raises(ValueError, match="QSR's: set qsr_beta"):
        local_sgd(optax.sgd(0.1), learning_rate=0.1)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got -1"):
        local_sgd(optax.sgd(0.1), qsr_beta=0.1, learning_rate=0.1, warmup_steps=-1)
