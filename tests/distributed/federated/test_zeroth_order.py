"""FedZO and FZooS (zeroth-order federated clients) against numpy float64 replays, identities and query counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated.fzoos import _S_INIT
from jaxopt_lab.distributed.federated.simulator import _TAG_TRAIN
from tests.distributed.federated import problem as pb

SIZES = [4, 6, 5, 3]
LR = 0.3


@pytest.fixture(scope="module")
def problem():
    clients, data, _, _ = pb.make_clients(SIZES, seed=7)
    return clients, data, fl.client_objective(pb.loss_fn, data)


# ---------------------------------------------------------------- numpy float64 reference

def flat(p):  # ravel_pytree's layout: keys sorted, each leaf row-major
    return np.concatenate([np.asarray(p[k], np.float64).ravel() for k in sorted(p)])


def unflat(z):
    return {"b": z[:pb.K], "w": z[pb.K:].reshape(pb.D, pb.K)}


def np_value(z, x, y):
    p = unflat(z)
    logits = x @ p["w"] + p["b"]
    m = logits.max(1, keepdims=True)
    lse = (np.log(np.exp(logits - m).sum(1, keepdims=True)) + m)[:, 0]
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


def np_grad_flat(z, x, y):
    return flat(pb.np_grad(unflat(z), x, y))


def dispatch_key(state_key, dispatch_id):
    return np.asarray(jax.jit(lambda k, d: _rng.key_data(k, _TAG_TRAIN, d))(state_key, np.int32(dispatch_id)))


def np_matern52(r, ell):
    s = np.sqrt(5.0) * r / ell
    return (1 + s + s * s / 3) * np.exp(-s)


def np_dist(a, b):
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))


def np_gp_mean(xs, ys, ell, noise):
    """The posterior-mean function of the min-max normalized GP, in original units."""
    ymin, rng = ys.min(), ys.max() - ys.min()
    alpha = np.linalg.solve(np_matern52(np_dist(xs, xs), ell) + noise * np.eye(len(xs)), (ys - ymin) / rng)
    return lambda z: float(np_matern52(np_dist(z[None], xs), ell)[0] @ alpha * rng + ymin)


def np_fd_grad(fn, z, h=1e-6):
    return np.array([(fn(z + h * e) - fn(z - h * e)) / (2 * h) for e in np.eye(len(z))])


# ---------------------------------------------------------------- FedZO

def test_fedzo_matches_a_numpy_replay_and_counts_queries(problem):
    clients, data, value_fn = problem
    q, mu, steps = 3, 0.05, [2, 3, 1, 2]
    local = fl.fedzo_local_update(value_fn, optax.sgd(LR), q, mu)
    sim = fl.FederatedSimulator(local, fl.fedzo(), fl.SyncRound(3), num_clients=4, local_steps=steps,
                                client_context=fl.fedzo_context, **pb.FAST)
    params0 = pb.init_params()
    state0 = sim.init(params0, seed=4)
    state, rec = sim.run(state0, 3)
    d = len(flat(params0))
    dirs = jax.jit(fl.random_directions, static_argnums=(2, 3))
    theta, expected_queries = flat(params0), 0
    for i in range(3):
        m = np.asarray(rec.mask[i])
        outs = []
        for c, did in zip(np.asarray(rec.client[i])[m], np.asarray(rec.dispatch_id[i])[m]):
            x, y = clients[int(c)]
            kd = dispatch_key(np.asarray(state0.key), did)
            z = theta.copy()
            for s in range(steps[int(c)]):
                u = np.asarray(dirs(kd, s, q, d), np.float64)
                np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-5)
                f0 = np_value(z, x, y)
                g = (d / q) * sum((np_value(z + mu * uj, x, y) - f0) / mu * uj for uj in u)
                z = z - LR * g
            outs.append(z)
            expected_queries += steps[int(c)] * (q + 1)
        theta = np.mean(outs, 0)  # uniform FedAvg
    np.testing.assert_allclose(flat(state.params), theta, rtol=2e-3, atol=2e-4)
    assert int(fl.query_count(state.rule_state)) == expected_queries


def test_fedzo_with_a_full_orthonormal_basis_is_fedavg_with_local_gradient_descent(problem):
    """q = d orthonormal directions: the estimator is the forward-difference gradient along a basis."""
    clients, data, value_fn = problem
    d = len(flat(pb.init_params()))
    local = fl.fedzo_local_update(value_fn, optax.sgd(LR), d, 1e-3, orthogonal=True)
    sim = fl.FederatedSimulator(local, fl.fedzo(weighting="examples"), fl.SyncRound(4), num_clients=4,
                                num_examples=SIZES, local_steps=3, client_context=fl.fedzo_context, **pb.FAST)
    params0 = pb.init_params()
    state, _ = sim.run(sim.init(params0, seed=0), 2)
    theta = pb.to_np(params0)
    for _ in range(2):  # FedAvg whose clients run full-batch gradient descent, float64
        outs = [pb.np_local_sgd(theta, x, y, 3, len(y), lr=LR) for x, y in clients]
        w = np.array(SIZES, float) / sum(SIZES)
        theta = {k: sum(wi * o[k] for wi, o in zip(w, outs)) for k in theta}
    pb.assert_close(state.params, theta, tol=3e-3)


def test_random_directions_are_isotropic():
    draw = jax.jit(fl.random_directions, static_argnums=(2, 3, 4))
    dirs = np.asarray(draw(np.array([1, 2], np.uint32), 0, 4000, 5, False), np.float64)
    np.testing.assert_allclose(5 * dirs.T @ dirs / 4000, np.eye(5), atol=0.12)  # E[d u u^T] = I
    ortho = np.asarray(draw(np.array([1, 2], np.uint32), 3, 4, 6, True), np.float64)
    np.testing.assert_allclose(ortho @ ortho.T, np.eye(4), atol=1e-5)


# ---------------------------------------------------------------- FZooS surrogates

def test_gp_surrogate_gradient_is_the_gradient_of_the_gp_mean():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(12, 4)) * 0.5
    ys = np.sin(xs).sum(1) + 0.1 * (xs**2).sum(1)
    x = rng.normal(size=4) * 0.3
    noise, grid = 1e-2, (0.3, 1.0, 3.0)
    valid = np.r_[np.ones(10, bool), np.zeros(2, bool)]  # the last two rows are padding
    ys_pad = ys.copy()
    ys_pad[10:] = 1e3  # must not matter
    g, ell = jax.jit(fl.gp_surrogate_gradient, static_argnums=(4,))(
        x.astype(np.float32), xs.astype(np.float32), ys_pad.astype(np.float32), valid, grid, noise)

    def lml(e):  # log marginal likelihood of the normalized values (up to a constant)
        yt = (ys[:10] - ys[:10].min()) / np.ptp(ys[:10])
        kmat = np_matern52(np_dist(xs[:10], xs[:10]), e) + noise * np.eye(10)
        return -0.5 * yt @ np.linalg.solve(kmat, yt) - 0.5 * np.linalg.slogdet(kmat)[1]

    best = grid[int(np.argmax([lml(e) for e in grid]))]
    assert float(ell) == pytest.approx(best)
    ref = np_fd_grad(np_gp_mean(xs[:10], ys[:10], best, noise), x)
    np.testing.assert_allclose(np.asarray(g), ref, rtol=2e-3, atol=2e-4)


def test_gradient_uncertainty_is_the_trace_of_the_posterior_gradient_covariance():
    rng = np.random.default_rng(1)
    xs, cands = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    ell, noise = 0.8, 1e-3
    valid = np.r_[np.ones(6, bool), False]
    var = np.asarray(jax.jit(fl.gradient_uncertainty)(cands.astype(np.float32), xs.astype(np.float32), valid, ell, noise))
    x6 = xs[:6]
    kmat = np.exp(-np_dist(x6, x6) ** 2 / (2 * ell**2)) + noise * np.eye(6)
    for c, v in zip(cands, var):
        k = np.exp(-((c - x6) ** 2).sum(1) / (2 * ell**2))
        kgf = -(c[None, :] - x6).T / ell**2 * k[None, :]  # cov(d f(c) / dc_a, f(x_j))
        post = np.eye(3) / ell**2 - kgf @ np.linalg.solve(kmat, kgf.T)
        assert v == pytest.approx(np.trace(post), rel=1e-3, abs=1e-4)


# ---------------------------------------------------------------- FZooS in the simulator

H, M, N_INIT, STEPS, INIT_R, NOISE, ELL, RIDGE = 10, 64, 4, 3, 0.05, 1e-2, 1.0, 1e-4


def _np_rff_features(d):
    g = np.random.default_rng(0)
    return g.standard_normal((d, M)) / 1.0, g.uniform(0.0, 2 * np.pi, M)


def _np_replay_fzoos(rec, state0, params0, clients):
    d = len(flat(params0))
    w, b = _np_rff_features(d)
    phi = lambda z: np.sqrt(2.0 / M) * np.cos(z @ w + b)  # noqa: E731
    rff_grad = lambda z, nu: -np.sqrt(2.0 / M) * (w @ (np.sin(z @ w + b) * nu))  # noqa: E731
    box = jax.jit(lambda kd: _rng.uniform(kd, _S_INIT, size=N_INIT * d))
    hist = {c: [] for c in range(len(SIZES))}
    nus, has = np.zeros((len(SIZES), M)), np.zeros(len(SIZES), bool)
    theta, queries = flat(params0), 0
    for i in range(rec.version.shape[0]):
        m = np.asarray(rec.mask[i])
        nu_bar = nus[has].mean(0) if has.any() else np.zeros(M)
        outs, new = [], {}
        for c, did in zip(np.asarray(rec.client[i])[m], np.asarray(rec.dispatch_id[i])[m]):
            c = int(c)
            x, y = clients[c]
            f = lambda z: np_value(z, x, y)  # noqa: E731,B023
            n0 = len(hist[c])
            if n0 == 0:
                u = np.asarray(box(dispatch_key(np.asarray(state0.key), did)), np.float64).reshape(N_INIT, d)
                hist[c] += [(p, f(p)) for p in theta[None] + INIT_R * (2 * u - 1)]
            hist[c].append((theta, f(theta)))
            win = hist[c][-H:]  # the ring buffer: the last H queries (all of them are "nearest")
            xs, ys = np.array([p for p, _ in win]), np.array([v for _, v in win])
            yr = np.ptp(ys)
            ph = phi(xs)
            gram = ph @ ph.T
            lam = RIDGE * np.trace(gram) / len(xs) + 1e-12
            new[c] = ph.T @ np.linalg.solve(gram + lam * np.eye(len(xs)), (ys - ys.min()) / yr) * yr
            use = has.any() and has[c]
            z = theta.copy()
            for t in range(STEPS):
                win = hist[c][-H:]
                xs, ys = np.array([p for p, _ in win]), np.array([v for _, v in win])
                g = np_fd_grad(np_gp_mean(xs, ys, ELL, NOISE), z)
                if use:
                    g = g + (rff_grad(z, nu_bar) - rff_grad(z, nus[c])) / (t + 1)
                z = z - LR * g
                hist[c].append((z, f(z)))
            queries += len(hist[c]) - n0
            outs.append(z)
        theta = np.mean(outs, 0)
        for c, nu in new.items():
            nus[c], has[c] = nu, True
    return theta, queries, nus, has


@pytest.fixture(scope="module")
def fzoos_run(problem):
    _, _, value_fn = problem
    local = fl.fzoos_local_update(value_fn, optax.sgd(LR), num_features=M, history=H, max_queries=H, lengthscales=ELL,
                                  noise=NOISE, explore=0, init_queries=N_INIT, init_radius=INIT_R, rff_queries=0,
                                  rff_max_queries=H, rff_ridge=RIDGE)
    sim = fl.FederatedSimulator(local, fl.fzoos(num_clients=4, num_features=M, history=H), fl.SyncRound(3),
                                num_clients=4, local_steps=STEPS, client_context=fl.fzoos_context, **pb.FAST)
    params0 = pb.init_params()
    state0 = sim.init(params0, seed=2)
    state, rec = sim.run(state0, 4)
    return state0, state, rec, params0


def test_fzoos_matches_a_numpy_replay(problem, fzoos_run):
    clients = problem[0]
    state0, state, rec, params0 = fzoos_run
    theta, queries, nus, has = _np_replay_fzoos(rec, state0, params0, clients)
    s = state.rule_state[0]
    np.testing.assert_array_equal(np.asarray(s.has_nu), has)
    assert set(np.asarray(rec.client)[np.asarray(rec.mask)].tolist()) == {0, 1, 2, 3}  # every client took part
    np.testing.assert_allclose(np.asarray(s.nu)[has], nus[has], rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(flat(state.params), theta, rtol=2e-3, atol=5e-4)
    assert int(fl.query_count(state.rule_state)) == queries
    assert np.asarray(s.history_n).max() > H  # the ring buffer wrapped


def test_fzoos_counts_every_query(problem):
    _, _, value_fn = problem
    n_init, n_rff, n_exp, steps = 3, 4, 2, [2, 3, 1, 2]
    local = fl.fzoos_local_update(value_fn, optax.adam(0.05), num_features=32, history=40, max_queries=12,
                                  explore=n_exp, explore_candidates=6, init_queries=n_init, rff_queries=n_rff,
                                  rff_candidates=8, rff_max_queries=20)
    sim = fl.FederatedSimulator(local, fl.fzoos(num_clients=4, num_features=32, history=40), fl.SyncRound(2),
                                num_clients=4, local_steps=steps, client_context=fl.fzoos_context, **pb.FAST)
    state, rec = sim.run(sim.init(pb.init_params(), seed=1), 3)
    seen, expected = set(), 0
    per_client = np.zeros(4, int)
    for i in range(3):
        for c in np.asarray(rec.client[i])[np.asarray(rec.mask[i])]:
            c = int(c)
            k = steps[c]
            q = (n_init if c not in seen else 0) + 1 + n_rff + k + n_exp * max(k - 1, 0)
            seen.add(c)
            expected += q
            per_client[c] += q
    assert int(fl.query_count(state.rule_state)) == expected
    np.testing.assert_array_equal(np.asarray(state.rule_state[0].history_n), per_client)


def test_fzoos_mismatched_sizes_and_missing_context_are_clear_errors(problem):
    _, _, value_fn = problem
    local = fl.fzoos_local_update(value_fn, optax.sgd(0.1), num_features=16, history=600)
    sim = fl.FederatedSimulator(local, fl.fzoos(num_clients=4, num_features=32, history=600), fl.SyncRound(2),
                                num_clients=4, client_context=fl.fzoos_context)
    with pytest.raises(ValueError, match="num_features"):
        sim.run(sim.init(pb.init_params()), 1)
    rule = fl.fzoos(num_clients=4, num_features=8, history=4)
    with pytest.raises(ValueError, match="client_aux"):
        rule.update({"w": jnp.zeros((2, 3))}, rule.init({"w": jnp.zeros(3)}), None, mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="history"):
        fl.fzoos_local_update(value_fn, optax.sgd(0.1), history=10)
    with pytest.raises(ValueError, match="smoothing"):
        fl.fedzo_local_update(value_fn, optax.sgd(0.1), 2, 0.0)
