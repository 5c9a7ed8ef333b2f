"""FedLEx: the guidance matrix and the guided FedAvg against a numpy float64 replay; G = 1 is FedAvg."""

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from tests.distributed.federated import problem as pb

SIZES = [3, 5, 7, 4]
BATCH, STEPS = 2, 3
EXPLORERS = [0, 2, 3]


@pytest.fixture(scope="module")
def problem():
    clients, data, _, _ = pb.make_clients(SIZES, seed=7)
    return clients, data


def _np_guidance(theta, clients, normalization):
    outs = [pb.np_local_sgd(theta, *clients[i], -(-SIZES[i] // BATCH), BATCH) for i in EXPLORERS]
    g = {}
    for k in theta:
        s = np.mean([(o[k] - theta[k]) ** 2 for o in outs], 0)
        if s.max() - s.min() <= 1e-6 * s.max():
            # two-class softmax: the bias moves by +d and -d, equal spreads (0 in float32): G = 1
            g[k] = np.ones_like(s)
        elif normalization == "minmax":
            g[k] = (s - s.min()) / (s.max() - s.min())
        else:
            g[k] = (s - np.median(s)) / (np.quantile(s, 0.75) - np.quantile(s, 0.25))
    return g


def _np_guided_sgd(p, g, x, y, steps, batch, lr=pb.LR):
    p = {k: v.copy() for k, v in p.items()}
    per_pass = max(-(-len(y) // batch), 1)
    for s in range(steps):
        b = s % per_pass
        gr = pb.np_grad(p, x[b * batch:(b + 1) * batch], y[b * batch:(b + 1) * batch])
        p = {k: p[k] - lr * g[k] * gr[k] for k in p}
    return p


@pytest.mark.parametrize("normalization", ["minmax", "robust"])
def test_fedlex_matches_a_numpy_replay(problem, normalization):
    clients, data = problem
    params0 = pb.init_params()
    theta = pb.to_np(params0)
    explore = pb.local_update(data, BATCH)
    steps = fl.epoch_steps(np.array(SIZES)[EXPLORERS], BATCH)
    guide = fl.fedlex_guidance(explore, params0, EXPLORERS, steps, seed=0, normalization=normalization)
    g_np = _np_guidance(theta, clients, normalization)
    pb.assert_close(guide, g_np, tol=1e-4)
    if normalization == "minmax":
        assert abs(float(guide["w"].min())) < 1e-6 and abs(float(guide["w"].max()) - 1.0) < 1e-6

    local = fl.fedlex_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, shuffle=False)
    sim = fl.FederatedSimulator(local, fl.fedlex(guide, 0.8), fl.SyncRound(3), num_clients=len(SIZES),
                                num_examples=SIZES, local_steps=STEPS, client_context=fl.fedlex_context, **pb.FAST)
    state, rec = sim.run(sim.init(params0, seed=1), 3)
    g32 = {k: np.asarray(v, np.float64) for k, v in guide.items()}  # replay with the float32 G it was sent
    for i in range(3):
        m = np.asarray(rec.mask[i])
        cids = np.asarray(rec.client[i])[m]
        w = np.array([SIZES[c] for c in cids], float)
        w /= w.sum()
        outs = [_np_guided_sgd(theta, g32, *clients[int(c)], STEPS, BATCH) for c in cids]
        theta = {k: theta[k] - 0.8 * sum(wi * (theta[k] - o[k]) for wi, o in zip(w, outs)) for k in theta}
    pb.assert_close(state.params, theta, tol=1e-4)


def test_unit_guidance_is_fedavg_exactly(problem):
    _, data = problem
    params0 = pb.init_params()
    ones = jax.tree.map(np.ones_like, params0)
    lex = fl.FederatedSimulator(fl.fedlex_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH), fl.fedlex(ones),
                                fl.SyncRound(2), num_clients=len(SIZES), num_examples=SIZES, local_steps=STEPS,
                                client_context=fl.fedlex_context, **pb.FAST)
    avg = fl.FederatedSimulator(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH), fl.fedavg(),
                                fl.SyncRound(2), num_clients=len(SIZES), num_examples=SIZES, local_steps=STEPS,
                                **pb.FAST)
    a, _ = lex.run(lex.init(params0, seed=4), 2)
    b, _ = avg.run(avg.init(params0, seed=4), 2)
    pb.assert_close(a.params, pb.to_np(b.params), tol=0)


def test_bad_arguments(problem):
    _, data = problem
    explore = pb.local_update(data, BATCH)
    with pytest.raises(ValueError, match="normalization"):
        fl.fedlex_guidance(explore, pb.init_params(), [0], 1, normalization="zscore")
    with pytest.raises(ValueError, match="at least one"):
        fl.fedlex_guidance(explore, pb.init_params(), [], 1)
    with pytest.raises(ValueError, match="FedLExState"):
        fl.fedlex_context(fl.fedavg().init(pb.init_params()))
