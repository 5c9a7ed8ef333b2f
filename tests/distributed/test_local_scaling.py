"""Local SGD with a synchronized scaling: numpy float64 replays (worker axis and simulator), identities,
the host decision, and no collective on a local step."""

import re

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, communicated_bytes, local_sgd
from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.distributed.local_scaling import local_scaling, scaled_local_update, local_scaling_server
from tests.distributed.federated import problem as fpb
from tests.distributed.problem import init_params, make_step, run, worker_data

W, H, STEPS, LR = 4, 3, 7, 0.05
RUNNER = WorkerRunner(W)


def _np_grads(p, x, y):
    r = x @ p["w"] + p["b"] - y
    return {"w": x.T @ r / len(y), "b": np.asarray(r.mean())}


def _np_hdiag(x):  # the exact Hessian diagonal of 0.5 mean((x w + b - y)^2), used as the supplied estimate
    return {"w": (x ** 2).mean(0), "b": np.asarray(1.0)}


def _np_replay(scaling, beta, alpha, steps, supplied=False):
    x, y = worker_data(W)
    x, y = x.astype(np.float64), y.astype(np.float64)
    p0 = {k: np.asarray(v, np.float64) for k, v in init_params().items()}
    ps = [dict(p0) for _ in range(W)]
    v = {k: np.zeros_like(a) for k, a in p0.items()}
    count = 0
    for t in range(steps):
        since = t % H
        gs = [_np_grads(ps[w], x[w], y[w]) for w in range(W)]
        if since == 0 and scaling != "identity":
            if scaling == "oasis":
                hs = [_np_hdiag(x[w]) for w in range(W)]
                stat = {k: np.mean([h[k] for h in hs], 0) for k in v}
            else:
                stat = {k: np.mean([g[k] for g in gs], 0) ** 2 for k in v}
            if scaling == "adam" or count > 0:
                v = {k: beta * v[k] + (1 - beta) * stat[k] for k in v}
            else:
                v = stat
            count += 1
        if scaling == "identity":
            d = {k: np.ones_like(a) for k, a in v.items()}
        elif scaling == "adam":
            d = {k: np.sqrt(a / (1 - beta ** count)) for k, a in v.items()}
        elif scaling == "rmsprop":
            d = {k: np.sqrt(a) for k, a in v.items()}
        else:
            d = {k: np.abs(a) for k, a in v.items()}
        d = {k: np.maximum(alpha, a) for k, a in d.items()}
        ps = [{k: ps[w][k] - LR * gs[w][k] / d[k] for k in v} for w in range(W)]
        if since + 1 == H:
            mean = {k: np.mean([p[k] for p in ps], 0) for k in v}
            ps = [dict(mean) for _ in range(W)]
    return ps


def _run_oasis(tx, steps):
    x, y = worker_data(W)
    hd = jax.vmap(lambda xw: {"w": (xw ** 2).mean(0), "b": np.float32(1.0)})(x)
    params = RUNNER.replicate(init_params())
    state = RUNNER.replicate(jax.tree.map(np.asarray, tx.init(init_params())))
    params, state, x, y, hd = RUNNER.put((params, state, x, y, hd))

    def step(p, s, xw, yw, h):
        from tests.distributed.problem import loss
        g = jax.grad(loss)(p, xw, yw)
        u, s = tx.update(g, s, p, hessian_diag=h)
        return optax.apply_updates(p, u), s

    f = RUNNER.map(step)
    for _ in range(steps):
        params, state = f(params, state, x, y, hd)
    return RUNNER.get((params, state))


@pytest.mark.parametrize("scaling,beta,alpha", [("adam", 0.9, 1e-8), ("rmsprop", 0.5, 1e-3), ("oasis", 0.7, 0.05)])
def test_matches_a_numpy_replay(scaling, beta, alpha):
    tx = local_scaling(LR, scaling, sync_every=H, beta=beta, alpha=alpha)
    if scaling == "oasis":
        params, state = _run_oasis(tx, STEPS)
    else:
        params, state = run(RUNNER, tx, STEPS, W)
    ref = _np_replay(scaling, beta, alpha, STEPS)
    for w in range(W):
        for k in ref[w]:
            np.testing.assert_allclose(np.asarray(params[k][w], np.float64), ref[w][k], rtol=2e-5, atol=2e-6)
    assert np.ptp(params["w"], axis=0).max() > 1e-4  # 7 = 2 rounds + 1: workers differ, the check is not vacuous
    # bytes per worker: 3 gradient refreshes and 2 averagings of 6 float32
    np.testing.assert_array_equal(communicated_bytes(state), [(3 + 2) * 24] * W)


def test_identity_scaling_is_local_sgd_exactly():
    a, _ = run(RUNNER, local_scaling(LR, "identity", sync_every=H), STEPS, W)
    b, _ = run(RUNNER, local_sgd(optax.sgd(LR), sync_every=H), STEPS, W)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-7, atol=1e-7)


def test_host_decision_equals_the_in_graph_one_and_local_steps_have_no_collective():
    tx = local_scaling(LR, "adam", sync_every=H, beta=0.9)
    x, y = worker_data(W)
    args = RUNNER.put((RUNNER.replicate(init_params()), RUNNER.replicate(jax.tree.map(np.asarray, tx.init(init_params()))),
                       x, y))
    old, new = RUNNER.map(make_step(tx)), RUNNER.map_sync(lambda *a, sync: make_step(tx, sync=sync)(*a))
    a = b = args[:2]
    seen = []
    for _ in range(STEPS):
        seen.append(new.decisions(*b)["sync"])
        a, b = old(*a, *args[2:]), new(*b, *args[2:])
    assert seen == [0, -1, 0, 0, -1, 0, 0]  # refresh at a round's first step, average at its last
    for u, v in zip(jax.tree.leaves(RUNNER.get(a)), jax.tree.leaves(RUNNER.get(b))):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    sharded = WorkerRunner(W, mode="shard_map", devices=jax.devices()[:W])
    tx = local_scaling(LR, "adam", sync_every=H, axis_name=sharded.axis_name)
    start = sharded.put((sharded.replicate(init_params()),
                         sharded.replicate(jax.tree.map(np.asarray, tx.init(init_params()))), x, y))
    collective = re.compile(r"\b(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)")
    text = sharded.map(make_step(tx, sync=False)).lower(*start).compile().as_text()
    assert not collective.findall(text)


# ------------------------------------------------------------------ simulator form

SIZES = [3, 5, 7, 4]
BATCH, LSTEPS = 2, 3


def test_simulator_form_matches_a_numpy_replay():
    clients, data, _, _ = fpb.make_clients(SIZES, seed=4)
    beta, alpha, lr = 0.8, 1e-3, 0.1
    rule, context = local_scaling_server("rmsprop", beta, alpha)
    local = scaled_local_update(fpb.loss_fn, data, lr, BATCH, scaling="rmsprop", shuffle=False)
    sim = fl.FederatedSimulator(local, rule, fl.SyncRound(3), num_clients=len(SIZES), num_examples=SIZES,
                                local_steps=LSTEPS, client_context=context, **fpb.FAST)
    params0 = fpb.init_params()
    state, rec = sim.run(sim.init(params0, seed=2), 3)
    theta = fpb.to_np(params0)
    v, count = None, 0
    for i in range(3):
        cids = np.asarray(rec.client[i])[np.asarray(rec.mask[i])]
        d = {k: np.ones_like(a) for k, a in theta.items()} if count == 0 else \
            {k: np.maximum(alpha, np.sqrt(a)) for k, a in v.items()}
        outs, stats = [], []
        for c in cids:
            x, y = clients[int(c)]
            stats.append(fpb.np_grad(theta, x[:BATCH], y[:BATCH]))
            p = dict(theta)
            for s in range(LSTEPS):
                b = s % -(-len(y) // BATCH)
                g = fpb.np_grad(p, x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH])
                p = {k: p[k] - lr * g[k] / d[k] for k in p}
            outs.append(p)
        w = np.array([SIZES[c] for c in cids], float)
        w /= w.sum()
        stat = {k: sum(wi * s[k] for wi, s in zip(w, stats)) ** 2 for k in theta}
        v = stat if count == 0 else {k: beta * v[k] + (1 - beta) * stat[k] for k in v}
        count += 1
        theta = {k: sum(wi * o[k] for wi, o in zip(w, outs)) for k in theta}
    fpb.assert_close(state.params, theta, tol=1e-4)


def test_bad_arguments():
    for kw, msg in [({"scaling": "adagrad"}, "scaling"), ({"beta": 1.0}, "beta"), ({"alpha": 0.0}, "alpha"),
                    ({"sync_every": 0}, "sync_every")]:
        with pytest.raises(ValueError, match=msg):
            local_scaling(0.1, **kw)
    tx = local_scaling(0.1, "oasis")
    with pytest.raises(ValueError, match="hessian_diag"):
        tx.update(init_params(), tx.init(init_params()), init_params())


@pytest.mark.slow  # ~15 s of compiles on the shared CPU: keeps the file under 40 s
def test_inject_hyperparams_and_dtypes():
    """The battery's checks that apply to a worker-axis transform: the injected learning rate drives the
    step (same result as the plain factory), and bfloat16 parameters keep their dtype."""
    plain = run(RUNNER, local_scaling(LR, "rmsprop", sync_every=H, beta=0.5), 4, W)[0]
    inj = optax.inject_hyperparams(local_scaling, static_args=("scaling", "sync_every", "axis_name"))(
        learning_rate=LR, scaling="rmsprop", sync_every=H, beta=0.5)
    got = run(RUNNER, inj, 4, W)[0]
    for k in plain:
        np.testing.assert_allclose(got[k], plain[k], rtol=1e-6, atol=1e-7)
    tx = local_scaling(LR, "adam", sync_every=2)
    p = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), init_params())
    f = jax.vmap(lambda p, s, g: tx.update(g, s, p), axis_name="workers")
    ps = jax.tree.map(lambda x: np.stack([x] * 2), p)
    upd, st = f(ps, jax.vmap(tx.init)(ps), ps)
    assert all(u.dtype == jax.numpy.bfloat16 for u in jax.tree.leaves(upd))
    assert all(v.dtype == jax.numpy.bfloat16 for v in jax.tree.leaves(st.v))
