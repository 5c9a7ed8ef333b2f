r"""FZooS: federated zeroth-order optimization with trajectory-informed surrogate gradients.

Shu, Lin, Dai & Low, "Federated Zeroth-Order Optimization using
Trajectory-Informed Surrogate Gradients" (2023), https://arxiv.org/abs/2308.04077;
official code https://github.com/shuyao95/FZooS (``optimizers.py: fzoos_opt,
RFFGP``; ``settings.py: FedZoo`` with ``--zo_opt fzoos --correction rff``).

Clients only query values of their objective :math:`f_k` (``value_fn(params,
client_id)``). Every query a client makes joins its **query history**, the
trajectory :math:`\{(x_j, f_k(x_j))\}`. A local step at :math:`x`:

1. fits a Gaussian process (Matérn-5/2 kernel, unit amplitude, noise
   :math:`\sigma^2`, values min-max normalized) to the ``max_queries`` (150)
   history points nearest :math:`x`, and takes the gradient of its posterior
   mean, :math:`\nabla\mu_k(x) = \sum_j \alpha_j \nabla_x k(x, x_j)` (the
   *trajectory-informed surrogate gradient*);
2. adds the **adaptive correction** :math:`\gamma_t\,(\nabla \hat F(x) - \nabla \hat f_k(x))`,
   :math:`\gamma_t = 1/(t+1)`, where :math:`\hat f_k(x) = \phi(x)^\top \nu_k` is the
   client's random-Fourier-feature (RFF) surrogate and :math:`\hat F = \phi^\top \bar\nu`,
   :math:`\bar\nu = \frac1N \sum_k \nu_k`, the global one the server averaged from
   the clients' weight vectors (so the clients exchange :math:`M` numbers, not queries);
   :math:`\phi(x) = \sqrt{2/M}\cos(W^\top x + b)` with :math:`W \sim N(0, \ell_\text{rff}^{-2})`,
   :math:`b \sim U[0, 2\pi)` shared by all clients;
3. steps the optimizer (Adam(0.01) in the official runs) on that direction,
   queries the new point, and (except after the last step) queries
   ``explore`` (5) points chosen among ``explore_candidates`` (100) uniform in a box
   of half-width ``explore_radius`` (0.01) around it: those where the GP's
   gradient is the most uncertain.

At each dispatch the client first queries the model it received and
``rff_queries`` (50) uncertain points among ``rff_candidates`` (200) around it
(box half-width: half the mean absolute distance between that model and the client's
previous local result, ``rff_radius`` at its first dispatch), then fits its RFF
weights :math:`\nu_k` by least squares (min-norm; ridge ``rff_ridge``) on the
``rff_max_queries`` (500) history points nearest the received model; on its first
dispatch it also queries ``init_queries`` (10) points around it. The server
averages the models (FedAvg, uniform weights) and the :math:`\nu_k`.

What differs from the official code, and why:

- the RFF weights a client uses in round :math:`r` are those fitted at the start
  of its previous dispatch (the official code runs an extra exchange after each
  server step to fit them at the new model; the simulator has one exchange per
  round, so the correction lags one round);
- the GP lengthscale is the maximum-marginal-likelihood one over the grid
  ``lengthscales`` (the official code runs L-BFGS with 20 restarts), or a fixed one;
- the GP gradient is the closed form (the official code takes finite differences of the mean);
- the uncertain points maximize the trace of the GP posterior covariance of
  :math:`\nabla f` given the values (RBF kernel, the GP's lengthscale); the
  official code ranks by a first-coordinate expression that mixes derivative
  covariances with the inverse of the value kernel and shifts the base points;
- float32 throughout, hence noise :math:`\sigma^2 = 10^{-4}` and ridge :math:`10^{-4}`
  where the official float64 code uses :math:`10^{-6}` and 0;
- the server does not undo a step that increases the global objective (the
  official server evaluates :math:`F` for that, outside the query count);
- the history is a ring buffer of the last ``history`` queries per client (the
  official keeps all; only the nearest 150/500 are ever used). The simulator
  has no client-side memory, so the histories ride in the server rule's state
  (indexed by client id, rewritten from the clients' ``aux``, never read by the
  server step itself). Use it with ``SyncRound`` (under asynchronous triggers the
  simulator would copy the whole table into every in-flight slot).

Usage::

    value_fn = fl.client_objective(loss_fn, clients)
    local = fl.fzoos_local_update(value_fn, optax.adam(0.01), num_features=2000)
    sim = fl.FederatedSimulator(local, fl.fzoos(num_clients=5, num_features=2000), fl.SyncRound(5),
                                num_clients=5, local_steps=10, client_context=fl.fzoos_context)
    state, _ = sim.run(sim.init(params), 30)
    fl.query_count(state.rule_state)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated._checks import check_int, check_real
from jaxopt_lab.distributed.federated.aggregate import WEIGHTINGS, _leading, weighted_sum
from jaxopt_lab.distributed.federated.local import _key_data

DEFAULT_LENGTHSCALES = tuple(float(v) for v in np.logspace(-2, 2, 13))
_S_INIT, _S_RFF, _S_STEP = 0x1A1, 0x2B2, 0x3C3  # counters of the clients' random streams


class FZooSState(NamedTuple):
    """The clients' query histories and RFF surrogates (by client id), and the query count."""

    history_x: jax.Array  # (N, H, d) float32: ring buffer of queried points
    history_y: jax.Array  # (N, H): their values
    history_n: jax.Array  # (N,) int32: queries written so far (next slot: n % H)
    nu: jax.Array  # (N, M): each client's latest RFF weights (value scale)
    has_nu: jax.Array  # (N,) bool
    queries: jax.Array  # int32: queries made by the consumed client updates
    count: jax.Array  # int32: server steps


def fzoos_context(rule_state):
    """``client_context`` for FZooS: the (first) :class:`FZooSState` in ``rule_state`` and :math:`\\bar\\nu`."""
    found = [s for s in jax.tree.leaves(rule_state, is_leaf=lambda x: isinstance(x, FZooSState))
             if isinstance(s, FZooSState)]
    if not found:
        raise ValueError("fzoos_context: the rule state holds no FZooSState (is the rule fzoos()?)")
    s = found[0]
    w = s.has_nu.astype(s.nu.dtype)
    nu_bar = (w @ s.nu) / jnp.maximum(w.sum(), 1.0)
    return {"history_x": s.history_x, "history_y": s.history_y, "history_n": s.history_n, "nu": s.nu,
            "has_nu": s.has_nu, "nu_bar": nu_bar, "any_nu": jnp.any(s.has_nu)}


def scale_by_fzoos(num_clients: int, *, num_features: int = 10000, history: int = 1000,
                   weighting: str = "uniform") -> optax.GradientTransformationExtraArgs:
    """The FZooS server: the mean pseudo-gradient, and the clients' histories and RFF weights stored by id.

    Reads ``mask``, ``client_ids``, ``num_examples`` and ``client_aux`` (from :func:`fzoos_local_update`).
    ``num_features`` and ``history`` must be the clients'.
    """
    n = check_int("num_clients", num_clients, 1)
    m = check_int("num_features", num_features, 1)
    h = check_int("history", history, 1)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    def init_fn(params):
        d = ravel_pytree(params)[0].shape[0]
        return FZooSState(jnp.zeros((n, h, d), jnp.float32), jnp.zeros((n, h), jnp.float32),
                          jnp.zeros((n,), jnp.int32), jnp.zeros((n, m), jnp.float32), jnp.zeros((n,), bool),
                          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        del params
        size = _leading(updates)
        aux = extra.get("client_aux")
        need = ("history_x", "history_y", "history_n", "nu", "queries")
        if aux is None or any(k not in aux for k in need):
            raise ValueError("fzoos needs client_aux from fzoos_local_update: run it with "
                             "FederatedSimulator(..., client_context=fzoos_context)")
        if aux["nu"].shape[-1] != m or aux["history_x"].shape[-2] != h:
            raise ValueError(f"fzoos(num_features={m}, history={h}) does not match the clients' "
                             f"(num_features={aux['nu'].shape[-1]}, history={aux['history_x'].shape[-2]})")
        mask = extra.get("mask")
        mask = jnp.ones((size,), bool) if mask is None else jnp.asarray(mask, bool)
        counts = extra.get("num_examples") if weighting == "examples" else None
        counts = jnp.ones((size,), jnp.float32) if counts is None else jnp.asarray(counts, jnp.float32)
        base = jnp.where(mask, counts, 0.0)
        weights = base / jnp.maximum(base.sum(), 1e-30)
        direction = weighted_sum(updates, weights, mask)
        ids = extra.get("client_ids")
        ids = jnp.arange(size) if ids is None else jnp.asarray(ids, jnp.int32)
        at = jnp.where(mask, ids, n)  # out of range: not written
        put = lambda t, v: t.at[at].set(v.astype(t.dtype), mode="drop")  # noqa: E731
        q = jnp.sum(jnp.where(mask, jnp.asarray(aux["queries"], jnp.int32), 0))
        return direction, FZooSState(put(state.history_x, aux["history_x"]), put(state.history_y, aux["history_y"]),
                                     put(state.history_n, aux["history_n"]), put(state.nu, aux["nu"]),
                                     state.has_nu.at[at].set(True, mode="drop"), state.queries + q, state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fzoos(learning_rate: optax.ScalarOrSchedule = 1.0, *, num_clients: int, num_features: int = 10000,
          history: int = 1000, weighting: str = "uniform") -> optax.GradientTransformationExtraArgs:
    """FZooS's server rule: ``chain(scale_by_fzoos(...), sgd(learning_rate))`` (official global step :math:`\\eta = 1`)."""
    return optax.chain(scale_by_fzoos(num_clients, num_features=num_features, history=history, weighting=weighting),
                       optax.sgd(learning_rate))


# ------------------------------------------------------------------ surrogates

def _matern52(r, ell):
    s = jnp.sqrt(5.0) * r / ell
    return (1.0 + s + s * s / 3.0) * jnp.exp(-s)


def _pairwise_sq(a, b):
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T, 0.0)


def _masked_gram(kmat, valid, noise):
    """K on the valid rows/columns, identity on the others, plus noise on the diagonal."""
    vv = valid[:, None] & valid[None, :]
    return jnp.where(vv, kmat, 0.0) + jnp.diag(jnp.where(valid, noise, 1.0))


def gp_surrogate_gradient(x, xs, ys, valid, lengthscales, noise):
    r"""Gradient at ``x`` of the GP posterior mean (Matérn-5/2) fitted to ``(xs, ys)`` (rows with ``valid``).

    Values are min-max normalized for the fit and the gradient scaled back; the
    lengthscale is the marginal-likelihood maximizer over ``lengthscales``.

    Returns:
      ``(gradient, lengthscale)``.
    """
    ymin = jnp.min(jnp.where(valid, ys, jnp.inf))
    ymax = jnp.max(jnp.where(valid, ys, -jnp.inf))
    rng = ymax - ymin
    yt = jnp.where(valid, (ys - ymin) / (rng + 1e-20), 0.0)
    xc, xsc = jnp.zeros_like(x), xs - x  # centred at x (float32: small differences stay exact)
    r = jnp.sqrt(_pairwise_sq(xsc, xsc) + 1e-30)
    ells = jnp.asarray(lengthscales, x.dtype)

    def fit(ell):
        kmat = _masked_gram(_matern52(r, ell), valid, noise)
        chol = jnp.linalg.cholesky(kmat)
        alpha = jax.scipy.linalg.cho_solve((chol, True), yt)
        lml = -0.5 * yt @ alpha - jnp.sum(jnp.log(jnp.diagonal(chol)))
        return jnp.where(jnp.isfinite(lml), lml, -jnp.inf), alpha

    lmls, alphas = jax.vmap(fit)(ells)
    best = jnp.argmax(lmls)
    ell, alpha = ells[best], alphas[best]
    diff = xc[None, :] - xsc  # x - x_j
    rx = jnp.sqrt(jnp.sum(diff * diff, 1) + 1e-30)
    s = jnp.sqrt(5.0) * rx / ell
    dk = -(5.0 / (3.0 * ell * ell)) * (1.0 + s) * jnp.exp(-s)  # dk/dx = dk * (x - x_j)
    g = (jnp.where(valid, alpha * dk, 0.0) @ diff) * rng
    return jnp.where(jnp.isfinite(g), g, 0.0), ell


def gradient_uncertainty(cands, xs, valid, ell, noise):
    r"""Trace of the posterior covariance of :math:`\nabla f` at each candidate, given values at ``xs``
    (RBF kernel, unit amplitude, lengthscale ``ell``):
    :math:`d/\ell^2 - \ell^{-4}\sum_{jl} k_j A_{jl} k_l (c - x_j)^\top (c - x_l)`, :math:`A = (K + \sigma^2 I)^{-1}`."""
    d = xs.shape[1]
    kmat = _masked_gram(jnp.exp(-_pairwise_sq(xs, xs) / (2 * ell * ell)), valid, noise)
    a = jnp.linalg.inv(kmat)
    a = jnp.where(valid[:, None] & valid[None, :], a, 0.0)
    gram = xs @ xs.T

    def one(c):
        k = jnp.where(valid, jnp.exp(-jnp.sum((c - xs) ** 2, 1) / (2 * ell * ell)), 0.0)
        ak = a @ k
        cx = xs @ c
        quad = (c @ c) * (k @ ak) - 2.0 * jnp.sum(cx * ak * k) + k @ ((a * gram) @ k)
        return d / ell**2 - quad / ell**4

    return jax.vmap(one)(cands)


def _nearest(hx, valid, x, k):
    d2 = jnp.where(valid, jnp.sum((hx - x) ** 2, 1), jnp.inf)
    neg, idx = jax.lax.top_k(-d2, k)
    return idx, jnp.isfinite(neg)


def fzoos_local_update(
    value_fn: Callable[[Any, jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    num_features: int = 10000,
    history: int = 1000,
    max_queries: int = 150,
    lengthscales: float | Sequence[float] = DEFAULT_LENGTHSCALES,
    noise: float = 1e-4,
    explore: int = 5,
    explore_candidates: int = 100,
    explore_radius: float = 0.01,
    init_queries: int = 10,
    init_radius: float = 0.01,
    rff_queries: int = 50,
    rff_candidates: int = 200,
    rff_radius: float = 0.02,
    rff_max_queries: int = 500,
    rff_lengthscale: float = 1.0,
    rff_ridge: float = 1e-4,
    feature_seed: int = 0,
    correction: bool = True,
):
    r"""FZooS's client: ``local_update(params, client_id, num_steps, key, context) -> (params, aux)``.

    ``aux`` holds the client's updated history, its new RFF weights and ``queries``
    (the function values it queried in this dispatch). See the module docstring
    for the algorithm and its defaults (the official code's).

    Args:
      value_fn: ``(params, client_id) -> scalar``: one query (e.g. :func:`client_objective`).
      optimizer: on the surrogate gradient, over the flattened parameters (official: ``optax.adam(0.01)``).
      num_features: :math:`M` random Fourier features (official: 10000).
      history: ring-buffer size of each client's query history (>= ``rff_max_queries``).
      max_queries: history points nearest :math:`x` the local GP is fitted to.
      lengthscales: the GP lengthscale, or a grid to choose it from by marginal likelihood.
      noise: GP noise variance :math:`\sigma^2` (values normalized to [0, 1]).
      explore, explore_candidates, explore_radius: exploration after each local step but the last.
      init_queries, init_radius: exploration at a client's first dispatch.
      rff_queries, rff_candidates, rff_radius, rff_max_queries: the RFF fit at the received model
        (``rff_radius``: the box half-width at the first dispatch; later, half the mean absolute
        distance from the received model to the client's previous local result).
      rff_lengthscale: :math:`\ell_\text{rff}` (official: 1).
      rff_ridge: ridge of the RFF least squares (relative to the mean diagonal of the feature Gram).
      feature_seed: seed of :math:`W, b` (all clients and the server share them).
      correction: ``False``: no adaptive correction (the trajectory-informed surrogate alone).
    """
    m = check_int("num_features", num_features, 1)
    h = check_int("history", history, 1)
    kq = check_int("max_queries", max_queries, 1)
    rq = check_int("rff_max_queries", rff_max_queries, 1)
    if h < max(kq, rq):
        raise ValueError(f"history ({h}) must be >= max_queries ({kq}) and rff_max_queries ({rq})")
    ells = (float(lengthscales),) if np.ndim(lengthscales) == 0 else tuple(float(v) for v in lengthscales)
    if not ells or min(ells) <= 0:
        raise ValueError(f"lengthscales must be > 0, got {lengthscales!r}")
    noise = check_real("noise", noise)
    if not noise > 0:
        raise ValueError(f"noise must be > 0, got {noise}")
    n_exp = check_int("explore", explore, 0)
    n_cand = check_int("explore_candidates", explore_candidates, max(n_exp, 1))
    n_init = check_int("init_queries", init_queries, 0)
    n_rff = check_int("rff_queries", rff_queries, 0)
    n_rcand = check_int("rff_candidates", rff_candidates, max(n_rff, 1))
    for name, v in (("explore_radius", explore_radius), ("init_radius", init_radius), ("rff_radius", rff_radius),
                    ("rff_lengthscale", rff_lengthscale)):
        if not check_real(name, v) > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    rff_ridge = check_real("rff_ridge", rff_ridge)
    if rff_ridge < 0:
        raise ValueError(f"rff_ridge must be >= 0, got {rff_ridge}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
    feature_seed = check_int("feature_seed", feature_seed, 0)
    features: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def rff(d):
        if d not in features:
            g = np.random.default_rng(feature_seed)
            features[d] = ((g.standard_normal((d, m)) / rff_lengthscale).astype(np.float32),
                           g.uniform(0.0, 2 * np.pi, m).astype(np.float32))
        return features[d]

    def local_update(params, client_id, num_steps, key, ctx):
        x0, unravel = ravel_pytree(params)
        d = x0.shape[0]
        hist = ctx["history_x"]
        if hist.shape[1:] != (h, d) or ctx["nu"].shape[1] != m:
            raise ValueError(f"fzoos_local_update(history={h}, num_features={m}) does not match the rule's state "
                             f"(history={hist.shape[1]}, num_features={ctx['nu'].shape[1]}); pass the same to fzoos()")
        w_rff, b_rff = (jnp.asarray(a) for a in rff(d))
        kd = _key_data(key)
        f = lambda z: value_fn(unravel(z), client_id).astype(jnp.float32)  # noqa: E731
        fv = jax.vmap(f)
        n0 = ctx["history_n"][client_id]
        buf = (hist[client_id], ctx["history_y"][client_id], n0)

        def valid(b):
            return jnp.arange(h) < b[2]

        def add(b, xs, on):
            """Queries the rows of xs where on, appending them to the ring buffer."""
            ys = fv(xs)
            pos = jnp.where(on, (b[2] + jnp.cumsum(on) - 1) % h, h)
            return (b[0].at[pos].set(xs, mode="drop"), b[1].at[pos].set(ys, mode="drop"),
                    b[2] + jnp.sum(on).astype(jnp.int32))

        def box(center, radius, num, counter):
            u = _rng.uniform(kd, counter, size=num * d).reshape(num, d)
            return center[None] + radius * (2.0 * u - 1.0)

        def pick_uncertain(b, x, cands, num):
            idx, ok = _nearest(b[0], valid(b), x, kq)
            xs = b[0][idx] - x
            _, ell = gp_surrogate_gradient(jnp.zeros_like(x), xs, b[1][idx], ok, ells, noise)
            var = gradient_uncertainty(cands - x, xs, ok, ell, noise)
            return cands[jax.lax.top_k(var, num)[1]]

        def rff_grad(x, nu):
            return -jnp.sqrt(2.0 / m) * (w_rff @ (jnp.sin(x @ w_rff + b_rff) * nu))

        # the radius of the RFF exploration: half the mean |x0 - previous local result| (the last query written)
        prev = buf[0][(n0 - 1) % h]
        radius = jnp.where(n0 > 0, 0.5 * jnp.mean(jnp.abs(x0 - prev)), rff_radius)
        radius = jnp.where(radius > 0, radius, rff_radius)
        # first dispatch: initial exploration; then the received model and the RFF fit's queries
        if n_init:
            buf = add(buf, box(x0, init_radius, n_init, _S_INIT), jnp.full((n_init,), n0 == 0))
        buf = add(buf, x0[None], jnp.ones((1,), bool))
        if n_rff:
            cands = box(x0, radius, n_rcand, _S_RFF)
            buf = add(buf, pick_uncertain(buf, x0, cands, n_rff), jnp.ones((n_rff,), bool))
        idx, ok = _nearest(buf[0], valid(buf), x0, rq)
        ys = buf[1][idx]
        ymin = jnp.min(jnp.where(ok, ys, jnp.inf))
        yrng = jnp.max(jnp.where(ok, ys, -jnp.inf)) - ymin
        phi = jnp.where(ok[:, None], jnp.sqrt(2.0 / m) * jnp.cos(buf[0][idx] @ w_rff + b_rff), 0.0)
        yt = jnp.where(ok, (ys - ymin) / (yrng + 1e-20), 0.0)
        gram = phi @ phi.T
        lam = rff_ridge * jnp.trace(gram) / jnp.maximum(ok.sum(), 1) + 1e-12
        gram = gram + jnp.diag(jnp.where(ok, lam, 1.0))
        nu_new = phi.T @ jnp.linalg.solve(gram, yt) * yrng

        use = jnp.asarray(correction) & ctx["any_nu"] & ctx["has_nu"][client_id]
        nu_bar, nu_own = ctx["nu_bar"], ctx["nu"][client_id]

        def step(t, carry):
            x, opt_state, b = carry
            idx, ok = _nearest(b[0], valid(b), x, kq)
            g, ell = gp_surrogate_gradient(x, b[0][idx], b[1][idx], ok, ells, noise)
            corr = rff_grad(x, nu_bar) - rff_grad(x, nu_own)
            g = g + jnp.where(use, 1.0 / (t + 1.0), 0.0) * corr
            updates, opt_state = optimizer.update(g, opt_state, x)
            x_new = optax.apply_updates(x, updates)
            b = add(b, x_new[None], jnp.ones((1,), bool))
            if n_exp:
                xs = b[0][idx] - x_new
                cands = box(x_new, explore_radius, n_cand, _S_STEP + t) - x_new
                var = gradient_uncertainty(cands, xs, ok, ell, noise)
                picks = cands[jax.lax.top_k(var, n_exp)[1]] + x_new
                b = add(b, picks, jnp.full((n_exp,), t < num_steps - 1))
            return x_new, opt_state, b

        x, _, buf = jax.lax.fori_loop(0, num_steps, step, (x0, optimizer.init(x0), buf))
        aux = {"history_x": buf[0], "history_y": buf[1], "history_n": buf[2], "nu": nu_new,
               "queries": (buf[2] - n0).astype(jnp.int32)}
        return unravel(x), aux

    return local_update
