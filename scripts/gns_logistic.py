"""Gradient-normalized smoothness (gradient-regularized Newton with approximate Hessians) vs Newton and GD.

    PYTHONPATH=$PWD python scripts/gns_logistic.py [--steps 200]

Problems (float32): a convex one, l2-regularized logistic regression (n=800,
d=20, lambda=1e-3); two non-convex ones, the 10-D extended Rosenbrock function
from (-1.2, 1, ...), and a tanh MLP (8-8-1, d=81) fit to a random smooth target
(a loss with saddles), where the Gauss-Newton product is also passed as
``hvp_fn``. For each method: steps and gradient evaluations (one per step plus
one per search trial) until f - f_best <= tol (f_best: the lowest loss any
method reached), and the final loss. GD uses Armijo backtracking (start 1,
c = 1e-4, halving); Newton is the pure step -H^{-1} g.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxopt_lab.data import logistic_regression
from jaxopt_lab.transforms.gradient_normalized_smoothness import scale_by_gradient_normalized_smoothness


def problems():
    ds = logistic_regression(num_examples=1000, dim=20, seed=0)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train, jnp.float32)

    def logistic(p):
        z = x @ p["w"]
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5e-3 * jnp.sum(p["w"] ** 2)

    def rosenbrock(p):
        v = p["w"]
        return jnp.sum(100.0 * (v[1:] - v[:-1] ** 2) ** 2 + (1.0 - v[:-1]) ** 2)

    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    ys = jnp.sin(xs[:, 0]) + 0.5 * xs[:, 1] * xs[:, 2]

    def net(p, xin):
        return jnp.tanh(xin @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def mlp(p):
        return 0.5 * jnp.mean((net(p, xs)[:, 0] - ys) ** 2)

    def gauss_newton(p, v):  # J^T J v / n for the squared loss
        f = lambda q: net(q, xs)[:, 0]  # noqa: E731
        _, jv = jax.jvp(f, (p,), (v,))
        return jax.vjp(f, p)[1](jv / xs.shape[0])[0]

    mlp_p = {"w1": jnp.asarray(rng.normal(size=(8, 8)) * 0.5, jnp.float32), "b1": jnp.zeros(8),
             "w2": jnp.asarray(rng.normal(size=(8, 1)) * 0.5, jnp.float32), "b2": jnp.zeros(1)}
    start_r = jnp.asarray(np.where(np.arange(10) % 2 == 0, -1.2, 1.0), jnp.float32)
    return [
        ("logistic (convex)", logistic, {"w": jnp.zeros(20)}, None, 1e-6),
        ("Rosenbrock 10-D", rosenbrock, {"w": start_r}, None, 1e-6),
        ("tanh MLP (d=81)", mlp, mlp_p, gauss_newton, 1e-5),
    ]


def run_gns(loss, p0, steps, hvp_fn=None, **kw):
    tx = scale_by_gradient_normalized_smoothness(**kw)
    extra = {} if hvp_fn is None else {"hvp_fn": hvp_fn}

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p, loss_fn=loss, **extra)
        return jax.tree.map(lambda a, b: a - b, p, u), s, loss(p)

    p, s = p0, tx.init(p0)
    losses, evals = [], []
    for _ in range(steps):
        p, s, _ = step(p, s)
        losses.append(float(loss(p)))
        evals.append(len(losses) + int(s.trials))
    return losses, evals


def run_newton(loss, p0, steps):
    flat0, unravel = ravel_pytree(p0)
    f = lambda v: loss(unravel(v))  # noqa: E731
    step = jax.jit(lambda v: v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v)))
    v, losses = flat0, []
    for _ in range(steps):
        v = step(v)
        losses.append(float(f(v)))
    return losses, list(range(1, steps + 1))


def run_gd(loss, p0, steps):
    flat0, unravel = ravel_pytree(p0)
    f = jax.jit(lambda v: loss(unravel(v)))
    g = jax.jit(jax.grad(lambda v: loss(unravel(v))))
    v, losses, evals, n = flat0, [], [], 0
    for _ in range(steps):
        gv, fv, a = g(v), f(v), 1.0
        n += 1
        while f(v - a * gv) > fv - 1e-4 * a * float(gv @ gv) and a > 1e-10:
            a *= 0.5
        v = v - a * gv
        losses.append(float(f(v)))
        evals.append(n)
    return losses, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    t0 = time.time()
    print("| problem | method | steps to f - f_best <= tol | gradient evaluations | final loss |")
    print("|---|---|---|---|---|")
    for name, loss, p0, gn, tol in problems():
        d = ravel_pytree(p0)[0].shape[0]
        methods = {
            "GD + Armijo": lambda: run_gd(loss, p0, args.steps),
            "Newton (pure)": lambda: run_newton(loss, p0, min(args.steps, 50)),
            "GNS dense Hessian": lambda: run_gns(loss, p0, args.steps),
            "GNS low-rank (r=d/4)": lambda: run_gns(loss, p0, args.steps, hessian="lowrank", rank=max(d // 4, 1)),
            "GNS diagonal (Hutchinson, 8)": lambda: run_gns(loss, p0, args.steps, hessian="diagonal"),
            "GNS HVP + CG (10 it)": lambda: run_gns(loss, p0, args.steps, hessian="hvp", cg_iters=10),
        }
        if gn is not None:
            methods["GNS Gauss-Newton + CG (10 it)"] = lambda: run_gns(loss, p0, args.steps, hvp_fn=gn, hessian="hvp",
                                                                       cg_iters=10)
        results = {k: fn() for k, fn in methods.items()}
        finite = [min(l_) for l_, _ in results.values() if np.isfinite(min(l_))]
        best = min(finite)
        for k, (losses, evals) in results.items():
            hit = next((i for i, v in enumerate(losses) if v - best <= tol), None)
            reach = f"{hit + 1}" if hit is not None else f"> {len(losses)}"
            ev = f"{evals[hit]}" if hit is not None else "-"
            print(f"| {name} (tol {tol:g}) | {k} | {reach} | {ev} | {losses[-1]:.6g} |", flush=True)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
