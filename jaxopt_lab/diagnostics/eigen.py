"""Largest Hessian eigenvalue by power iteration or Lanczos, from Hessian-vector products.

Lanczos, "An iteration method for the solution of the eigenvalue problem of
linear differential and integral operators", J. Res. Nat. Bur. Standards 45,
1950; full reorthogonalization as in Golub & Van Loan, "Matrix Computations"
(4th ed.), Sec. 10.3.1. Used for neural-network Hessians by Ghorbani, Krishnan
& Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
Density" (ICML 2019), https://arxiv.org/abs/1901.10159.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxopt_lab.diagnostics.hvp import _acc_dtype, _hvp_fn

PyTree = Any

METHODS = ("power", "lanczos")


def _check_num_iters(num_iters) -> int:
    try:
        k = operator.index(num_iters)
    except TypeError:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}") from None
    if k < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
    return k


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _normalize(x: jax.Array) -> jax.Array:
    n = jnp.linalg.norm(x)
    return x / jnp.where(n > 0, n, 1)


def _top_power(matvec, v0: jax.Array, v1: jax.Array, num_iters: int):
    """Largest algebraic eigenvalue with power iteration, in one loop of one product a step.

    Steps v <- (A - c I) v / |(A - c I) v| with shift c = 0 find the eigenvalue of
    largest magnitude, lam1. If lam1 < 0 after num_iters steps, every eigenvalue of
    A - lam1 I lies in [0, lam_max - lam1], so num_iters more steps with c = lam1
    from the fresh vector v1 find lam_max - lam1.
    """

    def step(carry):
        i, v, _, lam, shift = carry
        w = matvec(v) - shift * v
        lam = jnp.vdot(v, w)  # Rayleigh quotient of v for A - shift I
        n = jnp.linalg.norm(w)
        v_next = jnp.where(n > 0, w / jnp.where(n > 0, n, 1), v)
        switch = (i == num_iters - 1) & (lam < 0)
        return (
            i + 1,
            jnp.where(switch, v1, v_next),
            v,
            jnp.where(switch, 0, lam),
            jnp.where(switch, lam, shift),
        )

    def keep_going(carry):
        i, _, _, _, shift = carry
        return (i < num_iters) | ((shift != 0) & (i < 2 * num_iters))

    v0, v1 = _normalize(v0), _normalize(v1)
    zero = jnp.zeros((), v0.dtype)
    _, _, v, lam, shift = jax.lax.while_loop(keep_going, step, (0, v0, v0, zero, zero))
    return lam + shift, v


def _top_lanczos(matvec, v0: jax.Array, num_steps: int):
    """Largest Ritz value and vector of num_steps Lanczos steps with full reorthogonalization.

    A near-zero off-diagonal (the Krylov space became invariant) restarts the
    recursion from a vector orthogonal to all previous ones with a zero
    coupling, so T stays block tridiagonal and its eigenvalues stay eigenvalues
    of A.
    """
    n, dtype = v0.shape[0], v0.dtype
    k = min(num_steps, n)  # at most n orthonormal vectors exist
    eps = jnp.finfo(dtype).eps

    def reorthogonalize(Q, w):  # classical Gram-Schmidt twice ("twice is enough")
        w = w - Q.T @ (Q @ w)
        return w - Q.T @ (Q @ w)

    def body(j, carry):
        Q, alphas, betas = carry
        q = Q[j]
        w = matvec(q)
        w_norm = jnp.linalg.norm(w)
        a = jnp.vdot(q, w)
        prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0) * Q[jnp.maximum(j - 1, 0)]
        w = reorthogonalize(Q, w - a * q - prev)
        b = jnp.linalg.norm(w)

        def restart(_):
            # a rolled copy of the random start: generically outside the Krylov
            # space, and it keeps the random number generator out of the loop
            r = jnp.roll(v0, j + 1)
            return _normalize(reorthogonalize(Q, r)), jnp.zeros((), dtype)

        def proceed(_):
            return w / b, b

        q_next, b = jax.lax.cond(b <= 100 * eps * w_norm, restart, proceed, None)
        return Q.at[j + 1].set(q_next), alphas.at[j].set(a), betas.at[j].set(b)

    Q = jnp.zeros((k + 1, n), dtype).at[0].set(_normalize(v0))
    init = (Q, jnp.zeros((k,), dtype), jnp.zeros((k,), dtype))
    Q, alphas, betas = jax.lax.fori_loop(0, k, body, init)
    off = betas[: k - 1]
    T = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
    evals, evecs = jnp.linalg.eigh(T)
    return evals[-1], _normalize(Q[:k].T @ evecs[:, -1])


def top_eigenvalue(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    num_iters: int = 20,
    method: str = "lanczos",
    return_eigenvector: bool = False,
):
    r"""Largest (algebraic) eigenvalue :math:`\lambda_{\max}` of :math:`H = \nabla^2 L(\theta)`.

    Only Hessian-vector products are used (:func:`hvp`, never the Hessian);
    the iteration vectors are flat, via ``jax.flatten_util.ravel_pytree``.

    ``method="lanczos"`` (default): ``num_iters`` = :math:`k` Lanczos steps
    from a random start :math:`q_1`,

    .. math::
        w = H q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}, \quad
        \alpha_j = q_j^\top H q_j, \quad
        w \leftarrow (I - Q_j Q_j^\top)^2 w, \quad
        \beta_j = \lVert w\rVert, \quad q_{j+1} = w / \beta_j,

    with full reorthogonalization against all previous :math:`q` (memory
    :math:`(k+1) \times d`), then :math:`\lambda_{\max}(T_k)` of the
    tridiagonal :math:`T_k = \mathrm{tridiag}(\beta, \alpha, \beta)`. The Ritz
    value never exceeds :math:`\lambda_{\max}` and converges fast (about 20
    steps for well-separated top eigenvalues); :math:`k` is capped at :math:`d`.

    ``method="power"``: ``num_iters`` steps of :math:`v \leftarrow Hv/\lVert
    Hv\rVert`, returning the Rayleigh quotient :math:`v^\top H v`. That finds
    the eigenvalue of largest *magnitude* :math:`\lambda_1`; if
    :math:`\lambda_1 < 0`, ``num_iters`` more steps on :math:`H - \lambda_1 I`
    (spectrum in :math:`[0, \lambda_{\max} - \lambda_1]`) from a fresh
    random vector give :math:`\lambda_{\max} - \lambda_1`.
    The error shrinks like :math:`(\lambda_2/\lambda_1)^{2t}`, so it needs
    many more iterations than Lanczos when the top eigenvalues are close.

    Pure and jit-able with ``num_iters`` and ``method`` static.

    Args:
      loss_fn: ``params -> scalar``.
      params: pytree of floating arrays.
      key: ``jax.random`` key for the random start vector(s).
      num_iters: Lanczos steps or power iterations, an int >= 1.
      method: ``"lanczos"`` or ``"power"``.
      return_eigenvector: also return the unit eigenvector estimate.

    Returns:
      The scalar :math:`\lambda_{\max}` estimate, or ``(eigenvalue,
      eigenvector)`` with the eigenvector a pytree like ``params``.
    """
    k = _check_num_iters(num_iters)
    method = _check_method(method)
    flat, unravel = ravel_pytree(params)
    dtype = jnp.result_type(flat.dtype, _acc_dtype(params))
    h = _hvp_fn(loss_fn, params)

    def matvec(x):
        return ravel_pytree(h(unravel(x.astype(flat.dtype))))[0].astype(dtype)

    v0, v1 = jax.random.normal(key, (2, *flat.shape), dtype)
    if method == "power":
        lam, v = _top_power(matvec, v0, v1, k)
    else:
        lam, v = _top_lanczos(matvec, v0, k)
    if return_eigenvector:
        return lam, unravel(v.astype(flat.dtype))
    return lam
