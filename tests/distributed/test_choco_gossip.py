"""CHOCO gossip: exact compression = gossip; compressed runs still reach consensus; bytes."""

import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, dgc, gossip, identity, quantize, top_k, wire_bytes
from jaxopt_lab.distributed.choco_gossip import choco_gossip
from tests.distributed.problem import run

W = 4
RUNNER = WorkerRunner(W)


def test_exact_compression_and_unit_consensus_lr_is_gossip():
    for compressor in (identity(), top_k(1.0, error_feedback=False)):
        a, _ = run(RUNNER, choco_gossip(optax.sgd(0.05), "ring", compressor), 6, W)
        b, _ = run(RUNNER, gossip(optax.sgd(0.05), "ring"), 6, W)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_compressed_gossip_pulls_workers_together_and_counts_payload_bytes():
    steps = 30
    mixed, state = run(RUNNER, choco_gossip(optax.sgd(0.05), "ring", quantize("int8"), consensus_lr=0.5), steps, W)
    barely, _ = run(RUNNER, choco_gossip(optax.sgd(0.05), "ring", quantize("int8"), consensus_lr=1e-4), steps, W)
    exact, _ = run(RUNNER, gossip(optax.sgd(0.05), "ring"), steps, W)
    spread = lambda p: float(np.ptp(p["w"], axis=0).max())  # noqa: E731
    assert spread(mixed) < 0.3 * spread(barely)  # the int8 messages do pull the workers together
    np.testing.assert_allclose(mixed["w"].mean(axis=0), exact["w"].mean(axis=0), atol=0.05)
    # ring(4): 2 messages per step, each an int8 payload: (5 + 4) + (1 + 4) bytes
    np.testing.assert_array_equal(communicated_bytes(state), [steps * 2 * ((5 + 4) + (1 + 4))] * W)
    np.testing.assert_array_equal(wire_bytes(state), [steps * 2 * ((5 + 4) + (1 + 4))] * W)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"consensus_lr must be in \(0, 1\], got 0"):
        choco_gossip(optax.sgd(0.1), "ring", identity(), consensus_lr=0)
    with pytest.raises(ValueError, match="compressor must be"):
        choco_gossip(optax.sgd(0.1), "ring", None)
    # error feedback on top of CHOCO's public copy feeds the remainder back twice (it diverges)
    for stateful in (top_k(0.1), dgc(momentum=0.9)):
        with pytest.raises(ValueError, match="memoryless compressor"):
            choco_gossip(optax.sgd(0.1), "ring", stateful)
    choco_gossip(optax.sgd(0.1), "ring", top_k(0.1, error_feedback=False))
