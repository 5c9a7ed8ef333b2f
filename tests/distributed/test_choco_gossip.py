"""CHOCO gossip: exact compression = gossip; compressed runs still reach consensus; bytes."""

import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, dgc, gossip, identity, quantize, top_k, wire_bytes
from jaxopt_lab.distributed.choco_gossip import choco_gossip
from tests.distributed.problem import init_params, run, worker_data

W = 4
RUNNER = WorkerRunner(W)


@pytest.mark.parametrize("consensus_first, order", [(True, "cta"), (False, "atc")])
def test_exact_compression_and_unit_consensus_lr_is_gossip(consensus_first, order):
    # the official order (consensus, then compress) is combine-then-adapt; Algorithm 2's order adapt-then-combine
    for compressor in (identity(), top_k(1.0, error_feedback=False)):
        a, _ = run(RUNNER, choco_gossip(optax.sgd(0.05), "ring", compressor, consensus_first=consensus_first), 6, W)
        b, _ = run(RUNNER, gossip(optax.sgd(0.05), "ring", order=order), 6, W)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def choco_replay(steps, lr, gamma, rho, consensus_first):
    """Float64 CHOCO-SGD with top-k, ring(4) weights 1/3, written from epfml/ChocoSGD convex_code/logistic.py
    (``x = x_plus + γ x_hat (W - I)``, then ``x_hat += Q(x - x_hat)``) or, with ``consensus_first=False``,
    from Algorithm 2 of Koloskova et al. 2019."""
    x, y = (a.astype(np.float64) for a in worker_data(W))
    mixing = np.zeros((W, W))
    for i in range(W):
        for j in (i - 1, i, i + 1):
            mixing[i, j % W] = 1 / 3

    def top(v):  # per worker row: keep the ceil(rho n) largest magnitudes
        k = max(1, int(np.ceil(rho * v.shape[1])))
        out = np.zeros_like(v)
        idx = np.argsort(-np.abs(v), axis=1)[:, :k]
        np.put_along_axis(out, idx, np.take_along_axis(v, idx, axis=1), axis=1)
        return out

    p0 = init_params()
    params = {"w": np.tile(p0["w"].astype(np.float64), (W, 1)), "b": np.full((W, 1), float(p0["b"]))}
    hat = {k: np.zeros_like(v) for k, v in params.items()}
    for _ in range(steps):
        r = np.einsum("wnd,wd->wn", x, params["w"]) + params["b"] - y
        g = {"w": np.einsum("wn,wnd->wd", r, x) / x.shape[1], "b": r.mean(axis=1, keepdims=True)}
        for k in params:
            plus = params[k] - lr * g[k]
            if consensus_first:
                params[k] = plus + gamma * (mixing - np.eye(W)) @ hat[k]
                hat[k] = hat[k] + top(params[k] - hat[k])
            else:
                hat[k] = hat[k] + top(plus - hat[k])
                params[k] = plus + gamma * (mixing - np.eye(W)) @ hat[k]
    return {"w": params["w"], "b": params["b"][:, 0]}


@pytest.mark.parametrize("consensus_first", [True, False])
def test_matches_float64_replay_of_the_official_code(consensus_first):
    lr, gamma, rho, steps = 0.05, 0.4, 0.4, 12
    tx = choco_gossip(optax.sgd(lr), "ring", top_k(rho, error_feedback=False), consensus_lr=gamma,
                      consensus_first=consensus_first)
    got, _ = run(RUNNER, tx, steps, W)
    expected = choco_replay(steps, lr, gamma, rho, consensus_first)
    other = choco_replay(steps, lr, gamma, rho, not consensus_first)
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-5)
    assert np.abs(expected["w"] - other["w"]).max() > 1e-3  # the two orders differ: the check has teeth


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
    with pytest.raises(ValueError, match="consensus_first must be a bool, got 1"):
        choco_gossip(optax.sgd(0.1), "ring", identity(), consensus_first=1)
    with pytest.raises(ValueError, match="compressor must be"):
        choco_gossip(optax.sgd(0.1), "ring", None)
    # error feedback on top of CHOCO's public copy feeds the remainder back twice (it diverges)
    for stateful in (top_k(0.1), dgc(momentum=0.9)):
        with pytest.raises(ValueError, match="memoryless compressor"):
            choco_gossip(optax.sgd(0.1), "ring", stateful)
    choco_gossip(optax.sgd(0.1), "ring", top_k(0.1, error_feedback=False))
