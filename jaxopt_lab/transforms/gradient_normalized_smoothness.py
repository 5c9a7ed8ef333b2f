r"""Gradient-regularized Newton steps with (approximate) Hessians: gradient-normalized smoothness.

"Gradient-Normalized Smoothness for Optimization with Approximate Hessians"
(2025; abstract in the project's paper notes). The official code's
``grad_norm_smooth`` (github.com/epfml/grad-norm-smooth, ``src/methods.py``,
Algorithm 1: gradient-regularized Newton method with the adaptive search over
:math:`\gamma_k`) is what the default reproduces, with its
exact Hessian; the Hessian approximations (diagonal, low-rank, matrix-free HVP
with conjugate gradients) are opt-in, built from
:mod:`jaxopt_lab.diagnostics`' Hessian-vector products.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxopt_lab.diagnostics.hvp import hvp as _hvp
from jaxopt_lab.transforms import _validation as check

HESSIANS = ("dense", "hvp", "diagonal", "lowrank")


class GNSState(NamedTuple):
    """State of :func:`scale_by_gradient_normalized_smoothness`."""

    count: jax.Array  # steps, int32
    gamma: jax.Array  # the adaptive gamma_k, float32
    key: jax.Array  # PRNG key (uint32) for the diagonal / low-rank estimators
    trials: jax.Array  # trial points evaluated (loss and gradient) in total, int32


def _refuse_complex(tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.iscomplexobj(leaf):
            raise ValueError(
                f"gradient_normalized_smoothness: parameter {jax.tree_util.keystr(path)} is {leaf.dtype}; "
                "complex parameters are not supported"
            )


def scale_by_gradient_normalized_smoothness(
    gamma_0: float = 1.0,
    gamma_min: float = 1e-9,
    hessian: str = "dense",
    rank: int = 8,
    num_samples: int = 8,
    cg_iters: int = 50,
    max_search: int = 41,
    adaptive_search: bool = True,
    seed: int = 0,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Algorithm 1 of the paper: a gradient-regularized Newton step with an adaptive search.

    With :math:`g_k = \nabla f(x_k)` (the incoming gradient), the Hessian or
    its approximation :math:`H_k`, and :math:`\lambda = \lVert g_k\rVert /
    (\gamma + \epsilon)`:

    .. math::
        \Delta = -(H_k + \lambda I)^{-1} g_k, \qquad
        \text{accept } x_k + \Delta \text{ if }
        f(x_k) - f(x_k + \Delta) \ge \frac{\lVert\nabla f(x_k + \Delta)\rVert^2}{8\lambda}.

    The search starts from the previous :math:`\gamma_k`; on acceptance
    :math:`\gamma_{k+1} = \max(2\gamma, \gamma_{\min})`, on rejection
    :math:`\gamma \leftarrow \gamma/2` (no floor) and the solve is repeated,
    at most ``max_search`` trials in all; when none is accepted the *last*
    trial is taken (and :math:`\gamma` keeps its last halving). These are the
    official code's rules: its loop ``for i in range(40 + 1)`` (41 trials, the
    default here) ends with ``x_k += delta_x`` whether or not the last trial
    passed. ``adaptive_search=False`` takes the first trial and keeps
    :math:`\gamma`. Each trial costs one loss and gradient evaluation
    (``loss_fn``); the official code reuses the taken trial's gradient for
    the next step, an optax step recomputes it.

    One deliberate difference: when :math:`H_k + \lambda I` is not positive
    definite (a nonconvex loss; the paper's setting is convex) the trial
    counts as rejected (:math:`\gamma` halves, the solve is repeated with a
    larger :math:`\lambda`; such a trial's step is 0). The official code
    leaves the search on the failed Cholesky and adds the previous trial's
    ``delta_x`` (at the first trial of the first step: an undefined variable).

    ``hessian`` chooses :math:`H_k` (all from Hessian-vector products,
    :func:`jaxopt_lab.diagnostics.hvp`, or the ``hvp_fn`` passed to
    ``update``, e.g. a Gauss-Newton or Fisher product):

    - ``"dense"`` (default, the official method): the exact Hessian from
      :math:`d` products, Cholesky solve; for small :math:`d` only.
    - ``"hvp"``: matrix-free, ``cg_iters`` conjugate-gradient iterations on
      :math:`(H_k + \lambda I)\Delta = -g_k`; a solve that is not a descent
      direction counts as not positive definite.
    - ``"diagonal"``: Hutchinson's diagonal :math:`\mathrm{diag}(H) \approx
      \frac1s\sum_j z_j \odot H z_j` with ``num_samples`` Rademacher :math:`z_j`.
    - ``"lowrank"``: a rank-``rank`` randomized eigendecomposition
      :math:`V \Lambda V^\top` (range finder :math:`Q = \mathrm{qr}(H\Omega)`,
      :math:`\mathrm{eig}(Q^\top H Q)`), solved with Woodbury:
      :math:`(V\Lambda V^\top + \lambda I)^{-1} g = g/\lambda + V[(\Lambda +
      \lambda)^{-1} - \lambda^{-1}]V^\top g`.

    Returns :math:`-\Delta` (chain :func:`optax.scale_by_learning_rate`; with
    learning rate 1 the step is the paper's). Arithmetic in float32 (or wider);
    complex parameters are refused.

    Args:
      gamma_0: initial :math:`\gamma > 0` (official 1).
      gamma_min: floor of :math:`\gamma` (official 1e-9).
      hessian: one of ``"dense"``, ``"hvp"``, ``"diagonal"``, ``"lowrank"``.
      rank: rank of the ``"lowrank"`` approximation, int >= 1 (capped at d).
      num_samples: Hutchinson samples for ``"diagonal"``, int >= 1.
      cg_iters: conjugate-gradient iterations for ``"hvp"``, int >= 1.
      max_search: trials per step, int >= 1 (official 41: ``range(40 + 1)``).
      adaptive_search: the acceptance test (default) or the first trial.
      seed: seed of the random probes.
      eps: :math:`\epsilon \ge 0` in :math:`\lambda = \lVert g\rVert /
        (\gamma + \epsilon)` (official 1e-8).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      and ``loss_fn`` (``params -> scalar``), optionally ``hvp_fn``
      (``(params, v) -> H v``).
    """
    check.positive("gamma_0", gamma_0)
    check.non_negative("gamma_min", gamma_min)
    check.non_negative("eps", eps)
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    rank = check.static_int("rank", rank, 1)
    num_samples = check.static_int("num_samples", num_samples, 1)
    cg_iters = check.static_int("cg_iters", cg_iters, 1)
    max_search = check.static_int("max_search", max_search, 1)
    seed = check.static_int("seed", seed, 0)

    def init_fn(params):
        _refuse_complex(params)
        return GNSState(jnp.zeros([], jnp.int32), jnp.asarray(gamma_0, jnp.float32), jax.random.PRNGKey(seed),
                        jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, loss_fn: Callable[[Any], jax.Array] | None = None,
                  hvp_fn: Callable[[Any, Any], Any] | None = None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("gradient_normalized_smoothness needs params")
        _refuse_complex(params)
        count = optax.safe_increment(state.count)
        if not jax.tree.leaves(params):
            return updates, state._replace(count=count)
        if loss_fn is None:
            raise ValueError("gradient_normalized_smoothness needs update(..., loss_fn=f)")
        x_flat, unravel = ravel_pytree(params)
        ct = jnp.promote_types(x_flat.dtype, jnp.float32)
        x = x_flat.astype(ct)
        g = ravel_pytree(updates)[0].astype(ct)
        d = x.shape[0]
        g_norm = jnp.linalg.norm(g)
        f_k = jnp.asarray(loss_fn(params), ct)

        def matvec(v):
            tree = unravel(v.astype(x_flat.dtype))
            hv = hvp_fn(params, tree) if hvp_fn is not None else _hvp(loss_fn, params, tree)
            return ravel_pytree(hv)[0].astype(ct)

        key, sub = jax.random.split(state.key)
        if hessian == "dense":
            h = jax.vmap(matvec)(jnp.eye(d, dtype=ct))
            h = 0.5 * (h + h.T)

            def solve(lam):
                cho = jax.scipy.linalg.cho_factor(h + lam * jnp.eye(d, dtype=ct), lower=True)
                delta = -jax.scipy.linalg.cho_solve(cho, g)
                return delta, jnp.all(jnp.isfinite(delta))
        elif hessian == "diagonal":
            z = jax.random.rademacher(sub, (num_samples, d), ct)
            diag = jnp.mean(z * jax.vmap(matvec)(z), axis=0)

            def solve(lam):
                den = diag + lam
                return -g / den, jnp.all(den > 0)
        elif hessian == "lowrank":
            r = min(rank, d)
            omega = jax.random.normal(sub, (d, r), ct)
            q, _ = jnp.linalg.qr(jax.vmap(matvec, in_axes=1, out_axes=1)(omega))
            t = q.T @ jax.vmap(matvec, in_axes=1, out_axes=1)(q)
            w, u = jnp.linalg.eigh(0.5 * (t + t.T))
            v = q @ u

            def solve(lam):
                delta = -(g / lam + v @ ((1.0 / (w + lam) - 1.0 / lam) * (v.T @ g)))
                return delta, jnp.all(w + lam > 0)
        else:  # "hvp": conjugate gradients on (H + lam I)
            def solve(lam):
                delta, _ = jax.scipy.sparse.linalg.cg(lambda v: matvec(v) + lam * v, -g, maxiter=cg_iters)
                return delta, jnp.isfinite(jnp.vdot(g, delta)) & (jnp.vdot(g, delta) < 0)

        value_and_grad = jax.value_and_grad(lambda v: loss_fn(unravel(v.astype(x_flat.dtype))))
        gmin = jnp.asarray(gamma_min, ct)
        eps_ = jnp.asarray(eps, ct)

        def cond(c):
            i, _, done, _, _ = c
            return (~done) & (i < max_search)

        def body(c):
            i, gamma, _, _, trials = c
            lam = g_norm / (gamma + eps_)
            delta, ok = solve(lam)
            delta = jnp.where(ok, delta, 0.0)
            f_t, g_t = value_and_grad(x + delta)
            f_t = jnp.asarray(f_t, ct)
            g_t = g_t.astype(ct)
            progress = f_k - f_t >= jnp.vdot(g_t, g_t) / (8.0 * lam)
            accept = ok & (progress | (not adaptive_search))
            new_gamma = jnp.where(accept, jnp.maximum(gamma * 2.0, gmin) if adaptive_search else gamma, gamma * 0.5)
            # the official loop adds the last trial's step even when it was not accepted
            return i + 1, new_gamma, accept, delta, trials + ok.astype(jnp.int32)

        start = (jnp.zeros([], jnp.int32), state.gamma.astype(ct), g_norm == 0, jnp.zeros_like(g), jnp.zeros([], jnp.int32))
        _, gamma, _, delta, trials = jax.lax.while_loop(cond, body, start)
        leaves = jax.tree.leaves(unravel((-delta).astype(x_flat.dtype)))
        out = jax.tree.structure(updates).unflatten([a.astype(u.dtype) for a, u in zip(leaves, jax.tree.leaves(updates))])
        return out, GNSState(count, gamma.astype(jnp.float32), key, state.trials + trials)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradient_normalized_smoothness(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    gamma_0: float = 1.0,
    hessian: str = "dense",
    rank: int = 8,
    num_samples: int = 8,
    cg_iters: int = 50,
    adaptive_search: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """The gradient-regularized Newton method of the paper, then a learning rate.

    ``learning_rate`` multiplies the accepted step :math:`\\Delta`; 1 (the
    default) is the paper's method. See
    :func:`scale_by_gradient_normalized_smoothness`; ``update`` needs ``params``
    and ``loss_fn``.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_gradient_normalized_smoothness(gamma_0=gamma_0, hessian=hessian, rank=rank, num_samples=num_samples,
                                                cg_iters=cg_iters, adaptive_search=adaptive_search, seed=seed),
        optax.scale_by_learning_rate(learning_rate),
    )
