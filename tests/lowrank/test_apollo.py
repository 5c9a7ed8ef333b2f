"""APOLLO / APOLLO-Mini against a float64 numpy reference of the update rule, plus errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import apollo, apollo_mini
from jaxopt_lab.lowrank.projectors import RandomState, random_matrix

RNG = np.random.default_rng(5)
PARAMS = {"w": jnp.asarray(RNG.standard_normal((8, 12)), jnp.float32),
          "t": jnp.asarray(RNG.standard_normal((10, 6)), jnp.float32),
          "b": jnp.asarray(RNG.standard_normal((12,)), jnp.float32)}
# gradients that grow 3x per step, so that the norm-growth limiter is active
GRADS = [jax.tree.map(lambda p, s=s: jnp.asarray(s * RNG.standard_normal(p.shape), jnp.float32), PARAMS)
         for s in (1.0, 3.0, 9.0, 1.0, 27.0)]
ALL = {"w": True, "t": True, "b": False}
LR, WD, B1, B2, EPS, GAMMA = 0.05, 0.1, 0.9, 0.999, 1e-6, 1.01


_basis = jax.jit(random_matrix, static_argnums=(1, 2))


VARIANTS = {"w": ("channel", 3, 2.0), "t": ("tensor", 1, 128.0)}  # (scale type, rank, α): APOLLO on w, APOLLO-Mini on t


def _reference(bases, grads=GRADS, variants=VARIANTS):
    """float64 APOLLO-AdamW as the official ``APOLLOAdamW.step``; ``bases[t][name]`` is the (oriented) P used at step t."""
    p = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    mom = {k: [0.0, 0.0] for k in p}
    prev = {k: None for k in variants}  # official: state["scaled_grad"] absent before the first step
    for step, g in enumerate(grads, start=1):
        bc = np.sqrt(1 - B2**step) / (1 - B1**step)
        g = {k: np.asarray(v, np.float64) for k, v in g.items()}
        new = {}
        for k in p:
            if k == "b":
                x = y = g[k]
            else:  # the smaller side is projected: w's 8 rows, t's 6 columns
                x = g[k] if k == "w" else g[k].T
                y = bases[step - 1][k].T @ x
            m, v = mom[k]
            m, v = B1 * m + (1 - B1) * y, B2 * v + (1 - B2) * y**2
            mom[k] = [m, v]
            n = m / (np.sqrt(v) + EPS)
            if k == "b":
                direction = n
            else:
                scale_type, _, alpha = variants[k]
                if scale_type == "channel":
                    s = np.linalg.norm(n, axis=0) / (np.linalg.norm(y, axis=0) + 1e-8)
                else:
                    s = np.linalg.norm(n) / (np.linalg.norm(y) + 1e-8)
                scaled = x * s
                norm = np.linalg.norm(scaled)
                limiter = max(norm / (prev[k] + 1e-8), GAMMA) / GAMMA if prev[k] is not None else 1.0
                scaled, prev[k] = scaled / limiter, norm / limiter
                direction = np.sqrt(alpha) * scaled
                direction = direction if k == "w" else direction.T
            new[k] = (1 - LR * WD) * (p[k] - LR * bc * direction)  # official: decay the updated weights
        p = new
    return p


CASES = {
    "growing": (GRADS, 3),
    # a zero first gradient: the official code stores the norm 0 and limits the next step against it
    "zero_first": ([jax.tree.map(jnp.zeros_like, GRADS[0])] + GRADS[1:], 3),
    # rank 10 above w's projected side (8): the official random projector draws an 8 × 10 P (no cap)
    "rank_above_dim": (GRADS, 10),
}


@pytest.mark.parametrize("case", list(CASES))
def test_apollo_and_apollo_mini_match_float64_reference(case):
    grads, rank = CASES[case]
    variants = {**VARIANTS, "w": ("channel", rank, 2.0)}
    # one optax.partition: APOLLO (channel-wise, rank 3, α = 2) on w and b, APOLLO-Mini on t
    tx = optax.partition({"apollo": apollo(LR, rank=rank, update_proj_gap=2, scale=2.0, weight_decay=WD),
                          "mini": apollo_mini(LR, update_proj_gap=2, weight_decay=WD)},
                         {"w": "apollo", "b": "apollo", "t": "mini"})
    state, params = tx.init(PARAMS), PARAMS
    step = jax.jit(tx.update)
    bases = []
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        lows = {"w": state.inner_states["apollo"].inner_state[0], "t": state.inner_states["mini"].inner_state[0]}
        bases.append({k: np.asarray(_basis(RandomState(*(f[k] for f in lows[k].projectors)), d, variants[k][1]), np.float64)
                      for k, d in (("w", 8), ("t", 6))})
    for k, low in lows.items():
        assert isinstance(low.projectors, RandomState) and low.projectors.key[k].shape == (2,)  # only a key
        assert low.inner.mu[k].shape == ((rank, 12) if k == "w" else (1, 10))
    assert not np.array_equal(bases[0]["w"], bases[2]["w"]) and np.array_equal(bases[0]["w"], bases[1]["w"])  # T = 2
    expected = _reference(bases, grads, variants)
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"label_fn": {"w": True, "t": 7, "b": False}, "projector": "svd"},  # a random P may be d × r for r > d
     r"the label function gives \['t'\] \(10, 6\) rank 7, larger than its smaller dimension 6"),
    ({"rank": 0}, "rank must be > 0, got 0"),
    ({"rank": -3}, "rank must be > 0, got -3"),
    ({"update_proj_gap": 0}, r"update_proj_gap \(the refresh period T\) must be an int > 0, got 0"),
    ({"label_fn": {"w": True, "t": True, "b": True}}, r"selected \['b'\] of shape \(12,\): only 2-D"),
    ({"scale_type": "row"}, "scale_type must be one of"),
    ({"growth_limit": 1.0}, "growth_limit must be > 1, got 1.0"),
    ({"scale": 0.0}, "scale must be > 0, got 0.0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apollo(1e-2, **{"rank": 2, "label_fn": ALL, **kwargs}).init(PARAMS)


def test_apollo_mini_bad_gap_is_named():
    with pytest.raises(ValueError, match=r"update_proj_gap \(the refresh period T\) must be an int > 0, got -1"):
        apollo_mini(1e-2, update_proj_gap=-1, label_fn=ALL).init(PARAMS)
