"""FedBR's client against an independent numpy float64 replay (finite-difference gradients of the
official losses); its identity (mu = lam = decorr = 0 is FedAvg's client); both simulator forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import federated as fl
from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated import fedbr as fedbr_mod
from tests.distributed.federated import problem as pb

SIZES = [3, 5]
BATCH, STEPS, HIDDEN, P = 2, 3, 3, 3
LR = 0.3


def features(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"])


def head(p, z):
    return z @ p["w2"] + p["b2"]


def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(head(p, features(p, x)), y)


@pytest.fixture(scope="module")
def problem():
    clients, data, x, _ = pb.make_clients(SIZES, seed=7)
    rng = np.random.default_rng(3)
    model = {"w1": jnp.asarray(rng.normal(size=(pb.D, HIDDEN)), jnp.float32),
             "b1": jnp.asarray(0.1 * rng.normal(size=HIDDEN), jnp.float32),
             "w2": jnp.asarray(rng.normal(size=(HIDDEN, pb.K)), jnp.float32),
             "b2": jnp.zeros((pb.K,), jnp.float32)}
    params = fl.fedbr_init(model, HIDDEN, jax.random.key(0))
    pseudo = fl.fedbr_pseudo_data(x.astype(np.float32), num=P, per_sample=4, seed=1)
    return clients, data, params, pseudo


# ---- the numpy float64 reference ------------------------------------------------------------

def np_features(p, x):
    return np.tanh(x @ p["w1"] + p["b1"])


def np_head(p, z):
    return z @ p["w2"] + p["b2"]


def np_log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def np_disc(d, z):
    for i, layer in enumerate(d):
        z = z @ layer["w"] + layer["b"]
        if i < len(d) - 1:
            z = np.maximum(z, 0.0)
    return z


def np_cos(a, b):
    return (a * b).sum(-1) / (np.maximum(np.linalg.norm(a, axis=-1), 1e-8) * np.maximum(np.linalg.norm(b, axis=-1), 1e-8))


def np_log_ratio(eu, eg, es, tau1, tau2):  # log(exp(t1 s12) / (exp(t1 s12) + exp(t2 s13)))
    a, b = tau1 * np_cos(eu, eg), tau2 * np_cos(eu, es)
    return np.log(np.exp(a) / (np.exp(a) + np.exp(b)))


def np_decorr(z):  # FedDecorr (official feddecorr_loss): torch's std is unbiased
    n = len(z)
    std = z.std(0, ddof=1) if n > 1 else np.zeros(z.shape[1])
    zn = (z - z.mean(0)) / (std + 1e-4)
    return np.mean((zn.T @ zn / n) ** 2)


def fd_grad(f, tree, eps=1e-6):
    """Central finite differences of f over every entry of a list/dict tree of float64 arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    grads = []
    for i, leaf in enumerate(leaves):
        g = np.zeros_like(leaf)
        for j in np.ndindex(leaf.shape):
            up = [a.copy() for a in leaves]
            dn = [a.copy() for a in leaves]
            up[i][j] += eps
            dn[i][j] -= eps
            g[j] = (f(jax.tree.unflatten(treedef, up)) - f(jax.tree.unflatten(treedef, dn))) / (2 * eps)
        grads.append(g)
    return jax.tree.unflatten(treedef, grads)


def np_client(model, disc, x, y, pseudo, draws, mu, lam, gamma, tau1, tau2, decorr, refresh):
    """The official FedBR update (algorithms.py), minibatches in order, plain SGD for both nets."""
    model0 = {k: v.copy() for k, v in model.items()}
    per_pass = max(-(-len(y) // BATCH), 1)
    c = pb.K
    zg0 = None
    for s in range(STEPS):
        b = s % per_pass
        xb, yb = x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH]
        r = np.minimum((draws[s] * len(yb)).astype(int), len(yb) - 1)
        u = (pseudo + xb[r]) / 2                                  # get_unlabeled_by_self, K = 1
        q = (np.full((P, c), 1.0 / c) + np.eye(c)[yb[r]]) / 2
        if zg0 is None:
            zg0 = np_features(model0, u)                          # all_global_unlabeled_z (first step)
        zg = np_features(model0, u) if refresh else zg0
        neg = np.arange(P) % len(yb)
        if mu:
            zu, zs = np_features(model, u), np_features(model, xb)[neg]
            dloss = lambda d: gamma * np.mean(np_log_ratio(np_disc(d, zu), np_disc(d, zg), np_disc(d, zs), tau1, tau2))
            gd = fd_grad(dloss, disc)
            disc = jax.tree.map(lambda w, g: w - LR * g, disc, gd)

        def gloss(m):
            zs = np_features(m, xb)
            loss = -np.mean(np_log_softmax(np_head(m, zs))[np.arange(len(yb)), yb])
            zu = np_features(m, u)
            if mu:
                lr_ = np_log_ratio(np_disc(disc, zu), np_disc(disc, zg), np_disc(disc, zs[neg]), tau1, tau2)
                loss += mu * -np.mean(lr_)
            if lam:
                loss += lam * -np.mean((np_log_softmax(np_head(m, zu)) * q).sum(-1))
            if decorr:
                loss += decorr * np_decorr(zs)
            return loss

        g = fd_grad(gloss, model)
        model = {k: model[k] - LR * g[k] for k in model}
    return model, disc


def _draws(key):
    kd = jax.random.key_data(key)
    return [np.asarray(_rng.uniform(kd, fedbr_mod._MIX_TAG, s, size=P), np.float64) for s in range(STEPS)]


@pytest.mark.parametrize("cid,kw", [
    (1, dict()),                                                             # official coefficients
    (0, dict(mu=1.3, lam=0.4, gamma=0.7, tau1=1.5, tau2=3.0, decorr=0.2, refresh_global_features=True)),
    (1, dict(mu=0.0, lam=1.0, decorr=0.0)),                                  # output balancing alone
])
def test_fedbr_client_matches_numpy_replay(problem, cid, kw):
    clients, data, params, pseudo = problem
    local = fl.fedbr_local_update(features, head, data, optax.sgd(LR), BATCH, pseudo, num_classes=pb.K,
                                  shuffle=False, **kw)
    key = jax.random.key(11)
    out = jax.jit(local)(params, jnp.int32(cid), jnp.int32(STEPS), key)
    opts = dict(mu=0.5, lam=1.0, gamma=1.0, tau1=2.0, tau2=2.0, decorr=0.1, refresh_global_features=False)
    opts.update(kw)
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
    x, y = clients[cid]
    model, disc = np_client(f64(params["model"]), f64(params["discriminator"]["layers"]), x, y,
                            np.asarray(pseudo, np.float64), _draws(key), opts["mu"], opts["lam"], opts["gamma"],
                            opts["tau1"], opts["tau2"], opts["decorr"], opts["refresh_global_features"])
    moved = max(float(np.abs(model[k] - np.asarray(params["model"][k])).max()) for k in model)
    assert moved > 1e-3
    for k in model:
        np.testing.assert_allclose(np.asarray(out["model"][k]), model[k], atol=2e-5, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(out["discriminator"]["layers"]), jax.tree.leaves(disc)):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-5, rtol=1e-4)
    if opts["mu"] == 0:  # no discriminator step without the alignment term
        for a, b in zip(jax.tree.leaves(out["discriminator"]), jax.tree.leaves(params["discriminator"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_coefficients_are_fedavgs_client(problem):
    _, data, params, pseudo = problem
    opt = optax.sgd(LR, momentum=0.9)
    local = fl.fedbr_local_update(features, head, data, opt, BATCH, pseudo, num_classes=pb.K, mu=0.0, lam=0.0,
                                  decorr=0.0)
    plain = fl.make_local_update(loss_fn, data, opt, BATCH)
    key = jax.random.key(4)
    for cid in range(len(SIZES)):
        out = jax.jit(local)(params, jnp.int32(cid), jnp.int32(5), key)
        ref = jax.jit(plain)(params["model"], jnp.int32(cid), jnp.int32(5), key)
        for k in ref:
            np.testing.assert_array_equal(np.asarray(out["model"][k]), np.asarray(ref[k]))
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), out["discriminator"],
                                         params["discriminator"]))


def test_bad_values_are_errors(problem):
    _, data, params, pseudo = problem
    for bad, match in [(dict(mu=-1.0), "mu"), (dict(tau1=0.0), "tau1"), (dict(num_classes=1), "num_classes")]:
        kw = dict(num_classes=pb.K) | bad
        with pytest.raises(ValueError, match=match):
            fl.fedbr_local_update(features, head, data, optax.sgd(LR), BATCH, pseudo, **kw)
    with pytest.raises(ValueError, match="pseudo_data"):
        fl.fedbr_local_update(features, head, data, optax.sgd(LR), BATCH, pseudo[:, :2], num_classes=pb.K)


def test_server_form_equals_params_form(problem):
    """fedbr_server (discriminator in the rule state) == FedAvg over {"model", "discriminator"} params."""
    _, data, params, pseudo = problem
    local = fl.fedbr_local_update(features, head, data, optax.sgd(LR), BATCH, pseudo, num_classes=pb.K)
    common = dict(num_clients=2, num_examples=SIZES, local_steps=STEPS, **pb.FAST)
    a = fl.FederatedSimulator(local, fl.fedavg(1.0, weighting="uniform"), fl.SyncRound(2), **common)
    rule, context = fl.fedbr_server(params["discriminator"])
    b = fl.FederatedSimulator(fl.fedbr_context_client(local), rule, fl.SyncRound(2), client_context=context, **common)
    sa, _ = a.run(a.init(params, seed=2), 2)
    sb, _ = b.run(b.init(params["model"], seed=2), 2)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(sa.params))
    assert not np.allclose(np.asarray(sa.params["discriminator"]["layers"][0]["w"]),
                           np.asarray(params["discriminator"]["layers"][0]["w"]))  # D is federated too
    got = {"model": sb.params, "discriminator": fl.fedbr_context(sb.rule_state)}
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(sa.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
