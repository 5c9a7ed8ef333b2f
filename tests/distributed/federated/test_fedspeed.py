"""FedSpeed in the simulator against an independent numpy float64 replay; its identities."""

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from tests.distributed.federated import problem as pb

SIZES = [3, 5, 7, 4]
BATCH, STEPS = 2, 3
LAMB, RHO = 0.3, 0.2


@pytest.fixture(scope="module")
def problem():
    clients, data, _, _ = pb.make_clients(SIZES, seed=5)
    return clients, data


def _norm(t):
    return np.sqrt(sum(float(np.sum(v ** 2)) for v in t.values()))


def _np_client(theta, h, x, y, steps, batch, lamb, rho, alpha, clip, lr=pb.LR):
    """The official client (ESAM step, prox-correction, torch clip, SGD weight decay lamb), float64."""
    p = {k: v.copy() for k, v in theta.items()}
    per_pass = max(-(-len(y) // batch), 1)
    for s in range(steps):
        b = s % per_pass
        xb, yb = x[b * batch:(b + 1) * batch], y[b * batch:(b + 1) * batch]
        g1 = pb.np_grad(p, xb, yb)
        scale = rho / (_norm(g1) + 1e-7)
        g2 = pb.np_grad({k: p[k] + scale * g1[k] for k in p}, xb, yb)
        g = {k: (1 - alpha) * g1[k] + alpha * g2[k] + lamb * (h[k] - theta[k]) for k in p}
        if clip is not None:
            g = {k: v * min(1.0, clip / (_norm(g) + 1e-6)) for k, v in g.items()}
        p = {k: p[k] - lr * (g[k] + lamb * p[k]) for k in p}
    return p


def _replay(rec, params0, clients, lamb, rho, alpha, clip, weighting):
    theta = pb.to_np(params0)
    h = {k: np.zeros((len(SIZES),) + v.shape) for k, v in theta.items()}
    for i in range(rec.version.shape[0]):
        m = np.asarray(rec.mask[i])
        cids = np.asarray(rec.client[i])[m]
        outs = []
        for cid in cids:
            hi = {k: v[cid] for k, v in h.items()}
            outs.append(_np_client(theta, hi, *clients[int(cid)], STEPS, BATCH, lamb, rho, alpha, clip))
        w = np.array([SIZES[c] for c in cids], float) if weighting == "examples" else np.ones(len(cids))
        w = w / w.sum()
        for cid, o in zip(cids, outs):
            for k in h:
                h[k][cid] += o[k] - theta[k]
        theta = {k: sum(wi * o[k] for wi, o in zip(w, outs)) + h[k].mean(0) for k in theta}
    return theta, h


def _sim(data, lamb=LAMB, rho=RHO, alpha=1.0, clip=10.0, weighting="uniform", **kw):
    local = fl.fedspeed_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, lamb=lamb, rho=rho, alpha=alpha,
                                     clip_norm=clip, shuffle=False)
    return fl.FederatedSimulator(local, fl.fedspeed(num_clients=len(SIZES), weighting=weighting), fl.SyncRound(3),
                                 num_clients=len(SIZES), num_examples=SIZES, local_steps=STEPS,
                                 client_context=fl.fedspeed_context, **kw, **pb.FAST)


@pytest.mark.parametrize("alpha,clip,weighting", [(1.0, 10.0, "uniform"), (0.5, 0.3, "examples")])
def test_fedspeed_matches_a_numpy_replay(problem, alpha, clip, weighting):
    clients, data = problem
    sim = _sim(data, alpha=alpha, clip=clip, weighting=weighting)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, seed=3), 4)
    theta, h = _replay(rec, params0, clients, LAMB, RHO, alpha, clip, weighting)
    assert np.abs(h["w"]).sum() > 0
    pb.assert_close(state.params, theta, tol=1e-4)
    pb.assert_close({k: v for k, v in fl.fedspeed_context(state.rule_state).items()}, h, tol=1e-4)


def test_client_identities(problem):
    """rho = 0, no clip: lamb = 0 is FedAvg's client; with h = 0, lamb = mu is FedProx's client."""
    clients, data = problem
    params0 = pb.init_params()
    zeros = jax.tree.map(lambda p: np.zeros((len(SIZES),) + p.shape, np.float32), params0)
    key = np.array([0, 3], np.uint32)
    for mu in (0.0, 0.4):
        speed = jax.jit(fl.fedspeed_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, lamb=mu, rho=0.0,
                                                 clip_norm=None))
        prox = jax.jit(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, prox_mu=mu))
        a, aux = speed(params0, 2, 5, key, zeros)
        assert aux == {}
        b = prox(params0, 2, 5, key)
        # lamb (x - x_t) is added as lamb x - lamb x_t here and as mu (x - x_t) in FedProx: same up to rounding
        pb.assert_close(a, pb.to_np(b), tol=1e-6 if mu else 0)


def test_zero_correction_server_is_fedavg_uniform(problem):
    """Round one (h = 0 before it): x_1 = mean x_iK + mean_N h, with h_i = x_iK - x_0 for the round's clients."""
    _, data = problem
    sim = _sim(data, lamb=0.0, rho=0.0, clip=None)
    params0 = pb.init_params()
    state, rec = sim.run(sim.init(params0, seed=0), 1)
    ref = fl.FederatedSimulator(fl.make_local_update(pb.loss_fn, data, optax.sgd(pb.LR), BATCH, shuffle=False),
                                fl.fedavg(weighting="uniform"), fl.SyncRound(3), num_clients=len(SIZES),
                                local_steps=STEPS, **pb.FAST)
    st, _ = ref.run(ref.init(params0, seed=0), 1)
    h = fl.fedspeed_context(state.rule_state)
    extra = {k: np.asarray(h[k]).mean(0) for k in h}
    pb.assert_close(state.params, {k: np.asarray(st.params[k], np.float64) + extra[k] for k in extra}, tol=1e-6)


def test_bad_arguments(problem):
    _, data = problem
    for kw, msg in [({"lamb": -1.0}, "lamb"), ({"rho": -0.1}, "rho"), ({"alpha": 1.5}, "alpha"),
                    ({"clip_norm": 0.0}, "clip_norm")]:
        with pytest.raises(ValueError, match=msg):
            fl.fedspeed_local_update(pb.loss_fn, data, optax.sgd(0.1), 2, **kw)
    with pytest.raises(ValueError, match="weighting"):
        fl.fedspeed(num_clients=3, weighting="nope")
    with pytest.raises(ValueError, match="FedSpeedState"):
        fl.fedspeed_context(fl.fedavg().init(pb.init_params()))


def test_rule_ignores_masked_lanes_and_injects_its_learning_rate():
    """The server step on stacked pseudo-gradients: a masked lane (garbage) touches neither the mean nor
    the table; under inject_hyperparams the learning rate scales the step."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    theta = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    stacked = {"w": rng.normal(size=(3, 3, 2)).astype(np.float32)}
    stacked["w"][1] = np.nan
    extra = dict(mask=jnp.array([True, False, True]), client_ids=jnp.array([2, 0, 4]),
                 num_examples=jnp.array([1.0, 1.0, 1.0]))
    rule = optax.inject_hyperparams(fl.fedspeed, static_args=("num_clients", "weighting"))(learning_rate=0.5,
                                                                                          num_clients=5)
    upd, st = rule.update(stacked, rule.init(theta), theta, **extra)
    table = np.zeros((5, 3, 2))
    table[2], table[4] = -stacked["w"][0], -stacked["w"][2]
    ref = -0.5 * ((stacked["w"][0] + stacked["w"][2]) / 2 - table.mean(0))
    np.testing.assert_allclose(np.asarray(upd["w"]), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fl.fedspeed_context(st)["w"]), table, rtol=1e-6)
