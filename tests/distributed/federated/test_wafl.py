"""WAFL's client (Wasserstein surrogate risk by local SGD) against a numpy float64 replay, and its identities."""

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from tests.distributed.federated import problem as pb

SIZES = [3, 5, 7, 4]
BATCH, STEPS, ROUNDS = 2, 3, 3


@pytest.fixture(scope="module")
def problem():
    clients, data, _, _ = pb.make_clients(SIZES, seed=6)
    return clients, data


def _np_perturb(p, x, y, gamma, steps, lr, tol=1e-4):
    """x' <- x' + lr (W (softmax(x'W + b) - e_y) - gamma (x' - x)), per example; official early stop."""
    xp = x.copy()
    for _ in range(steps):
        logits = xp @ p["w"] + p["b"]
        logits = logits - logits.max(1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        g = (probs - np.eye(pb.K)[y]) @ p["w"].T - gamma * (xp - x)
        xp = xp + lr * g
        if np.linalg.norm(g) / len(y) < tol:
            break
    return xp


def _np_wafl_client(p, x, y, steps, batch_size, gamma, ascent_steps, ascent_lr, lr=pb.LR):
    p = {k: v.copy() for k, v in p.items()}
    per_pass = max(-(-len(y) // batch_size), 1)
    for s in range(steps):
        b = s % per_pass
        xb, yb = x[b * batch_size:(b + 1) * batch_size], y[b * batch_size:(b + 1) * batch_size]
        xadv = _np_perturb(p, xb, yb, gamma, ascent_steps, ascent_lr)
        g = pb.np_grad(p, xadv, yb)
        p = {k: p[k] - lr * g[k] for k in p}
    return p


def _sim(local, m=3):
    return fl.FederatedSimulator(local, fl.fedavg(), fl.SyncRound(m), num_clients=len(SIZES), num_examples=SIZES,
                                 local_steps=STEPS, **pb.FAST)


def _np_fedavg(rec, params0, client_fn):
    theta = pb.to_np(params0)
    for i in range(rec.version.shape[0]):
        m = np.asarray(rec.mask[i])
        cids = [int(c) for c in np.asarray(rec.client[i])[m]]
        w = np.array([SIZES[c] for c in cids], float)
        w = w / w.sum()
        outs = [client_fn(theta, c) for c in cids]
        theta = {k: sum(wi * (o[k]) for wi, o in zip(w, outs)) for k in theta}
    return theta


def test_wafl_matches_a_numpy_replay(problem):
    clients, data = problem
    gamma, ascent_steps, ascent_lr = 1.5, 4, 0.3
    local = fl.wafl_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, gamma, ascent_steps=ascent_steps,
                                 ascent_lr=ascent_lr, shuffle=False)
    sim = _sim(local)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, seed=1), ROUNDS)
    theta = _np_fedavg(rec, params0, lambda t, c: _np_wafl_client(t, *clients[c], STEPS, BATCH, gamma,
                                                                     ascent_steps, ascent_lr))
    pb.assert_close(state.params, theta, tol=1e-4)
    # and it is not FedAvg: the perturbation moved the model
    fedavg = _np_fedavg(rec, params0, lambda t, c: pb.np_local_sgd(t, *clients[c], STEPS, BATCH))
    assert max(np.abs(theta[k] - fedavg[k]).max() for k in theta) > 1e-3


def test_the_perturbation_ascends_the_dual_objective(problem):
    clients, _ = problem
    p = pb.to_np(pb.init_params())
    x, y = clients[2]
    gamma = 2.0

    def dual(xp):
        logits = xp @ p["w"] + p["b"]
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        return (lse - logits[np.arange(len(y)), y] - 0.5 * gamma * ((xp - x) ** 2).sum(1)).mean()

    xp = np.asarray(jax.jit(lambda pp, xx, yy: fl.wasserstein_perturb(
        pb.loss_fn, pp, xx, yy, np.ones(len(yy), bool), gamma, 20, 0.1))(pb.init_params(), x.astype(np.float32), y))
    assert dual(xp) > dual(x) + 1e-3
    np.testing.assert_allclose(xp, _np_perturb(p, x, y, gamma, 20, 0.1), rtol=1e-4, atol=1e-5)


def test_zero_ascent_steps_is_fedavg_exactly(problem):
    _, data = problem
    params0 = pb.init_params()
    key = np.array([3, 9], np.uint32)
    wafl = jax.jit(fl.wafl_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, 1.0, ascent_steps=0))
    plain = jax.jit(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH))
    for cid in range(len(SIZES)):
        a, b = wafl(params0, cid, 5, key), plain(params0, cid, 5, key)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_infinite_gamma_is_fedavg(problem):
    """gamma -> inf with the ascent step 1/gamma: x'_{s+1} = x + grad_x l(x'_s) / gamma -> x."""
    clients, data = problem
    gamma = 1e8
    local = fl.wafl_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, gamma, ascent_steps=5,
                                 ascent_lr=1.0 / gamma, shuffle=False)
    sim = _sim(local, m=4)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, seed=0), 2)
    theta = _np_fedavg(rec, params0, lambda t, c: pb.np_local_sgd(t, *clients[c], STEPS, BATCH))
    pb.assert_close(state.params, theta, tol=1e-5)


def test_bad_arguments_are_clear_errors(problem):
    _, data = problem
    with pytest.raises(ValueError, match="gamma"):
        fl.wafl_local_update(pb.loss_fn, data, optax.sgd(0.1), 2, 0.0)
    with pytest.raises(ValueError, match="ascent_steps"):
        fl.wafl_local_update(pb.loss_fn, data, optax.sgd(0.1), 2, 1.0, ascent_steps=-1)
    with pytest.raises(ValueError, match="ascent_lr"):
        fl.wafl_local_update(pb.loss_fn, data, optax.sgd(0.1), 2, 1.0, ascent_lr=0.0)
