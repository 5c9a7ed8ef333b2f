"""SSO vs gradient descent on synthetic logistic regression: expensive gradients to reach a loss.

    PYTHONPATH=$PWD python scripts/sso_logistic.py

Full batch, a linear model f(theta) = X theta (the targets are the logits).
One "expensive gradient" is one evaluation of dL/dz at the current logits;
SSO then takes m inner steps on its surrogate (each needs only the model
f and its VJP, counted separately as cheap surrogate evaluations). GD takes
one step per gradient, with the step 1/L (L = lambda_max(X^T X) / (4 n)) or
with the Armijo line search SSO uses inside (start 10, c = 0.5, beta = 0.9).
The reference loss L* is from 50 Newton steps (float64).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.data import logistic_regression
from jaxopt_lab.transforms.sso import scale_by_sso

TOL = 1e-4
MAX_GRADS = 2000


def main():
    ds = logistic_regression(num_examples=1000, dim=20, seed=0)
    x64, y64 = ds.x_train.astype(np.float64), ds.y_train.astype(np.float64)
    n, d = x64.shape

    def loss64(w):
        z = x64 @ w
        return np.mean(np.logaddexp(0, z) - y64 * z)

    w = np.zeros(d)  # Newton reference
    for _ in range(50):
        p = 1 / (1 + np.exp(-x64 @ w))
        w -= np.linalg.solve(x64.T @ (x64 * (p * (1 - p))[:, None]) / n, x64.T @ (p - y64) / n)
    f_star = loss64(w)
    target = f_star + TOL
    x, y = jnp.asarray(x64, jnp.float32), jnp.asarray(y64, jnp.float32)

    def loss_z(z):
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    loss_w = lambda w: loss_z(x @ w)  # noqa: E731
    grad_z = jax.jit(jax.grad(loss_z))

    def count_sso(eta, m):
        tx = scale_by_sso(eta=eta, m=m)
        params = {"w": jnp.zeros(d)}
        state = tx.init(params)
        step = jax.jit(lambda p, s, gz: tx.update(p, s, p, targets_fn=lambda q: x @ q["w"], target_grad=gz))
        for k in range(1, MAX_GRADS + 1):
            gz = grad_z(x @ params["w"])
            u, state = step(params, state, gz)
            params = {"w": params["w"] - u["w"]}
            if loss64(np.asarray(params["w"], np.float64)) <= target:
                return k, int(state.backtracks)
        return None, int(state.backtracks)

    def count_gd(armijo):
        lip = np.linalg.eigvalsh(x64.T @ x64)[-1] / (4 * n)
        g_fn = jax.jit(jax.grad(loss_w))
        f_fn = jax.jit(loss_w)
        w, evals = jnp.zeros(d), 0
        for k in range(1, MAX_GRADS + 1):
            g = g_fn(w)
            if armijo:
                a, f0, gg = 10.0, f_fn(w), float(g @ g)
                while f_fn(w - a * g) > f0 - 0.5 * a * gg and a > 1e-6:
                    a *= 0.9
                    evals += 1
            else:
                a = 1 / lip
            w = w - a * g
            if loss64(np.asarray(w, np.float64)) <= target:
                return k, evals
        return None, evals

    t0 = time.time()
    print(f"logistic regression n={n} d={d}; L* = {f_star:.6f} (Newton); gradients to reach L* + {TOL:g}")
    print("| method | m | eta | expensive gradients | line-search evaluations |")
    print("|---|---|---|---|---|")
    for name, armijo in (("GD, step 1/L", False), ("GD + Armijo", True)):
        k, ev = count_gd(armijo)
        print(f"| {name} | 1 | - | {k if k else f'>{MAX_GRADS}'} | {ev} |", flush=True)
    for m in (1, 5, 10, 20):
        for scale in (0.02, 0.125, 0.5):
            eta = scale / n  # eta >= 1/(8n) makes the surrogate an upper bound (the loss's curvature in z is <= 1/(4n))
            k, ev = count_sso(eta, m)
            print(f"| SSO | {m} | {scale:g}/n | {k if k else f'>{MAX_GRADS}'} | {ev} |", flush=True)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
