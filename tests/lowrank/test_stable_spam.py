"""Stable-SPAM against float64 numpy replays of the official code and of the paper's equations, plus errors.

8 steps with ΔT = 3 cross two momentum resets (t = 3 and 6); a spike lands on the step right after
the first reset (t = 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lowrank import stable_spam

RNG = np.random.default_rng(7)
PARAMS = {"w": jnp.asarray(RNG.standard_normal((4, 5)), jnp.float32), "b": jnp.asarray(RNG.standard_normal(5), jnp.float32)}
GRADS = [jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape), jnp.float32), PARAMS) for _ in range(8)]
GRADS[3] = jax.tree.map(lambda g: g.at[0].multiply(50.0), GRADS[3])  # a spike at step 4, just after a reset
LR, WD, B1, B2, EPS, G1, G2, THETA, DT = 0.05, 0.1, 0.9, 0.999, 1e-8, 0.7, 0.9, 0.999, 3


def _official(total_T=None, eta_min=0.5):
    """A float64 replay of ``StableSPAM.step`` (``TianjinYellow/StableSPAM``, galore_torch/stablespam.py).

    Per tensor: ``state["step"]`` is bumped and drives AdaClip and AdaGN; at a reset step the state gets
    fresh zero moments and ``step = 1`` while the step itself goes on with its handles on the OLD moments.
    ``total_T``: its ``CosineDecay(1.0, total_T, eta_min)`` (torch's CosineAnnealingLR with T_max = total_T + 1,
    stepped to the global step) scales gamma1 and beta1.
    """
    p = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    st = {k: dict(step=0, mmax=0.0, mn=0.0, vn=0.0, m=np.zeros(v.shape), v=np.zeros(v.shape)) for k, v in p.items()}
    clipped = []
    for total_steps, g in enumerate(GRADS, start=1):
        scale = 1.0 if total_T is None else eta_min + (1 - eta_min) * (1 + np.cos(np.pi * total_steps / (total_T + 1))) / 2
        for k in p:
            s, grad = st[k], np.asarray(g[k], np.float64).copy()
            p[k] = p[k] * (1 - LR * WD)
            exp_avg, exp_avg_sq = s["m"], s["v"]  # the handles the update uses
            gmax = np.abs(grad).max()
            s["step"] += 1
            s["mmax"] = THETA * s["mmax"] + (1 - THETA) * gmax
            m_max_hat = s["mmax"] / (1 - THETA ** s["step"])
            mask = np.abs(grad) > m_max_hat
            clipped.append(int(mask.sum()))
            grad[mask] = grad[mask] / gmax * m_max_hat
            norm = np.linalg.norm(grad)
            s["mn"] = G1 * scale * s["mn"] + (1 - G1 * scale) * norm
            s["vn"] = G2 * s["vn"] + (1 - G2) * norm**2
            c = (s["mn"] / (1 - (G1 * scale) ** s["step"])) / (np.sqrt(s["vn"] / (1 - G2 ** s["step"])) + EPS)
            if norm > 0:
                grad = grad / norm * c
            if total_steps % DT == 0:
                s["m"], s["v"], s["step"] = np.zeros_like(grad), np.zeros_like(grad), 1
            beta1 = B1 * scale
            bc1, bc2 = 1 - beta1 ** s["step"], 1 - B2 ** s["step"]
            exp_avg *= beta1
            exp_avg += (1 - beta1) * grad  # in place: the state's moments unless they were just swapped out
            exp_avg_sq *= B2
            exp_avg_sq += (1 - B2) * grad * grad
            denom = np.sqrt(exp_avg_sq) / np.sqrt(bc2) + EPS
            p[k] = p[k] - LR / bc1 * (exp_avg / denom)
    return p, st["w"]["step"], clipped


def _reference():
    """The paper's equations (``reset_mode="paper"``)."""
    p = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    st = {k: dict(mmax=0.0, mn=0.0, vn=0.0, m=0.0, v=0.0) for k in p}
    tau, clipped = 0, []
    for t, g in enumerate(GRADS, start=1):
        tau = 1 if t % DT == 0 else tau + 1
        for k in p:
            s, x = st[k], np.asarray(g[k], np.float64)
            gmax = np.abs(x).max()
            s["mmax"] = THETA * s["mmax"] + (1 - THETA) * gmax
            thr = s["mmax"] / (1 - THETA**t)
            mask = np.abs(x) > thr
            clipped.append(int(mask.sum()))
            x = np.where(mask, x / gmax * thr, x)
            n = np.linalg.norm(x)
            s["mn"] = G1 * s["mn"] + (1 - G1) * n
            s["vn"] = G2 * s["vn"] + (1 - G2) * n**2
            x = x / n * (s["mn"] / (1 - G1**t)) / (np.sqrt(s["vn"] / (1 - G2**t)) + EPS)
            if t % DT == 0:
                s["m"], s["v"] = 0.0, 0.0
            s["m"] = B1 * s["m"] + (1 - B1) * x
            s["v"] = B2 * s["v"] + (1 - B2) * x**2
            u = (s["m"] / (1 - B1**tau)) / (np.sqrt(s["v"] / (1 - B2**tau)) + EPS)
            p[k] = p[k] - LR * (u + WD * p[k])
    return p, tau, clipped


def _run(**kwargs):
    tx = stable_spam(LR, b1=B1, b2=B2, eps=EPS, gamma1=G1, gamma2=G2, theta=THETA, reset_interval=DT, weight_decay=WD,
                     **kwargs)
    state, params = tx.init(PARAMS), PARAMS
    step = jax.jit(tx.update)
    for g in GRADS:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state[0]


@pytest.fixture(scope="module")
def runs():
    return {mode: _run(**({} if mode is None else {"reset_mode": mode})) for mode in (None, "paper")}


def test_default_matches_the_official_code_through_two_resets(runs):
    params, spam = runs[None]
    expected, step, clipped = _official()
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-5, atol=1e-5)
    assert int(spam.count) == 8 and int(spam.adam_count) == step == 3  # reset at t = 6 (step = 1), then 2, 3
    assert sum(clipped) > 0
    paper, _ = runs["paper"]
    assert max(np.abs(np.asarray(params[k]) - np.asarray(paper[k])).max() for k in PARAMS) > 1e-2


def test_total_steps_cosine_matches_the_official_total_T():
    # total_T = 5 over 8 steps: the factor falls to eta_min and rises again, as the official closed form
    params, _ = _run(total_steps=5, eta_min=0.3)
    expected, _, _ = _official(total_T=5, eta_min=0.3)
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-5, atol=1e-5)
    plain, _, _ = _official()
    assert max(np.abs(expected[k] - plain[k]).max() for k in PARAMS) > 1e-3


def test_paper_mode_matches_the_paper_equations(runs):
    params, spam = runs["paper"]
    expected, tau, clipped = _reference()
    assert clipped[6] > 0  # the spike at t = 4, right after a reset, is clipped
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-5, atol=1e-5)
    assert int(spam.count) == 8 and int(spam.adam_count) == tau == 3  # reset at t = 6, then 7, 8


def test_the_modes_agree_before_the_first_reset():
    first = {mode: _run_steps(2, mode) for mode in ("official", "paper")}
    for k in PARAMS:
        np.testing.assert_allclose(np.asarray(first["official"][k]), np.asarray(first["paper"][k]), rtol=1e-6)


def _run_steps(n, mode):
    tx = stable_spam(LR, reset_interval=DT, weight_decay=WD, reset_mode=mode)
    state, params = tx.init(PARAMS), PARAMS
    for g in GRADS[:n]:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("kwargs, message", [
    ({"reset_interval": 0}, r"reset_interval \(the momentum-reset period ΔT\) must be an int > 0 or None, got 0"),
    ({"reset_interval": -10}, r"reset_interval \(the momentum-reset period ΔT\) must be an int > 0 or None, got -10"),
    ({"gamma1": 1.0}, r"gamma1 must be in \[0, 1\), got 1.0"),
    ({"gamma2": -0.1}, r"gamma2 must be in \[0, 1\), got -0.1"),
    ({"theta": 1.5}, r"theta must be in \[0, 1\), got 1.5"),
    ({"eps": -1.0}, "eps must be >= 0, got -1.0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    ({"total_steps": 0}, r"total_steps \(the official total_T\) must be an int > 0 or None, got 0"),
    ({"eta_min": 1.5}, r"eta_min must be in \[0, 1\], got 1.5"),
    ({"reset_mode": "torch"}, r"reset_mode must be one of \('official', 'paper'\), got 'torch'"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stable_spam(1e-3, **kwargs)
