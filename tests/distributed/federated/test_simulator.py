"""The event-driven simulator against hand-built schedules and an independent numpy replay."""

import numpy as np
import pytest

from jaxopt_lab.distributed import federated as fl
from tests.distributed.federated import problem as pb


def _arrivals(rec, i):
    """(client, staleness) pairs of server step i, in arrival order."""
    m = np.asarray(rec.mask[i])
    return list(zip(np.asarray(rec.client[i])[m].tolist(), np.asarray(rec.staleness[i])[m].tolist()))


def _replay(rec, params0, clients, batch_size, local_steps, server):
    """Recompute every server step in numpy float64 from the recorded schedule.

    ``server(theta, sent_and_trained, arrival_info) -> theta`` applies one step. The model a
    client was sent is the one at version (version before the step) - staleness.
    """
    history = [pb.to_np(params0)]
    theta = history[0]
    for i in range(rec.version.shape[0]):
        m = np.asarray(rec.mask[i])
        if not m.any():
            assert not bool(rec.applied[i])
            continue
        v_before = int(rec.version[i]) - 1
        assert v_before == len(history) - 1
        items = []
        for c, tau in zip(np.asarray(rec.client[i])[m], np.asarray(rec.staleness[i])[m]):
            sent = history[v_before - int(tau)]
            x, y = clients[int(c)]
            items.append((int(c), int(tau), sent, pb.np_local_sgd(sent, x, y, int(local_steps[int(c)]), batch_size)))
        theta = server(theta, items)
        history.append(theta)
    return theta


# ----------------------------------------------------------------- equivalences

def test_fedavg_full_participation_one_step_equal_sizes_is_centralized_sgd():
    sizes = [5, 5, 5, 5]
    clients, data, x, y = pb.make_clients(sizes)
    sim = fl.FederatedSimulator(pb.local_update(data, batch_size=5), fl.fedavg(), fl.SyncRound(4),
                                num_clients=4, num_examples=sizes, local_steps=1, speeds="lognormal", **pb.FAST)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, seed=3), 4)
    theta = pb.to_np(params0)
    for _ in range(4):  # full-batch gradient descent on the pooled data, float64
        g = pb.np_grad(theta, x, y)
        theta = {k: theta[k] - pb.LR * g[k] for k in theta}
    pb.assert_close(state.params, theta)
    np.testing.assert_array_equal(rec.num_arrivals, [4] * 4)
    np.testing.assert_array_equal(rec.staleness, np.zeros((4, 4)))
    np.testing.assert_array_equal(rec.version, [1, 2, 3, 4])
    # the round lasts as long as its slowest client (1 step / speed)
    np.testing.assert_allclose(np.diff(np.r_[0, rec.time]), [1 / sim.speeds.min()] * 4, rtol=1e-5)


@pytest.fixture(scope="module")
def unequal():
    sizes = [3, 5, 7, 4]
    clients, data, _, _ = pb.make_clients(sizes, seed=4)
    steps = [3, 3, 3, 3]  # equal work at equal speeds: all four arrive together
    return sizes, clients, data, steps


def test_fedbuff_with_k_equal_n_uniform_speeds_no_staleness_is_fedavg(unequal):
    sizes, clients, data, steps = unequal
    buf = fl.FederatedSimulator(pb.local_update(data, batch_size=2), fl.fedbuff(weighting="examples"), fl.Buffer(4),
                                concurrency=4, num_clients=4, num_examples=sizes, local_steps=steps, **pb.FAST)
    params0 = pb.init_params()
    s_buf, r_buf = buf.run(buf.init(params0, 0), 3)
    np.testing.assert_array_equal(r_buf.staleness, 0)
    np.testing.assert_array_equal(r_buf.num_arrivals, [4, 4, 4])
    np.testing.assert_allclose(r_buf.time, [3.0, 6.0, 9.0], rtol=1e-6)  # a round: 3 steps at speed 1
    # FedAvg, full participation, in float64: the example-weighted mean of the clients' local SGD
    # (the simulator's own FedAvg is checked against this same reference below)
    theta = pb.to_np(params0)
    for _ in range(3):
        outs = [pb.np_local_sgd(theta, x, y, int(q), 2) for (x, y), q in zip(clients, steps)]
        w = np.asarray(sizes, float) / sum(sizes)
        theta = {k: sum(wi * o[k] for wi, o in zip(w, outs)) for k in theta}
    pb.assert_close(s_buf.params, theta)


def test_fedavg_with_unequal_steps_in_lane_groups_matches_numpy(unequal):
    sizes, clients, data, _ = unequal
    steps = fl.epoch_steps(sizes, 2)  # 2, 3, 4, 2: the lanes get reordered for training
    sim = fl.FederatedSimulator(pb.local_update(data, batch_size=2), fl.fedavg(), fl.SyncRound(4), num_clients=4,
                                num_examples=sizes, local_steps=steps, lane_groups=(1, 1, 2), **pb.FAST)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, 0), 2)
    theta = pb.to_np(params0)
    for _ in range(2):
        outs = [pb.np_local_sgd(theta, x, y, int(q), 2) for (x, y), q in zip(clients, steps)]
        w = np.asarray(sizes, float) / sum(sizes)
        theta = {k: sum(wi * o[k] for wi, o in zip(w, outs)) for k in theta}
    pb.assert_close(state.params, theta)
    m = np.asarray(rec.mask)
    np.testing.assert_array_equal(np.asarray(rec.local_steps)[m], steps[np.asarray(rec.client)[m]])


# ----------------------------------------------------------------- hand-built arrival schedules

SPEEDS = [1.0, 2.5, 3.5]  # one local step takes 1, 0.4, 2/7 time units


def test_fedasync_staleness_follows_the_hand_built_schedule():
    clients, data, _, _ = pb.make_clients([4, 4, 4], seed=5)
    alpha = 0.6
    sim = fl.FederatedSimulator(pb.local_update(data, batch_size=4), fl.fedasync(alpha, "polynomial", a=0.5),
                                fl.every_arrival(), num_clients=3, concurrency=3, speeds=SPEEDS,
                                pseudo_gradient="current", **pb.FAST)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, 0), 9)
    # all three dispatched at t=0 (version 0); each arrival is re-sent at once with the new model:
    #  t     client  sent at version  applied as version  staleness
    #  2/7   2       0                1                   0
    #  0.4   1       0                2                   1
    #  4/7   2       1                3                   1
    #  0.8   1       2                4                   1
    #  6/7   2       3                5                   1
    #  1.0   0       0                6                   5
    #  8/7   2       5                7                   1
    #  1.2   1       4                8                   3
    #  10/7  2       7                9                   1
    expected = [(2, 0), (1, 1), (2, 1), (1, 1), (2, 1), (0, 5), (2, 1), (1, 3), (2, 1)]
    assert [_arrivals(rec, i)[0] for i in range(9)] == expected
    np.testing.assert_allclose(rec.time, [2 / 7, 0.4, 4 / 7, 0.8, 6 / 7, 1.0, 8 / 7, 1.2, 10 / 7], rtol=1e-5)
    np.testing.assert_array_equal(rec.version, np.arange(1, 10))

    def mix(theta, items):  # theta <- (1 - a s) theta + a s x
        ((_, tau, _, x),) = items
        a = alpha * (1 + tau) ** -0.5
        return {k: (1 - a) * theta[k] + a * x[k] for k in theta}

    pb.assert_close(state.params, _replay(rec, params0, clients, 4, [1, 1, 1], mix))


def test_fedbuff_buffer_of_two_follows_the_hand_built_schedule():
    clients, data, _, _ = pb.make_clients([4, 4, 4], seed=6)
    sim = fl.FederatedSimulator(pb.local_update(data, batch_size=4), fl.fedbuff(0.9), fl.Buffer(2),
                                num_clients=3, concurrency=3, speeds=SPEEDS, **pb.FAST)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, 0), 4)
    # an arrival that does not fill the buffer is re-sent at once (same version); the one
    # that fills it is re-sent after the server step, with the new version:
    #  step 1: 2@2/7 (v0, tau 0; re-sent v0), 1@0.4 (v0, tau 0)            -> v1
    #  step 2: 2@4/7 (v0, tau 1; re-sent v1), 1@0.8 (sent v1 at 0.4, tau 0) -> v2
    #  step 3: 2@6/7 (v1, tau 1; re-sent v2), 0@1.0 (v0, tau 2)             -> v3
    #  step 4: 2@8/7 (v2, tau 1), 1@1.2 (sent v2 at 0.8, tau 1)             -> v4
    assert [_arrivals(rec, i) for i in range(4)] == [[(2, 0), (1, 0)], [(2, 1), (1, 0)], [(2, 1), (0, 2)], [(2, 1), (1, 1)]]
    np.testing.assert_allclose(rec.time, [0.4, 0.8, 1.0, 1.2], rtol=1e-5)

    def buffered(theta, items):  # theta <- theta - lr/K sum s(tau) (sent - x)
        d = {k: sum((1 + tau) ** -0.5 * (sent[k] - x[k]) for _, tau, sent, x in items) / 2 for k in theta}
        return {k: theta[k] - 0.9 * d[k] for k in theta}

    pb.assert_close(state.params, _replay(rec, params0, clients, 4, [1, 1, 1], buffered))


def test_fedfix_aggregates_each_window_and_skips_empty_ones():
    sizes = [4, 6]
    clients, data, _, _ = pb.make_clients(sizes, seed=7)
    rule = fl.fedfix(period=0.8, total_examples=float(sum(sizes)))  # the official unnormalized weights
    sim = fl.FederatedSimulator(pb.local_update(data, batch_size=4), rule, fl.TimeWindow(0.8),
                                num_clients=2, num_examples=sizes, speeds=[1.0, 1 / 2.2], **pb.FAST)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, 0), 6)
    # client 0 needs 1.0 per round trip, client 1 2.2; windows of 0.8; arrivals re-sent at the window's end
    #  (0, .8]: nothing | (.8, 1.6]: 0 (v0) | (1.6, 2.4]: 1 (v0, tau 1) | (2.4, 3.2]: 0 (sent v1 at 1.6)
    #  (3.2, 4.0]: nothing | (4.0, 4.8]: 0 (sent v3 at 3.2, tau 0), 1 (sent v2 at 2.4, tau 1)
    assert [_arrivals(rec, i) for i in range(6)] == [[], [(0, 0)], [(1, 1)], [(0, 1)], [], [(0, 0), (1, 1)]]
    np.testing.assert_allclose(rec.time, [0.8, 1.6, 2.4, 3.2, 4.0, 4.8], rtol=1e-5)
    np.testing.assert_array_equal(rec.version, [0, 1, 2, 3, 3, 4])
    np.testing.assert_array_equal(rec.applied, [False, True, True, True, False, True])

    # weights p_i d_i, p_i = n_i / sum_j n_j, d_i = windows in flight: 2 for client 0 (1.0 s), 3 for client 1 (2.2 s)
    windows = {0: 2, 1: 3}
    elapsed = np.asarray(rec.time)[:, None] - np.asarray(rec.dispatch_time)
    np.testing.assert_allclose(elapsed[np.asarray(rec.mask)],
                               [0.8 * windows[c] for c in np.asarray(rec.client)[np.asarray(rec.mask)]], rtol=1e-5)

    def window(theta, items):
        n = sum(sizes)
        return {k: theta[k] - sum(sizes[c] * windows[c] / n * (sent[k] - x[k]) for c, _, sent, x in items)
                for k in theta}

    pb.assert_close(state.params, _replay(rec, params0, clients, 4, [1, 1], window))


def test_fedcompass_assigns_step_counts_so_arrivals_group_and_mixes_them_in_officially():
    clients, data, _, _ = pb.make_clients([4, 4, 4, 4], seed=8)
    sim = fl.FederatedSimulator(pb.local_update(data, batch_size=2), fl.fedcompass(4), fl.Compass(1, 4),
                                num_clients=4, speeds=[1.0, 1.0, 2.0, 2.0], pseudo_gradient="current", **pb.FAST)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, 0), 3)
    # round 1: no speed known: everyone gets q_max = 4 steps, one group, closes at t = 4.
    # t = 4, fastest first: a fast client (0.5 s/step) opens a group due at 6 with 4 steps, the other
    #   fast one joins it (4 steps), the slow ones (1 s/step) join it too with floor((6 - 4) / 1) = 2 steps.
    # t = 6: the same again, due at 8: the group stays whole, every arrival is fresh.
    np.testing.assert_allclose(rec.time, [4.0, 6.0, 8.0], rtol=1e-6)
    got = [sorted(_arrivals(rec, i)) for i in range(3)]
    assert got == [[(0, 0), (1, 0), (2, 0), (3, 0)]] * 3
    m = np.asarray(rec.mask)
    by_client = [dict(zip(np.asarray(rec.client)[i][m[i]].tolist(), np.asarray(rec.local_steps)[i][m[i]].tolist()))
                 for i in range(3)]
    assert by_client == [{0: 4, 1: 4, 2: 4, 3: 4}] + [{0: 2, 1: 2, 2: 4, 3: 4}] * 2
    np.testing.assert_allclose(state.step_time_est, [1.0, 1.0, 0.5, 0.5], rtol=1e-6)
    # APPFL's FedCompassAggregator in float64: theta <- (1 - sum a_i) theta + sum a_i x_i,
    # a_i = 0.9 (1 + tau_i)^-0.5 / N over all N = 4 clients; x_i trained from the model it was sent
    theta = pb.to_np(params0)
    for i in range(3):
        assert _arrivals(rec, i) and all(tau == 0 for _, tau in _arrivals(rec, i))  # sent = current theta
        alphas, xs = [], []
        for c, q in by_client[i].items():
            x, y = clients[c]
            alphas.append(0.9 / 4)
            xs.append(pb.np_local_sgd(theta, x, y, q, 2))
        theta = {k: (1 - sum(alphas)) * theta[k] + sum(a * xi[k] for a, xi in zip(alphas, xs)) for k in theta}
    pb.assert_close(state.params, theta)


# ----------------------------------------------------------------- random clients, dropout, seeds, resume

N_RANDOM = 6
SIZES_RANDOM = [2, 3, 4, 5, 3, 2]
DROPOUT = [1.0, 0.1, 0.1, 0.1, 0.1, 0.1]  # client 0 never returns


@pytest.fixture(scope="module")
def randomized():
    clients, data, _, _ = pb.make_clients(SIZES_RANDOM, seed=9)
    steps = fl.epoch_steps(SIZES_RANDOM, 2)
    sim = fl.FederatedSimulator(
        pb.local_update(data, batch_size=2), fl.fedbuff(0.8, momentum=0.5), fl.Buffer(2),
        num_clients=N_RANDOM, concurrency=3, local_steps=steps, speeds="lognormal", speed_sigma=1.0,
        max_speed_spread=10.0, time_jitter=0.2, dropout=DROPOUT, lane_groups=2, **pb.FAST)  # lanes trained in 2 groups
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, seed=11), 12)
    return sim, params0, clients, steps, state, rec


def test_random_schedule_is_consistent_and_replays_in_numpy(randomized):
    sim, params0, clients, steps, state, rec = randomized
    m = np.asarray(rec.mask)
    times, arr = np.asarray(rec.time), np.asarray(rec.arrival_time)[m]
    assert np.all(np.diff(times) >= 0) and np.all(np.diff(arr) >= 0)  # applied in arrival order
    for i in range(len(times)):  # every arrival of a step happened by the step's time
        assert np.all(np.asarray(rec.arrival_time[i])[m[i]] <= times[i] + 1e-6)
    ideal = np.asarray(rec.local_steps)[m] / sim.speeds[np.asarray(rec.client)[m]]
    ratio = (arr - np.asarray(rec.dispatch_time)[m]) / ideal  # the per-dispatch jitter factor
    assert np.all((ratio > 0.3) & (ratio < 3.0)) and np.std(np.log(ratio)) > 0.05
    assert np.asarray(rec.staleness)[m].max() > 0  # asynchrony really happened
    mom = {}

    def server(theta, items):  # optax.sgd(0.8, momentum=0.5) on the FedBuff direction
        d = {k: sum((1 + tau) ** -0.5 * (sent[k] - x[k]) for _, tau, sent, x in items) / 2 for k in theta}
        for k in d:
            mom[k] = d[k] + 0.5 * mom.get(k, 0.0)
        return {k: theta[k] - 0.8 * mom[k] for k in theta}

    pb.assert_close(state.params, _replay(rec, params0, clients, 2, steps, server))


def test_dropped_client_neither_stalls_fedbuff_nor_is_applied(randomized):
    sim, _, _, _, state, rec = randomized
    np.testing.assert_array_equal(rec.version, np.arange(1, 13))  # a server step every time: no stall
    np.testing.assert_array_equal(rec.num_arrivals, [2] * 12)
    m = np.asarray(rec.mask)
    assert 0 not in np.asarray(rec.client)[m]
    ids = np.asarray(rec.dispatch_id)[m]
    assert len(np.unique(ids)) == len(ids)  # no update applied twice
    assert int(state.applied) == 24 and int(state.dropped) == int(rec.num_dropped.sum()) > 0
    assert int(state.dispatched) == int(state.applied) + int(state.dropped) + int((state.slots.client >= 0).sum())
    # every time-out freed its client: only the in-flight clients are busy
    busy = np.zeros(N_RANDOM, bool)
    busy[np.asarray(state.slots.client)[np.asarray(state.slots.client) >= 0]] = True
    np.testing.assert_array_equal(state.busy, busy)


def test_same_seed_same_run_other_seed_other_run(randomized):
    sim, params0, _, _, state, rec = randomized
    again, rec2 = sim.run(sim.init(params0, seed=11), 12)
    for a, b in zip(jax_leaves((state, rec)), jax_leaves((again, rec2))):
        np.testing.assert_array_equal(a, b)
    other, rec3 = sim.run(sim.init(params0, seed=12), 12)
    assert not np.array_equal(rec.client, rec3.client) or not np.array_equal(rec.time, rec3.time)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_checkpoint_with_orbax_and_resume_bit_identically(randomized, tmp_path):
    from jaxopt_lab.experiment.checkpoint import Checkpointer

    sim, params0, _, _, state, _ = randomized
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(12, state, {"what": "fedbuff"})
    ckpt.wait()
    uninterrupted, rec_a = sim.run(state, 12)
    restored, config = ckpt.restore(12, like=sim.init(params0, seed=0))
    ckpt.close()
    assert config == {"what": "fedbuff"}
    resumed, rec_b = sim.run(restored, 12)
    for a, b in zip(jax_leaves((uninterrupted, rec_a)), jax_leaves((resumed, rec_b))):
        np.testing.assert_array_equal(a, b)
    # and the 24 steps equal one uninterrupted run of 12 + 12 from the start
    s0, _ = sim.run(sim.init(params0, seed=11), 12)
    s1, _ = sim.run(s0, 12)
    for a, b in zip(jax_leaves(s1), jax_leaves(resumed)):
        np.testing.assert_array_equal(a, b)
