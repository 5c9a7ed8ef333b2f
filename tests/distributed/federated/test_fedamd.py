"""FedAMD (anchor sampling) in the simulator against an independent numpy float64 replay."""

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated.simulator import _TAG_TRAIN
from tests.distributed.federated import problem as pb

SIZES = [3, 5, 7, 4]
BATCH, STEPS, ETA_G = 2, 3, 0.8


@pytest.fixture(scope="module")
def problem():
    clients, data, _, _ = pb.make_clients(SIZES, seed=5)
    return clients, data


def _anchor_table(key, num_dispatches, p):
    """Anchor or miner, by dispatch id (the draw the clients make from their training keys)."""
    draw = jax.jit(jax.vmap(lambda d: fl.fedamd_is_anchor(_rng.key_data(key, _TAG_TRAIN, d), p)))
    return np.asarray(draw(np.arange(num_dispatches, dtype=np.int32)))


def _np_miner(theta, c, x, y, steps, batch_size, lr=pb.LR):
    """The official fedamd_train_iter (HarliWu/FedAMD algo/fedamd.py), in-order batches: per batch B_s,
    v <- v - g(last; B_s) + g(x; B_s), last <- x, x <- x - lr v; v starts at c, last at theta."""
    xk, last, v = dict(theta), dict(theta), dict(c)
    per_pass = max(-(-len(y) // batch_size), 1)
    for s in range(steps):
        b = s % per_pass
        xb, yb = x[b * batch_size:(b + 1) * batch_size], y[b * batch_size:(b + 1) * batch_size]
        gl, gx = pb.np_grad(last, xb, yb), pb.np_grad(xk, xb, yb)
        v = {k: v[k] - gl[k] + gx[k] for k in v}
        last = xk
        xk = {k: xk[k] - lr * v[k] for k in xk}
    return xk


def _np_context(table, has):
    if not has.any():
        return {k: np.zeros_like(v[0]) for k, v in table.items()}
    return {k: v[has].mean(0) for k, v in table.items()}


def _replay(rec, key, params0, clients, p, warm=True):
    """Server steps of FedAMD in float64, from the recorded schedule. Returns (theta, c). ``warm``: every
    client's full-batch gradient at theta_0 fills the anchor table first (official main_fmnist.py)."""
    theta = pb.to_np(params0)
    table = {k: np.zeros((len(SIZES),) + v.shape) for k, v in theta.items()}
    has = np.zeros(len(SIZES), bool)
    if warm:
        for cid, (x, y) in enumerate(clients):
            for k, g in pb.np_grad(theta, x, y).items():
                table[k][cid] = g
        has[:] = True
    history = [(theta, _np_context(table, has))]  # (model, control variate) of each version
    n_anchor = 0
    is_anchor = _anchor_table(key, int(np.asarray(rec.dispatch_id).max()) + 1, p)
    for i in range(rec.version.shape[0]):
        m = np.asarray(rec.mask[i])
        if not m.any():
            continue
        v_before = int(rec.version[i]) - 1
        cids = np.asarray(rec.client[i])[m]
        taus = np.asarray(rec.staleness[i])[m]
        anchors = is_anchor[np.asarray(rec.dispatch_id[i])[m]]
        n_anchor += int(anchors.sum())
        deltas, new = [], {}
        for cid, tau, a in zip(cids, taus, anchors):
            sent, c = history[v_before - int(tau)]
            x, y = clients[int(cid)]
            if a:
                new[int(cid)] = pb.np_grad(sent, x, y)
            else:
                xk = _np_miner(sent, c, x, y, STEPS, BATCH)
                deltas.append({k: sent[k] - xk[k] for k in sent})
        if deltas:
            theta = {k: theta[k] - ETA_G * np.mean([d[k] for d in deltas], 0) for k in theta}
        for cid, g in new.items():
            for k in table:
                table[k][cid] = g[k]
            has[cid] = True
        history.append((theta, _np_context(table, has)))
    return theta, history[-1][1], n_anchor


def _sim(data, trigger, p, warm=True, **kw):
    local = fl.fedamd_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, p, shuffle=False)
    anchors = fl.fedamd_initial_anchors(pb.loss_fn, data, pb.init_params()) if warm else None
    rule = fl.fedamd(ETA_G, num_clients=len(SIZES), initial_anchors=anchors)
    return fl.FederatedSimulator(local, rule, trigger, num_clients=len(SIZES),
                                 num_examples=SIZES, local_steps=STEPS, client_context=fl.fedamd_context,
                                 **kw, **pb.FAST)


@pytest.mark.parametrize("trigger", ["sync", "buffer", "sync-empty-table"])
def test_fedamd_matches_a_numpy_replay(problem, trigger):
    clients, data = problem
    warm = trigger != "sync-empty-table"
    if trigger != "buffer":
        sim = _sim(data, fl.SyncRound(3), 0.4, warm=warm)
    else:  # asynchronous: each client uses the model and control variate of its dispatch
        sim = _sim(data, fl.Buffer(2), 0.4, concurrency=3, speeds="lognormal", speed_sigma=1.0)
    params0 = pb.init_params()
    state0 = sim.init(params0, seed=2)
    theta0 = pb.to_np(params0)
    c0 = {k: np.mean([pb.np_grad(theta0, x, y)[k] * warm for x, y in clients], 0) for k in theta0}
    pb.assert_close(fl.fedamd_context(state0.rule_state), c0, tol=1e-5)  # official: c_0 = mean_i grad f_i(theta_0)
    state, rec = sim.run(state0, 6)
    theta, c, n_anchor = _replay(rec, np.asarray(state0.key), params0, clients, 0.4, warm)
    assert 0 < n_anchor < int(np.asarray(rec.mask).sum())  # both kinds occurred
    if trigger == "buffer":
        assert np.asarray(rec.staleness).max() > 0
    pb.assert_close(state.params, theta, tol=1e-4)
    pb.assert_close(fl.fedamd_context(state.rule_state), c, tol=1e-4)


def test_an_anchor_keeps_the_model_and_returns_its_full_gradient(problem):
    clients, data = problem
    local = jax.jit(fl.fedamd_local_update(pb.loss_fn, data, optax.sgd(pb.LR), 2, 1.0))
    params0 = pb.init_params()
    x, aux = local(params0, 2, 3, np.array([0, 7], np.uint32), jax.tree.map(np.ones_like, params0))
    assert bool(aux["anchor"])
    pb.assert_close(x, pb.to_np(params0), tol=0)
    pb.assert_close(aux["grad"], pb.np_grad(pb.to_np(params0), *clients[2]))


def test_miner_identities(problem):
    """p = 0 (no anchor ever): c = 0 keeps v_k = 0, the miner stands still (unlike FedAvg). With full
    batches and c = the client's own gradient at the received model, v_k = grad f_i(x_k): the miner
    is plain local gradient descent, i.e. FedAvg's client."""
    clients, data = problem
    local = jax.jit(fl.fedamd_local_update(pb.loss_fn, data, optax.sgd(pb.LR), 8, 0.0, shuffle=False))
    params0 = pb.init_params()
    theta = pb.to_np(params0)
    key = np.zeros(2, np.uint32)
    zeros = jax.tree.map(np.zeros_like, params0)
    x, aux = local(params0, 2, 4, key, zeros)
    assert not bool(aux["anchor"])
    pb.assert_close(x, theta, tol=0)
    g = pb.np_grad(theta, *clients[2])
    x, _ = local(params0, 2, 4, key, {k: v.astype(np.float32) for k, v in g.items()})
    pb.assert_close(x, pb.np_local_sgd(theta, *clients[2], 4, 8), tol=1e-4)


def test_fedamd_without_client_context_is_a_clear_error(problem):
    _, data = problem
    rule = fl.fedamd(num_clients=4, initial_anchors=None)
    with pytest.raises(ValueError, match="initial_anchors must stack"):
        fl.fedamd(num_clients=4, initial_anchors={"w": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="client_aux"):
        rule.update({"w": np.zeros((2, 3))}, rule.init({"w": np.zeros(3)}), None, mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="anchor_prob"):
        fl.fedamd_local_update(pb.loss_fn, data, optax.sgd(0.1), 2, 1.5)
