"""Data parallel and DiLoCo: identities, a float64 reference, bytes, absent workers, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, data_parallel, diloco, wire_bytes
from tests.distributed.problem import DIM, init_params, make_step, run, worker_data

W = 4
RUNNER = WorkerRunner(W)
N_PARAMS = DIM + 1


def numpy_grads(p, x, y):
    """Per-worker gradients of the least-squares loss, float64."""
    r = np.einsum("wnd,d->wn", x, p["w"]) + p["b"] - y
    n = x.shape[1]
    return {"w": np.einsum("wn,wnd->wd", r, x) / n, "b": r.sum(axis=1) / n}


def test_data_parallel_sgd_matches_numpy_and_keeps_workers_equal():
    params, state = run(RUNNER, data_parallel(optax.sgd(0.1)), 5, W)
    x, y = (a.astype(np.float64) for a in worker_data(W))
    p = {k: v.astype(np.float64) for k, v in init_params().items()}
    for _ in range(5):
        g = numpy_grads(p, x, y)
        p = {k: p[k] - 0.1 * g[k].mean(axis=0) for k in p}
    for k in p:
        np.testing.assert_array_equal(params[k], params[k][:1].repeat(W, axis=0))  # identical workers
        np.testing.assert_allclose(params[k][0], p[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(communicated_bytes(state), [5 * 4 * N_PARAMS] * W)  # 4·n_params per step
    # ring all-reduce of 24 bytes over W = 4: reduce-scatter + all-gather, 2 x 3 chunks of 6 bytes sent
    np.testing.assert_array_equal(wire_bytes(state), [5 * 2 * 3 * 6] * W)


def test_diloco_h1_sgd_outer_lr1_is_data_parallel_sgd():
    steps = 6
    ddp, _ = run(RUNNER, data_parallel(optax.sgd(0.1)), steps, W)
    dil, _ = run(RUNNER, diloco(optax.sgd(0.1), optax.sgd(1.0), sync_every=1), steps, W)
    for k in ddp:
        np.testing.assert_allclose(dil[k], ddp[k], rtol=1e-6, atol=1e-7)


def test_diloco_matches_float64_reference_and_sends_one_hth_of_ddp():
    H, rounds, lr, outer_lr, mu = 3, 3, 0.05, 0.7, 0.9
    params, state = run(RUNNER, diloco(optax.sgd(lr), optax.sgd(outer_lr, momentum=mu, nesterov=True), sync_every=H), H * rounds, W)
    x, y = (a.astype(np.float64) for a in worker_data(W))
    anchor = {k: v.astype(np.float64) for k, v in init_params().items()}
    momentum = {k: np.zeros_like(v) for k, v in anchor.items()}
    for _ in range(rounds):
        local = {k: np.broadcast_to(v, (W,) + v.shape).copy() for k, v in anchor.items()}
        for _ in range(H):
            r = np.einsum("wnd,wd->wn", x, local["w"]) + local["b"][:, None] - y
            g = {"w": np.einsum("wn,wnd->wd", r, x) / x.shape[1], "b": r.mean(axis=1)}
            local = {k: local[k] - lr * g[k] for k in local}
        delta = {k: (anchor[k] - local[k]).mean(axis=0) for k in anchor}  # outer gradient
        momentum = {k: mu * momentum[k] + delta[k] for k in anchor}
        anchor = {k: anchor[k] - outer_lr * (mu * momentum[k] + delta[k]) for k in anchor}  # Nesterov
    for k in anchor:
        np.testing.assert_allclose(params[k], np.broadcast_to(anchor[k], params[k].shape), rtol=2e-5, atol=2e-6)
    ddp_bytes = H * rounds * 4 * N_PARAMS
    np.testing.assert_array_equal(communicated_bytes(state), [ddp_bytes / H] * W)
    np.testing.assert_array_equal(wire_bytes(state), [rounds * 2 * 3 * 6] * W)  # one ring all-reduce per round


def test_inner_optimizer_state_is_kept_across_synchronizations():
    # torchft (local_sgd.py DiLoCo: the inner optimizer is never touched at a sync) and MaxText
    # (diloco.py: "inner optimizer state is retained") keep the inner momentum; a reset would differ
    H, rounds, lr, beta, outer_lr, mu = 3, 3, 0.05, 0.9, 0.7, 0.9
    tx = diloco(optax.sgd(lr, momentum=beta), optax.sgd(outer_lr, momentum=mu, nesterov=True), sync_every=H)
    params, _ = run(RUNNER, tx, H * rounds, W)

    def replay(reset):
        x, y = (a.astype(np.float64) for a in worker_data(W))
        anchor = {k: v.astype(np.float64) for k, v in init_params().items()}
        momentum = {k: np.zeros_like(v) for k, v in anchor.items()}
        buf = {k: np.zeros((W,) + v.shape) for k, v in anchor.items()}
        for _ in range(rounds):
            local = {k: np.broadcast_to(v, (W,) + v.shape).copy() for k, v in anchor.items()}
            if reset:
                buf = {k: np.zeros_like(v) for k, v in buf.items()}
            for _ in range(H):
                r = np.einsum("wnd,wd->wn", x, local["w"]) + local["b"][:, None] - y
                g = {"w": np.einsum("wn,wnd->wd", r, x) / x.shape[1], "b": r.mean(axis=1)}
                buf = {k: beta * buf[k] + g[k] for k in local}  # torch SGD momentum buffer
                local = {k: local[k] - lr * buf[k] for k in local}
            delta = {k: (anchor[k] - local[k]).mean(axis=0) for k in anchor}
            momentum = {k: mu * momentum[k] + delta[k] for k in anchor}
            anchor = {k: anchor[k] - outer_lr * (mu * momentum[k] + delta[k]) for k in anchor}
        return anchor

    kept, reset = replay(False), replay(True)
    for k in kept:
        np.testing.assert_allclose(params[k], np.broadcast_to(kept[k], params[k].shape), rtol=2e-5, atol=2e-6)
    assert np.abs(kept["w"] - reset["w"]).max() > 1e-3  # a reset would be caught


def step_with_presence(tx):
    """One worker step of ``tx`` on the least-squares loss, with ``present`` passed through."""

    def step(params, state, x, y, present):
        grads = jax.grad(lambda p: 0.5 * jnp.mean(jnp.square(x @ p["w"] + p["b"] - y)))(params)
        updates, state = tx.update(grads, state, params, present=present)
        return optax.apply_updates(params, updates), state

    return RUNNER.map(step)


def test_absent_workers_are_left_out_of_the_average():
    tx = diloco(optax.sgd(0.1), optax.sgd(1.0), sync_every=1)
    x, y = worker_data(W)
    p0 = init_params()
    mapped = step_with_presence(tx)
    params, state = RUNNER.replicate(p0), RUNNER.replicate(tx.init(p0))
    present = np.array([True, False, True, False])
    new, _ = mapped(params, state, x, y, present)
    # expected: anchor minus the mean of the present workers' SGD steps only
    g = jax.vmap(jax.grad(lambda p, x, y: 0.5 * jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))), (None, 0, 0))(p0, x, y)
    for k in p0:
        expected = p0[k] - 0.1 * np.asarray(g[k])[present].mean(axis=0)
        np.testing.assert_allclose(np.asarray(new[k]), np.broadcast_to(expected, new[k].shape), rtol=1e-5, atol=1e-6)
    nobody, _ = mapped(params, state, x, y, np.zeros(W, bool))
    for k in p0:
        assert np.isfinite(np.asarray(nobody[k])).all()
        np.testing.assert_array_equal(np.asarray(nobody[k]), np.broadcast_to(p0[k], nobody[k].shape))


def test_a_round_without_workers_takes_no_outer_step():
    # with outer momentum, a zero outer gradient would still move the anchor: the round must be skipped
    tx = diloco(optax.sgd(0.1), optax.sgd(0.7, momentum=0.9, nesterov=True), sync_every=1)
    x, y = worker_data(W)
    p0 = init_params()
    mapped = step_with_presence(tx)
    params, state = mapped(RUNNER.replicate(p0), RUNNER.replicate(tx.init(p0)), x, y, np.ones(W, bool))
    after, after_state = mapped(params, state, x, y, np.zeros(W, bool))
    for u, v in zip(jax.tree.leaves((params, state.anchor, state.outer_state)),
                    jax.tree.leaves((after, after_state.anchor, after_state.outer_state))):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert np.abs(np.asarray(state.outer_state[0].trace["w"])).max() > 0  # the momentum that would have moved it


def test_multi_worker_state_checkpoints_and_resumes_bit_identically(tmp_path):
    tx = diloco(optax.adam(0.05), sync_every=2)
    x, y = RUNNER.put(worker_data(W))
    step = RUNNER.map(make_step(tx))
    params, state = RUNNER.put((RUNNER.replicate(init_params()), RUNNER.replicate(tx.init(init_params()))))
    for _ in range(3):
        params, state = step(params, state, x, y)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", (params, state))
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, state)))
    a, b = (params, state), restored
    for _ in range(4):
        a = step(*a, x, y)
        b = step(*b, x, y)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_bad_sync_every():
    with pytest.raises(ValueError, match="sync_every must be an int >= 1, got 0"):
        diloco(sync_every=0)


def test_uncompressing_compressors_change_nothing():
    """top-k with k = all and no error feedback (and bf16-free identity) = the uncompressed method."""
    from jaxopt_lab.distributed import identity, top_k

    for compressor in (identity(), top_k(1.0, error_feedback=False)):
        a, sa = run(RUNNER, data_parallel(optax.sgd(0.1), compressor=compressor), 4, W)
        b, _ = run(RUNNER, data_parallel(optax.sgd(0.1)), 4, W)
        c, _ = run(RUNNER, diloco(optax.adam(0.05), sync_every=2, compressor=compressor), 4, W)
        d, _ = run(RUNNER, diloco(optax.adam(0.05), sync_every=2), 4, W)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(c[k], d[k])


def test_compressed_ddp_counts_payload_bytes():
    from jaxopt_lab.distributed import quantize, top_k

    _, state = run(RUNNER, data_parallel(optax.sgd(0.1), compressor=top_k(0.5)), 3, W)
    # per step: w keeps 3 of 5 values (3 x (4 + 4-byte index) = 24 > 20 dense: sent dense), b all of 1 (dense)
    np.testing.assert_array_equal(communicated_bytes(state), [3 * (5 + 1) * 4] * W)
    # compressed payloads are all-gathered: each worker receives the W - 1 = 3 others' payloads
    np.testing.assert_array_equal(wire_bytes(state), [3 * 3 * (5 + 1) * 4] * W)
    _, state = run(RUNNER, data_parallel(optax.sgd(0.1), compressor=top_k(0.2)), 3, W)
    # w keeps 1 of 5: 8 bytes sparse < 20 dense
    np.testing.assert_array_equal(communicated_bytes(state), [3 * (8 + 4)] * W)
    np.testing.assert_array_equal(wire_bytes(state), [3 * 3 * (8 + 4)] * W)
    _, state = run(RUNNER, diloco(optax.sgd(0.1), sync_every=2, compressor=quantize("int8")), 4, W)
    # two syncs; int8 payload per tensor: n bytes + a 4-byte fp32 scale
    np.testing.assert_array_equal(communicated_bytes(state), [2 * ((5 + 4) + (1 + 4))] * W)
    np.testing.assert_array_equal(wire_bytes(state), [2 * 3 * ((5 + 4) + (1 + 4))] * W)
