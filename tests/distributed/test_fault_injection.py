"""Fault injection: workers that disappear mid-round and come back.

DiLoCo and Streaming DiLoCo take a per-worker ``present`` flag (a worker absent
at a synchronization is out of that average, and continues from the new global
parameters); the federated simulator drops dispatches (``dropout``). Over many
seeds at once (vmapped, so one compile), the runs are checked against float64
numpy replays: no update of a worker that stayed is lost, and a worker that comes
back starts from the current global parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, diloco, streaming_diloco

SEEDS, W, ROWS, DIM = 16, 4, 6, 3
H, ROUNDS = 3, 4
STEPS = H * ROUNDS + 1  # one step past the last synchronization: every worker's start is checked
LR, OUTER_LR, MU = 0.05, 0.7, 0.9


def seeded_problems():
    """Per seed: each worker's least-squares data, initial parameters, and who is present at each step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SEEDS, W, ROWS, DIM))
    y = rng.normal(size=(SEEDS, W, ROWS)) + np.arange(W)[:, None]  # workers disagree: absence matters
    p0 = {"w": rng.normal(size=(SEEDS, DIM)), "b": rng.normal(size=(SEEDS,))}
    present = rng.random((SEEDS, STEPS, W)) < 0.5
    present[0] = True  # one seed where nobody ever leaves ...
    present[1, H - 1] = False  # ... and one with a synchronization that nobody attends
    return x, y, p0, present


def numpy_grads(w, b, x, y):
    r = np.einsum("...nd,...d->...n", x, w) + b[..., None] - y
    return np.einsum("...n,...nd->...d", r, x) / x.shape[-2], r.mean(axis=-1)


def run_seeds(runner, tx, x, y, p0, present):
    """All seeds in one compiled program: vmap over seeds of a scan over steps of the runner's mapped step."""

    def step(params, state, x, y, present):
        grads = jax.grad(lambda p: 0.5 * jnp.mean(jnp.square(x @ p["w"] + p["b"] - y)))(params)
        updates, state = tx.update(grads, state, params, present=present)
        return optax.apply_updates(params, updates), state

    mapped = runner.map(step)
    stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (W,) + jnp.shape(a)), t)  # noqa: E731

    def one_seed(p0, x, y, present):
        carry = (stack(p0), stack(tx.init(p0)))
        carry, _ = jax.lax.scan(lambda c, pr: (mapped(*c, x, y, pr), None), carry, present)
        return carry

    f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    return jax.jit(jax.vmap(one_seed))(f32(p0), f32(x), f32(y), jnp.asarray(present))


def diloco_replay(x, y, p0, present):
    """DiLoCo (inner SGD, outer Nesterov) in float64 for all seeds; presence counts at synchronizations only."""
    anchor = {k: v.copy() for k, v in p0.items()}
    momentum = {k: np.zeros_like(v) for k, v in p0.items()}
    local = {k: np.repeat(v[:, None], W, axis=1) for k, v in p0.items()}
    for t in range(1, STEPS + 1):
        gw, gb = numpy_grads(local["w"], local["b"], x, y)
        local = {"w": local["w"] - LR * gw, "b": local["b"] - LR * gb}
        if t % H:
            continue
        here = present[:, t - 1].astype(np.float64)  # (SEEDS, W)
        count = here.sum(axis=1)
        for k in anchor:
            per_seed = lambda v: v.reshape((-1,) + (1,) * (anchor[k].ndim - 1))  # noqa: E731
            wt = here.reshape(here.shape + (1,) * (local[k].ndim - 2))
            delta = (wt * (anchor[k][:, None] - local[k])).sum(axis=1) / per_seed(np.maximum(count, 1))
            new_m = MU * momentum[k] + delta
            new_a = anchor[k] - OUTER_LR * (MU * new_m + delta)
            momentum[k] = np.where(per_seed(count > 0), new_m, momentum[k])  # nobody there: no outer step
            anchor[k] = np.where(per_seed(count > 0), new_a, anchor[k])
            local[k] = np.repeat(anchor[k][:, None], W, axis=1)  # everyone, present or not, restarts here
    return local, anchor


RUNNERS = {
    "vmap": lambda: WorkerRunner(W),
    "shard_map": lambda: WorkerRunner(W, mode="shard_map", devices=jax.devices()[:W]),
}


@pytest.mark.parametrize("mode", list(RUNNERS))
def test_diloco_absent_workers_lose_no_update_and_rejoin_from_the_global_parameters(mode):
    x, y, p0, present = seeded_problems()
    runner = RUNNERS[mode]()
    tx = diloco(optax.sgd(LR), optax.sgd(OUTER_LR, momentum=MU, nesterov=True), sync_every=H,
                axis_name=runner.axis_name)
    params, state = run_seeds(runner, tx, x, y, p0, present)

    local, anchor = diloco_replay(x, y, p0, present)
    for k in p0:
        np.testing.assert_allclose(np.asarray(params[k]), local[k], rtol=1e-4, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(np.asarray(state.anchor[k]), np.repeat(anchor[k][:, None], W, axis=1),
                                   rtol=1e-4, atol=1e-5, err_msg=k)
    # the check has teeth: attendance varied (0 to W workers), and absences changed the result
    attendance = present[:, H - 1 :: H].sum(axis=-1)
    assert {0, 1, 2, 3, 4} <= set(attendance.ravel().tolist())
    everyone, _ = diloco_replay(x, y, p0, np.ones_like(present))
    assert (np.abs(everyone["w"] - local["w"]).max(axis=(1, 2))[1:] > 1e-3).all()


# Streaming DiLoCo: fragments [b] (merged at H_S/P + kH_S) and [w] (merged at H_S + kH_S), torchft's
# schedule; overlap 1 (each sent one step before its merge), merge weight ALPHA
H_S, P, TAU, ALPHA = 4, 2, 1, 0.5
STEPS_S = 3 * H_S + TAU + 1  # past the last merge


def streaming_replay(x, y, p0, present):
    """Streaming DiLoCo in float64 for all seeds (cf. test_streaming_diloco's reference), with absences."""
    arrivals = {"b": H_S // P, "w": H_S}
    anchor = {k: v.copy() for k, v in p0.items()}
    momentum = {k: np.zeros_like(v) for k, v in p0.items()}
    local = {k: np.repeat(v[:, None], W, axis=1) for k, v in p0.items()}
    missed = {k: np.zeros((SEEDS, W), bool) for k in p0}
    for t in range(1, present.shape[1] + 1):
        gw, gb = numpy_grads(local["w"], local["b"], x, y)
        local = {"w": local["w"] - LR * gw, "b": local["b"] - LR * gb}
        for k, arrival in arrivals.items():
            per_seed = lambda v: v.reshape((-1,) + (1,) * (anchor[k].ndim - 1))  # noqa: E731
            per_worker = lambda v: v.reshape(v.shape + (1,) * (local[k].ndim - 2))  # noqa: E731
            if (t + TAU) % H_S == arrival % H_S:  # fragment k is sent by those present
                here = present[:, t - 1].astype(np.float64)
                count = here.sum(axis=1)
                delta = (per_worker(here) * (anchor[k][:, None] - local[k])).sum(axis=1) / per_seed(np.maximum(count, 1))
                new_m = MU * momentum[k] + delta
                new_a = anchor[k] - OUTER_LR * (MU * new_m + delta)
                momentum[k] = np.where(per_seed(count > 0), new_m, momentum[k])
                anchor[k] = np.where(per_seed(count > 0), new_a, anchor[k])
                missed[k] = ~present[:, t - 1]
            if t % H_S == arrival % H_S:  # its result arrives
                merged = ALPHA * local[k] + (1 - ALPHA) * anchor[k][:, None]
                local[k] = np.where(per_worker(missed[k]), anchor[k][:, None], merged)  # missed it: the global one
    return local, anchor


@pytest.mark.parametrize("mode", list(RUNNERS))
def test_streaming_diloco_absent_workers_lose_no_update_and_rejoin_from_the_global_fragment(mode):
    x, y, p0, _ = seeded_problems()
    present = np.random.default_rng(1).random((SEEDS, STEPS_S, W)) < 0.5
    present[0] = True
    present[1, H_S - TAU - 1] = False  # nobody at fragment w's first synchronization (sent at t = H_S - TAU)
    runner = RUNNERS[mode]()
    tx = streaming_diloco(optax.sgd(LR), optax.sgd(OUTER_LR, momentum=MU, nesterov=True), sync_every=H_S,
                          num_fragments=P, overlap=TAU, merge_alpha=ALPHA, axis_name=runner.axis_name)
    params, state = run_seeds(runner, tx, x, y, p0, present)
    local, anchor = streaming_replay(x, y, p0, present)
    for k in p0:
        np.testing.assert_allclose(np.asarray(params[k]), local[k], rtol=1e-4, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(np.asarray(state.anchor[k]), np.repeat(anchor[k][:, None], W, axis=1),
                                   rtol=1e-4, atol=1e-5, err_msg=k)
    everyone, _ = streaming_replay(x, y, p0, np.ones_like(present))
    assert (np.abs(everyone["w"] - local["w"]).max(axis=(1, 2))[1:] > 1e-3).all()


def test_streaming_diloco_present_with_a_compressor_is_a_clear_error():
    from jaxopt_lab.distributed import quantize

    tx = streaming_diloco(optax.sgd(LR), sync_every=H_S, num_fragments=P, compressor=quantize("int8"))
    p = {"w": jnp.zeros(DIM), "b": jnp.zeros(())}
    with pytest.raises(ValueError, match="present .* not supported together with a compressor"):
        jax.vmap(lambda s: tx.update(p, s, p, present=True), axis_name="workers")(
            jax.tree.map(lambda a: jnp.broadcast_to(a, (W,) + jnp.shape(a)), tx.init(p)))


# FedBuff: dispatches that never return (the simulator's dropout), 16 seeds in one vmapped run
FB_SIZES = [2, 3, 4, 5, 3, 2]
FB_DROPOUT, FB_STEPS, FB_K, FB_LR, FB_MU = 0.3, 15, 2, 0.8, 0.5


def test_fedbuff_dropped_clients_lose_no_arrival_and_rejoin_from_the_current_model():
    from jaxopt_lab.distributed import federated as fl
    from jaxopt_lab.distributed.federated import _rng
    from jaxopt_lab.distributed.federated.simulator import _TAG_DISPATCH
    from tests.distributed.federated import problem as pb

    clients, data, _, _ = pb.make_clients(FB_SIZES, seed=9)
    steps = fl.epoch_steps(FB_SIZES, 2)
    sim = fl.FederatedSimulator(
        pb.local_update(data, batch_size=2), fl.fedbuff(FB_LR, momentum=FB_MU), fl.Buffer(FB_K),
        num_clients=len(FB_SIZES), concurrency=3, local_steps=steps, speeds="lognormal", time_jitter=0.2,
        dropout=FB_DROPOUT, **pb.FAST)
    params0 = pb.init_params()
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in range(SEEDS)])
    states = jax.vmap(lambda k: sim.init(params0, k))(keys)  # vmapped jits (top-level: compiler_options)
    final, rec = jax.vmap(lambda st: sim.run(st, FB_STEPS))(states)
    final, rec = jax.tree.map(np.asarray, (final, rec))

    for s in range(SEEDS):
        mask = rec.mask[s]
        arrived = rec.dispatch_id[s][mask]
        in_flight = final.slots.dispatch_id[s][final.slots.client[s] >= 0]
        # nothing lost: every dispatch that is not in flight either arrived or drew "dropped", never both
        ids = np.setdiff1d(np.arange(final.dispatched[s]), in_flight)
        draws = np.asarray(_rng.uniform(jnp.asarray(keys[s]), _TAG_DISPATCH, jnp.asarray(ids), 1))
        assert len(np.unique(arrived)) == len(arrived)
        np.testing.assert_array_equal(np.sort(arrived), ids[draws >= np.float32(FB_DROPOUT)])
        assert final.dropped[s] == (draws < np.float32(FB_DROPOUT)).sum() == rec.num_dropped[s].sum()
        # a client is sent the current model whenever it is dispatched, also after a dispatch of it dropped
        sent_version = (rec.version[s] - rec.applied[s])[:, None] - rec.staleness[s]
        updates_by = np.array([(rec.applied[s] & (rec.time[s] <= t)).sum() for t in rec.dispatch_time[s][mask]])
        np.testing.assert_array_equal(sent_version[mask], updates_by)
        # float64 replay of the server from the arrivals: each applied once, trained from the model it was sent
        history = [pb.to_np(params0)]
        theta, mom = history[0], {k: 0.0 for k in history[0]}
        for i in range(FB_STEPS):
            m = rec.mask[s, i]
            if not m.any():
                continue
            v = rec.version[s, i] - 1
            d = {k: 0.0 for k in theta}
            for c, tau in zip(rec.client[s, i][m], rec.staleness[s, i][m]):
                sent = history[v - tau]
                x, y = clients[c]
                trained = pb.np_local_sgd(sent, x, y, int(steps[c]), 2)
                d = {k: d[k] + (1 + tau) ** -0.5 * (sent[k] - trained[k]) / m.sum() for k in d}
            mom = {k: d[k] + FB_MU * mom[k] for k in d}
            theta = {k: theta[k] - FB_LR * mom[k] for k in theta}
            history.append(theta)
        pb.assert_close(jax.tree.map(lambda a: a[s], final.params), theta)
        # the check has teeth: dispatches dropped in every seed, and clients dispatched after a drop arrived
        first_drop = rec.time[s][rec.num_dropped[s] > 0].min()
        assert (rec.dispatch_time[s][mask] > first_drop).sum() >= 2
