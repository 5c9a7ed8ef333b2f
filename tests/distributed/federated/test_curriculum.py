"""Curricula on the clients: paced, ordered minibatches against a numpy float64 replay; b = 1 identity."""

import importlib
import math

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated.simulator import _TAG_TRAIN
from tests.distributed.federated import problem as pb

cm = importlib.import_module("jaxopt_lab.distributed.federated.curriculum")  # the package exports the function

SIZES = [6, 9, 4]
BATCH, STEPS = 3, 6
KEY = np.array([3, 11], np.uint32)


@pytest.fixture(scope="module")
def problem():
    clients, data, _, _ = pb.make_clients(SIZES, seed=2)
    return clients, data


def _np_losses(p, x, y):
    logits = x @ p["w"] + p["b"]
    logits = logits - logits.max(1, keepdims=True)
    return -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(1)))


def _np_h(pacing, x):
    return {"linear": x, "quad": x * x, "root": math.sqrt(x), "step": math.floor(x),
            "exp": (math.exp(10 * x) - 1) / (math.exp(10) - 1), "log": 1 + 0.1 * math.log(x + math.exp(-10))}[pacing]


def _np_client(theta, x, y, key, steps, ordering, pacing, a, b, max_size, lr=pb.LR):
    """Rank by the received model's loss (or a random order), then each step a batch drawn without
    replacement (smallest hash values) from the first m_t ranked examples; float64 SGD."""
    n = len(y)
    if ordering == "random":
        s = np.asarray(_rng.uniform(key, cm._ORDER_STREAM, size=max_size))[:n]
    else:
        s = _np_losses(theta, x, y)
        s = -s if ordering == "anti" else s
    order = np.argsort(s, kind="stable")
    rank = np.empty(n, int)
    rank[order] = np.arange(n)
    p = {k: v.copy() for k, v in theta.items()}
    for t in range(steps):
        # Wu et al.'s official get_pacing_function: int(index_start + (N - index_start) h), index_start = b N
        m = min(n, max(1, int(b * n + (n - b * n) * _np_h(pacing, t / (a * steps)))))
        u = np.asarray(_rng.uniform(key, cm._BATCH_STREAM, t, size=max_size))[:n]
        pool = np.flatnonzero(rank < m)
        pick = pool[np.argsort(u[pool], kind="stable")[:BATCH]]
        gr = pb.np_grad(p, x[pick], y[pick])
        p = {k: p[k] - lr * gr[k] for k in p}
    return p


@pytest.mark.parametrize("ordering,pacing", [("curriculum", "step"), ("anti", "root"), ("random", "exp")])
def test_paced_client_matches_a_numpy_replay(problem, ordering, pacing):
    clients, data = problem
    a, b = 0.5, 0.3
    local = jax.jit(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH,
                                         curriculum=fl.curriculum(ordering, pacing, a=a, b=b)))
    params0 = pb.init_params()
    for cid in (0, 1):
        out = local(params0, cid, STEPS, KEY)
        ref = _np_client(pb.to_np(params0), *clients[cid], KEY, STEPS, ordering, pacing, a, b, data.max_size)
        pb.assert_close(out, ref, tol=1e-5)


@pytest.mark.parametrize("pacing", ["linear", "quad", "root", "step", "exp", "log"])
def test_pool_size_is_the_official_truncated_pacing(pacing):
    # google-research/understanding-curricula utils.get_pacing_function: int(rate * f(step) + b N)
    for n, steps, a, b in ((10, 10, 0.5, 0.2), (7, 13, 0.8, 0.3), (23, 6, 1.5, 0.35)):
        got = [int(cm.pool_size(pacing, a, b, np.int32(t), np.int32(steps), np.int32(n))) for t in range(steps)]
        ref = [min(n, max(1, int(b * n + (n - b * n) * _np_h(pacing, t / (a * steps))))) for t in range(steps)]
        assert got == ref, (n, steps, a, b)


def test_pool_grows_from_b_to_all():
    n = np.int32(10)
    sizes = [int(cm.pool_size("linear", 0.5, 0.2, np.int32(t), np.int32(10), n)) for t in range(10)]
    assert sizes[0] == 2 and sizes == sorted(sizes) and sizes[5:] == [10] * 5


def test_b_one_makes_the_ordering_irrelevant(problem):
    _, data = problem
    params0 = pb.init_params()
    outs = [jax.jit(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH,
                                         curriculum=fl.curriculum(o, "linear", b=1.0)))(params0, 1, STEPS, KEY)
            for o in ("anti", "random")]
    for o in outs[1:]:
        pb.assert_close(o, pb.to_np(outs[0]), tol=0)


def test_fixed_scores_order_the_examples(problem):
    """Fixed scores equal to the received model's losses give the default (loss-scored) client."""
    clients, data = problem
    params0 = pb.init_params()
    losses = np.zeros((len(SIZES), data.max_size), np.float32)
    for i, (x, y) in enumerate(clients):
        losses[i, :len(y)] = _np_losses(pb.to_np(params0), x, y)
    a = jax.jit(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH,
                                     curriculum=fl.curriculum("anti", scores=losses)))(params0, 1, STEPS, KEY)
    b = jax.jit(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH,
                                     curriculum=fl.curriculum("anti")))(params0, 1, STEPS, KEY)
    pb.assert_close(a, pb.to_np(b), tol=1e-6)


def test_in_the_simulator_matches_a_numpy_fedavg_replay(problem):
    clients, data = problem
    local = fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, curriculum=fl.curriculum("curriculum"))
    sim = fl.FederatedSimulator(local, fl.fedavg(1.0), fl.SyncRound(2), num_clients=len(SIZES), num_examples=SIZES,
                                local_steps=STEPS, **pb.FAST)
    params0 = pb.init_params()
    state0 = sim.init(params0, seed=1)
    state, rec = sim.run(state0, 2)
    theta = pb.to_np(params0)
    for i in range(2):
        m = np.asarray(rec.mask[i])
        cids, dids = np.asarray(rec.client[i])[m], np.asarray(rec.dispatch_id[i])[m]
        outs = []
        for c, d in zip(cids, dids):
            key = np.asarray(_rng.key_data(np.asarray(state0.key), _TAG_TRAIN, d))
            outs.append(_np_client(theta, *clients[int(c)], key, STEPS, "curriculum", "linear", 0.8, 0.2,
                                   data.max_size))
        w = np.array([SIZES[c] for c in cids], float)
        w /= w.sum()
        theta = {k: sum(wi * o[k] for wi, o in zip(w, outs)) for k in theta}
    pb.assert_close(state.params, theta, tol=1e-4)


def test_bad_arguments(problem):
    _, data = problem
    for kw, msg in [({"ordering": "easy"}, "ordering"), ({"pacing": "cubic"}, "pacing"), ({"a": 0.0}, "a must"),
                    ({"b": 0.0}, "b must"), ({"scores": np.zeros(3)}, "scores")]:
        with pytest.raises(ValueError, match=msg):
            fl.curriculum(**kw)
    with pytest.raises(ValueError, match="scores must have shape"):
        fl.make_local_update(pb.loss_fn, data, optax.sgd(0.1), 2, curriculum=fl.curriculum(scores=np.zeros((2, 2))))
    with pytest.raises(ValueError, match="fl.curriculum"):
        fl.make_local_update(pb.loss_fn, data, optax.sgd(0.1), 2, curriculum="curriculum")
