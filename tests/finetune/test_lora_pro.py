"""LoRA-Pro against a float64 numpy re-implementation of the paper's equations and the official code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.finetune import lora_pro, scale_by_lora_pro
from jaxopt_lab.finetune.lora_pro import adjust

S = 2.0  # alpha / rank


def _lstsq_operator(a, b, s):
    """The linear map (g_A, g_B) -> s (B g_A + g_B A) as a matrix (paper orientation)."""
    r, n = a.shape
    m = b.shape[0]
    cols = []
    for k in range(r * n):
        e = np.zeros(r * n)
        e[k] = 1
        cols.append((s * b @ e.reshape(r, n)).ravel())
    for k in range(m * r):
        e = np.zeros(m * r)
        e[k] = 1
        cols.append((s * e.reshape(m, r) @ a).ravel())
    return np.stack(cols, axis=1)


def _problem(seed, m=7, n=5, r=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(r, n)), rng.normal(size=(m, r)), rng.normal(size=(m, n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_the_closest_to_the_full_gradient(seed):
    """Theorem 2.1, checked numerically in float64: no admissible (g_A, g_B) gets closer to g."""
    a, b, g = _problem(seed)
    ga, gb = S * b.T @ g, S * g @ a.T  # the LoRA gradients
    with jax.enable_x64(True):
        na, nb = (np.asarray(x) for x in adjust(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ga), jnp.asarray(gb),
                                                S, delta=0.0))
    ours = np.linalg.norm(S * (b @ na + nb @ a) - g)
    op = _lstsq_operator(a, b, S)
    best = np.linalg.norm(op @ np.linalg.lstsq(op, g.ravel(), rcond=None)[0] - g.ravel())
    assert ours == pytest.approx(best, rel=1e-10)
    rng = np.random.default_rng(seed + 10)
    for _ in range(20):  # and random admissible directions only move away from it
        da, db = rng.normal(size=na.shape), rng.normal(size=nb.shape)
        assert np.linalg.norm(S * (b @ (na + 1e-3 * da) + (nb + 1e-3 * db) @ a) - g) >= ours - 1e-12
    lora = np.linalg.norm(S * (b @ ga + gb @ a) - g)  # plain LoRA's step is farther (a strict improvement here)
    assert ours < lora


@pytest.mark.parametrize("seed", [0, 1])
def test_sylvester_x_gives_the_minimizer_closest_to_the_lora_gradients(seed):
    """Theorem 2.2: among g_A + Y A, g_B - B Y (all equally good), X minimizes the distance to (g^A, g^B)."""
    a, b, g = _problem(seed)
    ga, gb = S * b.T @ g, S * g @ a.T
    with jax.enable_x64(True):
        args = (jnp.asarray(a), jnp.asarray(b), jnp.asarray(ga), jnp.asarray(gb), S)
        na0, nb0 = (np.asarray(x) for x in adjust(*args, delta=0.0, with_x=False))
        na, nb = (np.asarray(x) for x in adjust(*args, delta=0.0, with_x=True))
    r = a.shape[0]
    cols = []
    for k in range(r * r):
        y = np.zeros(r * r)
        y[k] = 1
        y = y.reshape(r, r)
        cols.append(np.concatenate([(y @ a).ravel(), (-b @ y).ravel()]))
    op = np.stack(cols, axis=1)
    y = np.linalg.lstsq(op, np.concatenate([(ga - na0).ravel(), (gb - nb0).ravel()]), rcond=None)[0].reshape(r, r)
    np.testing.assert_allclose(na, na0 + y @ a, atol=1e-12)
    np.testing.assert_allclose(nb, nb0 - b @ y, atol=1e-12)


def _official_adamw(steps, a, b, s, b1=0.9, b2=0.999, eps=1e-8, delta=1e-8):
    """``lorapro_full_adjustment`` of the official code in float64 numpy (paper orientation); yields the
    adjusted (g_A, g_B) of each step for the given (A, B, full gradient g) sequence."""
    m_ = v_ = None
    out = []
    for t, (a, b, g) in enumerate(steps, start=1):
        ga0, gb0 = s * b.T @ g, s * g @ a.T
        aat_inv = np.linalg.pinv(a @ a.T + delta * np.eye(a.shape[0]))
        btb_inv = np.linalg.pinv(b.T @ b + delta * np.eye(a.shape[0]))
        proj = np.eye(b.shape[0]) - b @ btb_inv @ b.T
        gA, gB = btb_inv @ ga0 / s**2, proj @ gb0 @ aat_inv / s**2
        eq = s * b @ gA + s * gB @ a
        m_ = (1 - b1) * eq if m_ is None else b1 * m_ + (1 - b1) * eq
        v_ = (1 - b2) * eq * eq if v_ is None else b2 * v_ + (1 - b2) * eq * eq
        step = t + 1  # global_step is incremented before the adjustment, then + 1
        d = (m_ / (1 - b1**step)) / (np.sqrt(v_) / np.sqrt(1 - b2**step) + eps)
        ga1, gb1 = s * b.T @ d, s * d @ a.T
        import scipy.linalg

        x = scipy.linalg.solve_sylvester(b.T @ b, a @ a.T, -btb_inv @ ga1 @ a.T / s**2)
        out.append((btb_inv @ ga1 / s**2 + x @ a, proj @ gb1 @ aat_inv / s**2 - b @ x))
    return out


def test_adamw_form_matches_the_official_rule_over_three_steps():
    rng = np.random.default_rng(0)
    n_in, n_out, r = 6, 5, 2
    steps, ours = [], []
    a_f = rng.normal(size=(n_in, r)) * 0.5  # flax lora_a (in x r)
    b_f = np.zeros((r, n_out))  # flax lora_b starts at zero, as LoRA's B
    with jax.enable_x64(True):
        tx = scale_by_lora_pro(scale=S, mode="adamw")
        params = {"layer": {"lora": {"lora_a": jnp.asarray(a_f), "lora_b": jnp.asarray(b_f)}}}
        state = tx.init(params)
        for t in range(3):
            g_kernel = rng.normal(size=(n_in, n_out))  # the full gradient of the kernel (in x out)
            grads = {"layer": {"lora": {"lora_a": jnp.asarray(S * g_kernel @ b_f.T),
                                        "lora_b": jnp.asarray(S * a_f.T @ g_kernel)}}}
            steps.append((a_f.T.copy(), b_f.T.copy(), g_kernel.T.copy()))
            updates, state = tx.update(grads, state, params)
            ours.append((np.asarray(updates["layer"]["lora"]["lora_a"]).T, np.asarray(updates["layer"]["lora"]["lora_b"]).T))
            a_f = a_f - 0.1 * ours[-1][0].T
            b_f = b_f - 0.1 * ours[-1][1].T
            params = {"layer": {"lora": {"lora_a": jnp.asarray(a_f), "lora_b": jnp.asarray(b_f)}}}
    for (ua, ub), (ea, eb) in zip(ours, _official_adamw(steps, None, None, S)):
        np.testing.assert_allclose(ua, ea, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(ub, eb, rtol=1e-7, atol=1e-9)


def test_clip_norm_divides_the_adjusted_directions_by_the_raw_gradient_norm_as_deepspeed():
    """The official runs clip after the adjustment (DeepSpeed's unscale_and_clip_grads with the norm of the
    raw gradients, max_grad_norm 1.0): the moments see unclipped gradients, only the output is divided."""
    rng = np.random.default_rng(3)
    n_in, n_out, r = 6, 5, 2
    a_f, b_f = rng.normal(size=(n_in, r)), 0.3 * rng.normal(size=(r, n_out))
    with jax.enable_x64(True):
        params = {"bias": jnp.asarray(rng.normal(size=n_out)),
                  "layer": {"lora": {"lora_a": jnp.asarray(a_f), "lora_b": jnp.asarray(b_f)}}}
        plain, clipped = scale_by_lora_pro(S), scale_by_lora_pro(S, clip_norm=1.0)
        s_plain, s_clip = plain.init(params), clipped.init(params)
        for t in range(3):
            grads = jax.tree.map(lambda p: jnp.asarray((0.1 + 3.0 * t) * rng.normal(size=p.shape)), params)
            u, s_plain = plain.update(grads, s_plain, params)
            c, s_clip = clipped.update(grads, s_clip, params)
            raw = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(grads)))
            divisor = max(1.0, (raw + 1e-6) / 1.0)
            if t > 0:
                assert divisor > 1  # the clip acts on the later steps
            jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x) / divisor, rtol=1e-12),
                         u, c)
    with pytest.raises(ValueError, match="clip_norm"):
        scale_by_lora_pro(clip_norm=0.0)


def test_other_leaves_get_adam_and_the_alias_applies_the_learning_rate():
    params = {"bias": jnp.ones(3), "w": {"lora": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    u1, _ = scale_by_lora_pro(S).update(grads, scale_by_lora_pro(S).init(params), params)
    u2, _ = lora_pro(0.1, S).update(grads, lora_pro(0.1, S).init(params), params)
    # Adam's first step with the official step offset: (1-b1) g / (1 - b1^2) / (sqrt((1-b2) g^2 / (1 - b2^2)) + eps)
    expected = (0.1 * 0.5 / (1 - 0.81)) / (np.sqrt(0.001 * 0.25 / (1 - 0.999**2)) + 1e-8)
    np.testing.assert_allclose(np.asarray(u1["bias"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u2["bias"]), -0.1 * expected, rtol=1e-5)


def test_bad_arguments_are_refused_by_name():
    for kwargs, word in ((dict(scale=0.0), "scale"), (dict(mode="adam"), "mode"), (dict(b1=1.0), "b1"),
                         (dict(step_offset=-1), "step_offset")):
        with pytest.raises(ValueError, match=word):
            scale_by_lora_pro(**kwargs)
    with pytest.raises(ValueError, match="complex"):
        scale_by_lora_pro().init({"w": jnp.ones(2, jnp.complex64)})
