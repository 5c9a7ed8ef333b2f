"""Entropy-SGD against float64 replays of the authors' code and of Algorithm 1 (Chaudhari et al. 2017)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.transforms.entropy_sgd import (
    EntropySGDState,
    entropy_sgd,
    scale_by_entropy_sgd,
)

# Tiny programs run a few times: LLVM's optimizations cost more than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# A quadratic whose minibatch k has its own target: f_k(x) = 1/2 (x - c_k)^T A (x - c_k).
_RNG = np.random.default_rng(0)
_B = _RNG.normal(size=(4, 4))
A = _B @ _B.T / 4 + np.eye(4)
C = _RNG.normal(size=(8, 4))  # one target per inner step k
X0 = _RNG.normal(size=(4,))
HP = dict(inner_steps=4, inner_lr=0.2, gamma=0.5, gamma_growth=0.1)  # alpha, scale_by_gamma: the defaults
PAPER = dict(alpha=0.75, scale_by_gamma=True)  # Algorithm 1 as written (opt-in)


def grad_k(x, k):
    return A @ (x - C[k])


def jax_grad_fn(p, k):
    return {"x": (jnp.asarray(A, jnp.float32) @ (p["x"] - jnp.asarray(C, jnp.float32)[k])).astype(p["x"].dtype)}


def numpy_entropy_sgd(x, steps, learning_rate, momentum, nesterov, inner_steps, inner_lr, gamma, gamma_growth,
                      alpha=0.25, scale_by_gamma=False, noise=0.0, xis=None, weight_decay=0.0):
    """The documented update of ``entropy_sgd``, float64, parameters after each outer step.

    Langevin loop (the official code's, ``ucla-vision/entropy-sgd``, python/optim.py):
    ``d = grad + wd w; v = mom v + d; d = d + mom v (Nesterov) or v;
    dw = d - g (wc - w) + eps / sqrt(0.5 lr) * xi;  w -= lr * dw`` with v zeroed every outer
    step, ``xis[t][k]`` the standard normal draw of outer step t, inner step k; alpha is the
    newest iterate's weight in mu. Outer: ``d = u + wd x; m = mom m + d`` with m started at the
    first minibatch gradient. ``alpha=0.75, scale_by_gamma=True`` is Algorithm 1's gamma (x - mu).
    """
    x = x.astype(np.float64)
    m = grad_k(x, 0)
    out = []
    for t in range(steps):
        g_t = gamma * (1 + gamma_growth) ** t
        xp, mu, v = x.copy(), x.copy(), np.zeros_like(x)
        for k in range(inner_steps):
            d = grad_k(xp, k) + weight_decay * xp
            v = momentum * v + d
            d = d + momentum * v if nesterov else v
            dw = d - g_t * (x - xp)
            if noise:
                dw = dw + noise / np.sqrt(0.5 * inner_lr) * xis[t][k]
            xp = xp - inner_lr * dw
            mu = (1 - alpha) * mu + alpha * xp
        u = g_t * (x - mu) if scale_by_gamma else x - mu
        d = u + weight_decay * x
        m = momentum * m + d
        x = x - learning_rate * (d + momentum * m if nesterov else m)
        out.append(x)
    return np.stack(out)


def official_step_replay(x, steps, lr, L, g0, g1, llr, mom, wd, eps=0.0, xis=None):
    """A float64 transcription of ``EntropySGD.step`` (ucla-vision/entropy-sgd, python/optim.py), line by
    line, with its train.py's ``nesterov=True`` and ``damp=0``, its ``lp['lr']`` = ``llr`` and its
    fixed ``beta1 = 0.75``. Its ``closure()`` before the loop (the gradient at wc, which also starts the
    outer buffer ``state['mdw']`` on the first call) and its inner step k draw minibatches; here
    minibatch k of outer step t is ``C[k]``, as the transform's grads/grad_fn.
    Scoping: optim.py never advances ``state['t']``; this follows its README, g = g0 (1 + g1)^t, t = 0, 1, ...
    """
    w = x.astype(np.float64)
    out, state_mdw = [], None
    for t in range(steps):
        w_grad = grad_k(w, 0)  # mf, merr = closure()
        if state_mdw is None:
            state_mdw = w_grad.copy()  # state['mdw'].append(deepcopy(w.grad.data))
        wc, mw, lp_mdw = w.copy(), w.copy(), np.zeros_like(w)
        beta1 = 0.75
        g = g0 * (1 + g1) ** t
        for i in range(L):
            dw = grad_k(w, i)
            if wd > 0:
                dw = dw + wd * w
            if mom > 0:
                lp_mdw = mom * lp_mdw + dw
                dw = dw + mom * lp_mdw
            dw = dw - g * (wc - w)
            if eps:
                dw = dw + eps / np.sqrt(0.5 * llr) * xis[t][i]
            w = w - llr * dw
            mw = beta1 * mw + (1 - beta1) * w
        w = wc.copy()
        dw = w - mw  # w.grad = wc - mw: no gamma
        if wd > 0:
            dw = dw + wd * w
        if mom > 0:
            state_mdw = mom * state_mdw + dw
            dw = dw + mom * state_mdw
        w = w - lr * dw
        out.append(w)
    return np.stack(out)


def runner(tx, steps, grad_fn=jax_grad_fn):
    """A compiled run of ``steps`` outer steps from a given state: parameters after each step."""

    @jit
    def go(p, s):
        def step(carry, _):
            p, s = carry
            u, s = tx.update(grad_fn(p, 0), s, p, grad_fn=grad_fn)
            p = optax.apply_updates(p, u)
            return (p, s), p["x"]

        return jax.lax.scan(step, (p, s), length=steps)[1]

    return lambda state: np.asarray(go({"x": jnp.asarray(X0, jnp.float32)}, state), np.float64)


def run(tx, steps, grad_fn=jax_grad_fn):
    p = {"x": jnp.asarray(X0, jnp.float32)}
    return runner(tx, steps, grad_fn)(tx.init(p))


def test_defaults_match_a_float64_replay_of_the_official_step():
    # Defaults only (alpha, scale_by_gamma, noise scaling, momentum 0.9 Nesterov inside and outside the
    # Langevin loop, the outer buffer started at the first gradient): each old choice is caught.
    lr, L, llr, g0, g1, eps = 0.3, HP["inner_steps"], HP["inner_lr"], HP["gamma"], HP["gamma_growth"], 0.05
    xis = _draws(3, 3, L)
    for wd in (0.0, 0.1):
        got = run(entropy_sgd(lr, weight_decay=wd, noise=eps, seed=3, **HP), 3)
        want = official_step_replay(X0, 3, lr, L, g0, g1, llr, mom=0.9, wd=wd, eps=eps, xis=xis)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for old in (dict(alpha=0.75), dict(scale_by_gamma=True), PAPER):  # each old default alone is caught
        other = numpy_entropy_sgd(X0, 3, lr, 0.9, True, **HP, **old, noise=eps, xis=xis, weight_decay=wd)
        assert np.abs(other - want).max() > 1e-3, old
    # the previous form (no momentum in the Langevin loop, optax.trace's buffer from zero) is caught too
    tx = optax.chain(scale_by_entropy_sgd(noise=eps, seed=3, **HP), optax.trace(0.9, nesterov=True),
                     optax.scale_by_learning_rate(lr))
    assert np.abs(run(tx, 3) - official_step_replay(X0, 3, lr, L, g0, g1, llr, mom=0.9, wd=0.0, eps=eps,
                                                    xis=xis)).max() > 1e-3
    clean = official_step_replay(X0, 3, lr, L, g0, g1, llr, mom=0.0, wd=0.0)
    np.testing.assert_allclose(run(entropy_sgd(lr, momentum=0.0, noise=0.0, **HP), 3), clean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", [{}, PAPER], ids=["official", "paper"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_numpy_without_noise(nesterov, form):
    kw = dict(learning_rate=0.3, momentum=0.5, nesterov=nesterov, weight_decay=0.05, **HP, **form)
    got = run(entropy_sgd(noise=0.0, **kw), 3)
    want = numpy_entropy_sgd(X0, 3, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want[0], X0)


@pytest.mark.parametrize("form", [{}, PAPER], ids=["official", "paper"])
def test_scale_by_returns_local_entropy_direction(form):
    # One outer step of the bare transform: u = x - mu (official) or gamma (x - mu) (paper), k = 0 from grads.
    tx = scale_by_entropy_sgd(noise=0.0, **HP, **form)
    p = {"x": jnp.asarray(X0, jnp.float32)}
    u, state = jit(lambda p, s: tx.update(jax_grad_fn(p, 0), s, p, grad_fn=jax_grad_fn))(p, tx.init(p))
    want = X0 - numpy_entropy_sgd(X0, 1, learning_rate=1.0, momentum=0.0, nesterov=False, **HP, **form)[0]
    np.testing.assert_allclose(np.asarray(u["x"]), want, rtol=1e-5, atol=1e-6)
    assert isinstance(state, EntropySGDState) and int(state.count) == 1


def test_paper_form_is_gamma_times_the_official_direction_with_the_same_mu():
    # scale_by_gamma only rescales: gamma_0 (x - mu) at step 0, same alpha
    p = {"x": jnp.asarray(X0, jnp.float32)}
    us = []
    for scaled in (False, True):
        tx = scale_by_entropy_sgd(noise=0.0, scale_by_gamma=scaled, **HP)
        us.append(np.asarray(jit(lambda p, s: tx.update(jax_grad_fn(p, 0), s, p, grad_fn=jax_grad_fn))(
            p, tx.init(p))[0]["x"], np.float64))
    np.testing.assert_allclose(us[1], HP["gamma"] * us[0], rtol=1e-6, atol=1e-7)


def test_noise_is_deterministic_per_seed_and_differs_across_seeds():
    # The seed enters through init only, so one compiled run serves every seed.
    kw = dict(learning_rate=0.3, noise=0.1, **HP)
    go = runner(entropy_sgd(**kw), 3)
    p = {"x": jnp.asarray(X0, jnp.float32)}
    a, b, c = (go(entropy_sgd(seed=s, **kw).init(p)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    clean = numpy_entropy_sgd(X0, 3, momentum=0.9, nesterov=True, **{k: v for k, v in kw.items() if k != "noise"})
    assert not np.allclose(a, clean, atol=1e-4)  # the noise is there
    np.testing.assert_allclose(a, clean, atol=0.5)  # and of the size sqrt(2 inner_lr) * noise


def _draws(seed, steps, inner_steps):
    """The transform's standard normal draws (one leaf of shape (4,)), in the order it uses them."""
    key, out = jax.random.PRNGKey(seed), []
    for _ in range(steps):
        key, step_key = jax.random.split(key)
        out.append([np.asarray(jax.random.normal(jax.random.split(jax.random.fold_in(step_key, k), 1)[0], (4,)),
                               np.float64) for k in range(inner_steps)])
    return out


def test_langevin_noise_matches_the_official_code():
    # sqrt(2 lr) * eps * xi on x' (the official eps / sqrt(lr / 2) on the gradient), not Algorithm 1's sqrt(lr)
    kw = dict(learning_rate=0.3, momentum=0.5, nesterov=True, noise=0.05, **HP)
    got = run(entropy_sgd(seed=3, **kw), 3)
    want = numpy_entropy_sgd(X0, 3, xis=_draws(3, 3, HP["inner_steps"]), **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    paper = numpy_entropy_sgd(X0, 3, xis=_draws(3, 3, HP["inner_steps"]), **{**kw, "noise": 0.05 / np.sqrt(2)})
    assert np.abs(paper - want).max() > 1e-3  # sqrt(lr) eps would be caught


def test_reduces_a_quadratic():
    # One minibatch (k ignored): f(x) = 1/2 (x - c)^T A (x - c), minimum 0.
    def grad_fn(p, k):
        return jax_grad_fn(p, 0)

    xs = run(entropy_sgd(0.5, inner_steps=5, inner_lr=0.2, gamma=1.0, noise=1e-3), 60, grad_fn=grad_fn)
    loss = lambda x: 0.5 * (x - C[0]) @ A @ (x - C[0])
    assert loss(xs[-1]) < 1e-3 * loss(X0)


def test_keeps_dtypes_and_works_with_a_tree():
    tx = entropy_sgd(0.1, inner_steps=3)
    p = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
    g = jax.tree.map(jnp.ones_like, p)
    u, _ = jit(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q, k: q))(g, tx.init(p), p)
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, p)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(inner_steps=0), "inner_steps"),
        (dict(inner_steps=2.0), "inner_steps"),
        (dict(inner_lr=0.0), "inner_lr"),
        (dict(gamma=-1.0), "gamma"),
        (dict(gamma_growth=-0.1), "gamma_growth"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(noise=-1e-4), "noise"),
        (dict(seed=1.5), "seed"),
        (dict(scale_by_gamma=1), "scale_by_gamma"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(nesterov=1), "nesterov"),
        (dict(learning_rate=-0.1), "learning_rate"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    kw = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name) as info:
        entropy_sgd(**kw)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_missing_grad_fn_or_params_raises():
    tx = entropy_sgd(0.1)
    p = {"x": jnp.zeros(4)}
    with pytest.raises(ValueError, match="needs grad_fn"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p), grad_fn=jax_grad_fn)
    one = entropy_sgd(0.1, inner_steps=1)  # the first inner gradient is grads: no grad_fn needed
    one.update(p, one.init(p), p)
