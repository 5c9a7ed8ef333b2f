"""SSO against a float64 numpy re-implementation of the official inner loop (Armijo on the surrogate)."""

import jax
import jax.numpy as jnp
import inspect

import numpy as np
import pytest

from jaxopt_lab.transforms.sso import scale_by_sso, sso



def _problem(seed=0, n=40, d=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (rng.random(n) < 0.5).astype(np.float64)
    theta = rng.normal(size=d) * 0.3
    return x, y, theta


def _loss_grad_z(z, y):  # mean logistic loss in the logits z
    return (1 / (1 + np.exp(-z)) - y) / z.shape[0]


def _reference(x, y, theta, eta, m, lr0, c=0.1, beta=0.9, max_bt=100, min_step=1e-6, line_search=True, expand=1.0):
    """The official SGD_FMDOpt step with LSOpt inner steps, float64: LSOpt.step starts every search from
    expand_coeff times the stored step size, which reset_lr_on_step sets to lr0 before the first."""
    z0 = x @ theta
    gz = _loss_grad_z(z0, y)
    n = z0.size

    def s(t):
        z = x @ t
        return (gz @ z / eta + np.sum((z - z0) ** 2)) / n

    def ds(t):
        return x.T @ (gz / eta + 2 * (x @ t - z0)) / n

    t, alpha = theta.copy(), lr0
    for k in range(m):
        d = ds(t)
        alpha = (lr0 if k == 0 else alpha) * expand
        if line_search:
            for _ in range(max_bt):
                if s(t - alpha * d) <= s(t) - c * alpha * d @ d:
                    break
                alpha *= beta
                if alpha < min_step:
                    break
        t = t - alpha * d
    return t, alpha


@pytest.mark.parametrize(
    "eta,m,lr0,line_search,expand",
    [(1.0, 5, 10.0, True, 1.0), (0.05, 3, 10.0, True, 1.0), (1.0, 4, 0.5, False, 1.0), (1.0, 4, 0.05, True, 1.8)],
)
def test_one_outer_step_matches_reference(eta, m, lr0, line_search, expand):
    x, y, theta = _problem()
    expected, alpha = _reference(x, y, theta, eta, m, lr0, line_search=line_search, expand=expand)
    xf = jnp.asarray(x, jnp.float32)
    params = {"w": jnp.asarray(theta, jnp.float32)}
    tx = scale_by_sso(eta=eta, m=m, inner_lr=lr0, line_search=line_search, expand=expand)
    z0 = xf @ params["w"]
    gz = jnp.asarray(_loss_grad_z(np.asarray(z0, np.float64), y), jnp.float32)
    step = jax.jit(lambda p, s: tx.update(p, s, p, targets_fn=lambda q: xf @ q["w"], target_grad=gz))
    u, state = step(params, tx.init(params))
    np.testing.assert_allclose(theta - np.asarray(u["w"], np.float64), expected, rtol=1e-4, atol=1e-5)
    assert float(state.step_size) == pytest.approx(alpha, rel=1e-5)


def test_many_fixed_inner_steps_reach_the_target_space_step():
    # f = identity: the surrogate's minimizer is theta_t - dL/dz / (2 eta), SSO's projected target step.
    g = np.array([0.5, -1.0, 2.0])
    params = {"w": jnp.zeros(3)}
    tx = sso(learning_rate=1.0, eta=2.0, m=200, inner_lr=0.5, line_search=False)
    u, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params, targets_fn=lambda p: p, target_grad={"w": jnp.asarray(g)})
    np.testing.assert_allclose(np.asarray(u["w"]), -g / 4.0, rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="eta must be > 0"):
        scale_by_sso(eta=0.0)
    with pytest.raises(ValueError, match="m must be an int >= 1"):
        scale_by_sso(m=0)
    tx = scale_by_sso()
    p = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="targets_fn"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(ValueError, match="complex"):
        tx.init({"w": jnp.zeros(2, jnp.complex64)})


def test_defaults_are_the_official_run_defaults():
    # parser.py of the official repo: --m 5, --c 0.1, --beta_update 0.9; SGD_FMDOpt resets the step to 10
    got = {k: v.default for k, v in inspect.signature(scale_by_sso).parameters.items()}
    assert got["m"] == 5 and got["c"] == 0.1 and got["beta"] == 0.9 and got["inner_lr"] == 10.0
    assert inspect.signature(sso).parameters["m"].default == 5
