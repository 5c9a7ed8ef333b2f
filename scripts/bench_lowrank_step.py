"""The low-rank optimizer step alone: jitted update + apply, params and state donated.

    python scripts/bench_lowrank_step.py [--shapes 1024x4096 4096x1024] [--rank 128] [--repeats 15] [--rows REGEX]

For one matrix of each shape (no forward/backward: a fixed random gradient),
times the step of
  * ``optax.adamw`` (the full-rank baseline),
  * ``optax.contrib.galore`` (exact SVD of the larger side's projector),
  * ours: ``jaxopt_lab.galore`` with the default exact refresh (``"svd"``, which
    for d ≤ k takes the eigenvectors of G Gᵀ), with LAPACK's SVD as refresh,
    and with the randomized SVD; ``jaxopt_lab.fira`` (default refresh) as the
    default two passes in XLA, with ``fused=False`` (the residual formed, as
    the official code) and ``fused=True``, and the default on a gradient of
    rank r/2 (where it computes ‖S‖ from the residual),
  * the floor: the two bare projection matmuls ``Pᵀ G`` and ``P N`` of the same
    shapes (what any low-rank step must compute),
on a normal step and on a refresh step separately (a refresh step is timed by
feeding, each time, a fresh copy of a state whose count is due for a refresh).
All variants are timed interleaved, round after round, and the median of each
is reported, so the machine's load hits them alike. Ratios are against the
floor and against ``optax.contrib.galore`` measured in the same run; the
amortized column is (normal·(T−1) + refresh) / T.

LAPACK (the SVD and eigensolver of every refresh, ours and optax's) runs on
one OpenBLAS thread unless OPENBLAS_NUM_THREADS is set: on the shared 2-core
CPU, two OpenBLAS threads next to XLA's made the same 1024 × 1024 eigensolve
take anywhere from 0.4 to 8.6 s, one thread 0.2-0.3 s.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before jax (and its LAPACK) is loaded

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import jaxopt_lab
from jaxopt_lab.lowrank import svd_projector

T = 200


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class Case:
    """One variant: a jitted donated step and the states to feed it."""

    def __init__(self, name, tx, params, grads):
        self.name, self.grads = name, grads
        self.step = make_step(tx)
        state0 = tx.init(params)
        self.refresh_state = state0  # count 0: every projector is due
        self.params = copy(params)
        # one step past the refresh: the next T-1 steps are normal steps
        self.params, self.state = self.step(self.params, copy(state0), grads)
        jax.block_until_ready(self.state)
        self.times = {"normal": [], "refresh": []}

    def time_normal(self):
        t0 = time.perf_counter()
        self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        self.times["normal"].append(time.perf_counter() - t0)

    def time_refresh(self):
        params, state = copy(self.params), copy(self.refresh_state)
        jax.block_until_ready((params, state))
        t0 = time.perf_counter()
        out = self.step(params, state, self.grads)
        jax.block_until_ready(out)
        self.times["refresh"].append(time.perf_counter() - t0)


class Floor:
    """The two bare projection matmuls of the same shapes, in XLA's fastest dot form.

    The projected side is the smaller one (d = min(m, n), k = max(m, n)), as
    ours: for a wide G (d × k) ``Pᵀ G`` (r × k) and ``P N`` (d × k); for a
    tall G (k × d) ``G P`` (k × r) and ``N Pᵀ`` (k × d). Both operands of
    each dot are laid out so that XLA:CPU contracts the left one on its last
    axis and the right one on its first (``Pᵀ`` given transposed).
    """

    def __init__(self, shape, rank):
        m, n = shape
        d, k = min(m, n), max(m, n)
        key = jax.random.PRNGKey(1)
        self.g = jax.random.normal(key, shape, jnp.float32)
        p = jax.random.normal(jax.random.fold_in(key, 1), (d, rank), jnp.float32)
        if m <= n:  # wide: Pᵀ (r × d) @ G (d × k), P (d × r) @ N (r × k)
            self.a, self.b = jnp.asarray(p.T), p
            self.n = jax.random.normal(jax.random.fold_in(key, 2), (rank, k), jnp.float32)
            self.fn = jax.jit(lambda a, g, b, n: (a @ g, b @ n))
        else:  # tall: G (k × d) @ P (d × r), N (k × r) @ Pᵀ (r × d)
            self.a, self.b = p, jnp.asarray(p.T)
            self.n = jax.random.normal(jax.random.fold_in(key, 2), (k, rank), jnp.float32)
            self.fn = jax.jit(lambda a, g, b, n: (g @ a, n @ b))
        jax.block_until_ready(self.fn(self.a, self.g, self.b, self.n))
        self.name, self.times = "floor: PᵀG + P·N (bare matmuls)", {"normal": []}

    def time_normal(self):
        t0 = time.perf_counter()
        jax.block_until_ready(self.fn(self.a, self.g, self.b, self.n))
        self.times["normal"].append(time.perf_counter() - t0)


def cases_for(shape, rank, rows=""):
    key = jax.random.PRNGKey(0)
    params = {"w": jax.random.normal(key, shape, jnp.float32) * 0.02}
    grads = {"w": jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32)}
    every = lambda p: jax.tree.map(lambda _: True, p)
    variants = {
        "optax.adamw": optax.adamw(1e-3),
        "optax.contrib.galore": optax.contrib.galore(1e-3, rank=rank, update_proj_gap=T),
        "ours galore, svd (auto: Gram eigh)": jaxopt_lab.galore(1e-3, rank=rank, update_proj_gap=T, label_fn=every),
        "ours galore, svd (LAPACK SVD)": jaxopt_lab.galore(1e-3, rank=rank, update_proj_gap=T, label_fn=every,
                                                          projector=svd_projector("svd")),
        "ours galore, randomized_svd": jaxopt_lab.galore(1e-3, rank=rank, update_proj_gap=T, label_fn=every,
                                                        projector="randomized_svd"),
        "ours fira, fused=False (S formed: 3 matmuls)": jaxopt_lab.fira(1e-3, rank=rank, update_proj_gap=T,
                                                                         label_fn=every, fused=False),
        "ours fira, default (two passes in XLA)": jaxopt_lab.fira(1e-3, rank=rank, update_proj_gap=T, label_fn=every),
        "ours fira, fused=True": jaxopt_lab.fira(1e-3, rank=rank, update_proj_gap=T, label_fn=every, fused=True),
    }
    cases = [Case(name, tx, params, grads) for name, tx in variants.items()]
    # a gradient of rank r / 2: the residual is rounding noise, so the default takes its exact-norm branch
    low = jax.random.normal(jax.random.fold_in(key, 2), (shape[0], rank // 2)) @ jax.random.normal(
        jax.random.fold_in(key, 3), (rank // 2, shape[1]))
    name = "ours fira, default, gradient of rank r/2 (exact ‖S‖ branch)"
    cases.append(Case(name, jaxopt_lab.fira(1e-3, rank=rank, update_proj_gap=T, label_fn=every), params, {"w": low}))
    return [c for c in cases if c.name in ("optax.adamw", "optax.contrib.galore") or re.search(rows, c.name)]


def fmt_ms(s):
    return f"{1e3 * s:.1f}" if s < 1 else f"{1e3 * s:.0f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1024x4096", "4096x1024"])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--refresh-repeats", type=int, default=3)
    ap.add_argument("--rows", default="", help="regular expression: time only the variants it finds (optax rows always)")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  "
          f"optax {optax.__version__}  rank {args.rank}  T {T}  OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    for text in args.shapes:
        shape = tuple(int(s) for s in text.split("x"))
        floor = Floor(shape, args.rank)
        cases = cases_for(shape, args.rank, args.rows)
        for _ in range(args.repeats):  # interleaved rounds: a slow round slows every variant
            floor.time_normal()
            for c in cases:
                c.time_normal()
        for _ in range(args.refresh_repeats):
            for c in cases[1:]:  # optax.adamw has no refresh
                c.time_refresh()
        ref = cases[1]  # optax.contrib.galore
        # each ratio is the median over rounds of (variant / reference in the same round)
        per_round = lambda c, ref_times, kind="normal": statistics.median(
            a / b for a, b in zip(c.times[kind], ref_times))
        print(f"\n{shape[0]}x{shape[1]}, r={args.rank}: medians of {args.repeats} normal and "
              f"{args.refresh_repeats} refresh steps; ratios are medians of per-round ratios\n")
        print("| step | normal ms | × floor | × optax galore | refresh ms | refresh × optax galore's "
              "| amortized ms (T=200) | amortized × optax galore's |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = statistics.median(floor.times["normal"])
        print(f"| {floor.name} | {fmt_ms(base)} | 1.00 | {per_round(floor, ref.times['normal']):.2f} "
              f"| - | - | - | - |")
        ref_amort = None
        if ref.times["refresh"]:
            ref_amort = (statistics.median(ref.times["normal"]) * (T - 1) + statistics.median(ref.times["refresh"])) / T
        for c in cases:
            normal = statistics.median(c.times["normal"])
            cells = [fmt_ms(normal), f"{per_round(c, floor.times['normal']):.2f}",
                     f"{per_round(c, ref.times['normal']):.2f}"]
            if c.times["refresh"]:
                refresh = statistics.median(c.times["refresh"])
                amort = (normal * (T - 1) + refresh) / T
                cells += [fmt_ms(refresh), f"{per_round(c, ref.times['refresh'], 'refresh'):.2f}", fmt_ms(amort),
                          f"{amort / ref_amort:.2f}"]
            else:
                cells += ["-"] * 4
            print(f"| {c.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
