"""GaLore and Fira against the official PyTorch packages (``galore-torch``, ``fira``).

Both sides get the same sequence of random gradients for several steps,
including a projector refresh, on a wide and a tall matrix (the official code
projects the smaller side: left for wide, right for tall), and must produce
the same weights to fp32 tolerance.

Singular vectors are defined up to sign and the official code keeps Adam's
moments across a refresh, so a sign that differs between two LAPACKs would
change the trajectory. Our SVD projector fixes the sign (largest-magnitude
entry positive); the reference is run with the same convention applied to its
SVD, and nothing else of it is changed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
galore_torch = pytest.importorskip("galore_torch")
fira_pkg = pytest.importorskip("fira")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxopt_lab.lowrank import fira, galore  # noqa: E402

STEPS, GAP, RANK, LR, EPS = 7, 3, 3, 1e-2, 1e-6


def _canonical(u: "torch.Tensor", columns: bool) -> "torch.Tensor":
    """The sign convention of jaxopt_lab.lowrank.projectors.svd.canonical_signs, in torch."""
    m = u if columns else u.T
    rows = m.abs().argmax(dim=0)
    signs = torch.sign(m[rows, torch.arange(m.shape[1])])
    m = m * torch.where(signs == 0, torch.ones_like(signs), signs)
    return m if columns else m.T


def _patch_signs(monkeypatch, projector_cls):
    original = projector_cls.get_orthogonal_matrix

    def get_orthogonal_matrix(self, weights, rank, type):
        out = original(self, weights, rank, type)
        if type == "left":
            return _canonical(out, columns=True)
        if type == "right":
            return _canonical(out, columns=False)
        raise AssertionError(type)

    monkeypatch.setattr(projector_cls, "get_orthogonal_matrix", get_orthogonal_matrix)


def _run_torch(opt_cls, group_extra, w0, grads, weight_decay=0.0):
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = opt_cls([{"params": [p], "rank": RANK, "update_proj_gap": GAP, "proj_type": "std", **group_extra}],
                  lr=LR, eps=EPS, weight_decay=weight_decay)
    out = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        out.append(p.detach().numpy().copy())
    return np.stack(out)


def _run_ours(tx, w0, grads):
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = step({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["w"]))
    return np.stack(out)


def _label_all(params):
    return jax.tree.map(lambda _: True, params)


@pytest.fixture(params=[(6, 10), (12, 5)], ids=["wide", "tall"])
def problem(request):
    rng = np.random.default_rng(sum(request.param))
    shape = request.param
    w0 = rng.standard_normal(shape).astype(np.float32)
    # gradients that drift slowly, so that refreshes change the subspace a little, as in training
    base = rng.standard_normal(shape)
    grads = [(base + 0.5 * rng.standard_normal(shape)).astype(np.float32) for _ in range(STEPS)]
    return w0, grads


# WD: large enough that decaying the old weights instead of the updated ones (a difference of
# lr²·λ·U per step, 7e-4·U here) is far outside the tolerance
WD = 7.0


@pytest.mark.parametrize("weight_decay", [0.0, WD], ids=["no_decay", "decay"])
def test_galore_matches_galore_torch(problem, monkeypatch, weight_decay):
    from galore_torch.galore_projector import GaLoreProjector

    _patch_signs(monkeypatch, GaLoreProjector)
    w0, grads = problem
    expected = _run_torch(galore_torch.GaLoreAdamW, {"scale": 0.25}, w0, grads, weight_decay)
    ours = _run_ours(galore(LR, rank=RANK, update_proj_gap=GAP, scale=0.25, eps=EPS, weight_decay=weight_decay,
                            label_fn=_label_all), w0, grads)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(np.diff(expected, axis=0)).max() > 1e-3  # the weights did move


@pytest.mark.parametrize("weight_decay", [0.0, WD], ids=["no_decay", "decay"])
def test_fira_matches_official_fira(problem, monkeypatch, weight_decay):
    from fira.gradient_projection import GradientProjector

    _patch_signs(monkeypatch, GradientProjector)
    w0, grads = problem
    expected = _run_torch(fira_pkg.FiraAdamW, {"alpha": 1.0}, w0, grads, weight_decay)
    ours = _run_ours(fira(LR, rank=RANK, update_proj_gap=GAP, scale=1.0, eps=EPS, weight_decay=weight_decay,
                          label_fn=_label_all), w0, grads)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # Fira differs from GaLore (the residual is used) on these matrices
    galore_path = _run_ours(galore(LR, rank=RANK, update_proj_gap=GAP, scale=1.0, eps=EPS, weight_decay=weight_decay,
                                   label_fn=_label_all), w0, grads)
    assert np.abs(galore_path - expected).max() > 1e-3


@pytest.mark.parametrize("fused", ["reference", False], ids=["default", "unfused"])
def test_fira_after_a_zero_first_gradient_matches_official_fira(problem, monkeypatch, fused):
    # a zero first gradient (e.g. behind a zero-initialized layer): the official FiraAdamW stores the residual's
    # norm, 0, and limits the next step against it (max(‖S‖ / (0 + 1e-8), γ) / γ), so the residual stays near
    # γ·1e-8 from then on. A refresh every step: the basis drawn from the zero gradient is never used.
    from fira.gradient_projection import GradientProjector

    _patch_signs(monkeypatch, GradientProjector)
    w0, grads = problem
    grads = [np.zeros_like(grads[0])] + grads[1:]
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = fira_pkg.FiraAdamW([{"params": [p], "rank": RANK, "update_proj_gap": 1, "proj_type": "std", "alpha": 1.0}],
                             lr=LR, eps=EPS, weight_decay=0.0)
    expected = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        expected.append(p.detach().numpy().copy())
    expected = np.stack(expected)
    ours = _run_ours(fira(LR, rank=RANK, update_proj_gap=1, eps=EPS, label_fn=_label_all, fused=fused), w0, grads)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # the residual is held at ~1e-8: the official trajectory is GaLore's (α = 1), not Fira's with a free residual
    galore_path = _run_ours(galore(LR, rank=RANK, update_proj_gap=1, scale=1.0, eps=EPS, label_fn=_label_all), w0, grads)
    np.testing.assert_allclose(expected, galore_path, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.25, 2.0])
def test_galore_side_larger_matches_galore_torch_reverse_std(problem, monkeypatch, scale):
    # proj_type="reverse_std" projects the larger side (left for tall, right for wide; left for a square matrix)
    from galore_torch.galore_projector import GaLoreProjector

    _patch_signs(monkeypatch, GaLoreProjector)
    w0, grads = problem
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = galore_torch.GaLoreAdamW([{"params": [p], "rank": RANK, "update_proj_gap": GAP, "proj_type": "reverse_std",
                                     "scale": scale}], lr=LR, eps=EPS, weight_decay=WD)
    expected = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        expected.append(p.detach().numpy().copy())
    ours = _run_ours(galore(LR, rank=RANK, update_proj_gap=GAP, scale=scale, eps=EPS, weight_decay=WD, side="larger",
                            label_fn=_label_all), w0, grads)
    np.testing.assert_allclose(ours, np.stack(expected), rtol=1e-5, atol=1e-6)


def test_galore_and_fira_non_projected_vector_matches_the_official_group(monkeypatch):
    # a bias in the official "regular" param group (no "rank"): the same AdamW split (ε beside the uncorrected √v,
    # bias correction with the learning rate) and the weights decayed after the step; label_fn leaves it unprojected
    from fira.gradient_projection import GradientProjector
    from galore_torch.galore_projector import GaLoreProjector

    _patch_signs(monkeypatch, GaLoreProjector)
    _patch_signs(monkeypatch, GradientProjector)
    rng = np.random.default_rng(3)
    w0, b0 = rng.standard_normal((6, 10)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    base = rng.standard_normal((6, 10))  # drifting, as the fixture's: well-separated singular values
    grads = [((base + 0.5 * rng.standard_normal((6, 10))).astype(np.float32), rng.standard_normal(10).astype(np.float32))
             for _ in range(STEPS)]
    for official, ours_tx, extra in (
        (galore_torch.GaLoreAdamW, galore(LR, rank=RANK, update_proj_gap=GAP, eps=EPS, weight_decay=WD,
                                          label_fn={"w": True, "b": False}), {"scale": 0.25}),
        (fira_pkg.FiraAdamW, fira(LR, rank=RANK, update_proj_gap=GAP, eps=EPS, weight_decay=WD,
                                  label_fn={"w": True, "b": False}), {"alpha": 1.0}),
    ):
        w, b = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
        opt = official([{"params": [b]}, {"params": [w], "rank": RANK, "update_proj_gap": GAP, "proj_type": "std",
                                          **extra}], lr=LR, eps=EPS, weight_decay=WD)
        params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
        state, step = ours_tx.init(params), jax.jit(ours_tx.update)
        for gw, gb in grads:
            w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
            opt.step()
            updates, state = step({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params)
            params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(params["b"]), b.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)
