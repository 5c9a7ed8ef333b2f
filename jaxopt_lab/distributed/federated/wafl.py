r"""WAFL: Wasserstein distributionally robust federated learning, a client algorithm.

Nguyen, Nguyen, Le, Dinh & Tran, "On the Generalization of Wasserstein Robust
Federated Learning" (2022), https://arxiv.org/abs/2206.01432; official code
https://github.com/dual-grp/WAFL (``FLAlgorithms/users/userWAFL.py`` and
``userbase.py: wasssertein``).

WAFL minimizes the worst-case risk over a Wasserstein ball around the clients'
mixture distribution. By duality (penalty :math:`\gamma` instead of the radius)
it becomes the empirical *surrogate risk*

.. math::

   \min_\theta \sum_k \frac{n_k}{n} \frac{1}{n_k}\sum_{i \in D_k} \phi_\gamma(\theta; z_i),
   \qquad
   \phi_\gamma(\theta; (x, y)) = \sup_{x'} \; \ell(\theta; x', y) - \frac{\gamma}{2}\lVert x' - x \rVert^2,

solved by local SGD: each local step first approximates every example's inner
maximizer by a few steps of gradient *ascent* on the inputs (the labels are
kept),

.. math::

   x'_0 = x, \qquad x'_{s+1} = x'_s + \alpha \left(\nabla_{x'} \ell(\theta; x'_s, y) - \gamma (x'_s - x)\right),

then takes an optimizer step on :math:`\nabla_\theta \frac1B \sum_i \ell(\theta; x'_i, y_i)`
(Danskin: the gradient of :math:`\phi_\gamma` at the maximizer). The server is
FedAvg (:func:`~jaxopt_lab.distributed.federated.fedavg`). With
:math:`\gamma \to \infty` (or zero ascent steps) the perturbation vanishes and
WAFL is FedAvg.

Defaults are those of the official code: ``ascent_steps=10``, ascent step
:math:`\alpha = 10` on the per-example objective (the code steps
``alpha * len(X)`` along the gradient of the batch *mean*), the penalty
:math:`\frac{\gamma}{2}\lVert x'-x\rVert^2`, and the ascent of a batch stops early
(after applying the step) once the norm of the batch-mean objective's input
gradient falls below ``tol = 1e-4``. The official client uses plain SGD and
one optimizer step per minibatch; any optax optimizer works here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.distributed.federated._checks import check_int, check_real
from jaxopt_lab.distributed.federated.local import ClientData, ClientWalk


def wasserstein_perturb(loss_fn, params, x, y, valid, gamma, ascent_steps: int, ascent_lr, tol=1e-4):
    r"""Approximate inner maximizers :math:`x'_i` of :math:`\ell(\theta; x', y_i) - \frac{\gamma}{2}\lVert x' - x_i\rVert^2`.

    ``ascent_steps`` steps :math:`x' \leftarrow x' + \alpha(\nabla_{x'}\ell - \gamma(x' - x))`
    from :math:`x' = x`, per example (rows with ``valid`` False are left
    alone), stopping (after the step) once
    :math:`\lVert \frac{1}{B}(\nabla_{x'}\ell - \gamma (x' - x)) \rVert < \text{tol}`
    over the batch's B valid rows (the official stopping rule).

    Args:
      loss_fn: ``(params, x_batch, y_batch) -> per-example losses``.
      params: the model.
      x, y: the batch (any input shape; the ascent acts on ``x``).
      valid: bool ``(batch,)`` mask of real rows.
      gamma: the penalty :math:`\gamma`.
      ascent_steps: number of ascent steps (static int; 0 returns ``x``).
      ascent_lr: the ascent step :math:`\alpha`.
      tol: early-stop threshold (``0`` never stops early).
    """
    if ascent_steps == 0:
        return x
    nb = jnp.maximum(valid.sum(), 1).astype(x.dtype)
    vmask = valid.reshape((-1,) + (1,) * (x.ndim - 1))

    def objective(xp):  # sum over valid rows of the per-example dual objective
        pen = 0.5 * gamma * jnp.sum((xp - x).reshape(x.shape[0], -1) ** 2, axis=1)
        return jnp.sum(jnp.where(valid, loss_fn(params, xp, y) - pen, 0.0))

    gfn = jax.grad(objective)

    def step(_, carry):
        xp, done = carry
        g = jnp.where(vmask, gfn(xp), 0.0)  # per-example gradients
        xp = jnp.where(done, xp, xp + ascent_lr * g)
        done = done | (jnp.sqrt(jnp.sum(g * g)) / nb < tol)
        return xp, done

    xp, _ = jax.lax.fori_loop(0, ascent_steps, step, (x, jnp.zeros((), bool)))
    return jax.lax.stop_gradient(xp)


def wafl_local_update(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    data: ClientData,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    gamma: float,
    *,
    ascent_steps: int = 10,
    ascent_lr: float = 10.0,
    tol: float = 1e-4,
    shuffle: bool = True,
):
    r"""WAFL's client: local SGD on the Wasserstein surrogate risk (module docstring).

    ``local_update(params, client_id, num_steps, key) -> params`` with the
    minibatch walk of :func:`~jaxopt_lab.distributed.federated.make_local_update`
    (same order and batches for the same key); each batch's inputs are first
    replaced by their approximate inner maximizers (:func:`wasserstein_perturb`).
    ``ascent_steps=0`` is exactly ``make_local_update`` (FedAvg's client).

    Args:
      loss_fn: ``(params, x_batch, y_batch) -> per-example losses``, differentiable in ``x_batch``.
      data: padded clients (:func:`~jaxopt_lab.distributed.federated.pad_clients`).
      optimizer: the client optimizer (``optax.sgd(lr)``: the official code).
      batch_size: local minibatch size.
      gamma: the Wasserstein penalty :math:`\gamma > 0` (larger: a smaller ball, closer to FedAvg).
      ascent_steps: inner gradient-ascent steps per minibatch (official: 10).
      ascent_lr: inner ascent step :math:`\alpha` on the per-example objective (official: 10).
      tol: stop a batch's ascent once the batch-mean input gradient's norm is below it (official: 1e-4).
      shuffle: shuffle each client's examples per dispatch.
    """
    gamma = check_real("gamma", gamma)
    if not gamma > 0:
        raise ValueError(f"WAFL gamma must be > 0, got {gamma}")
    ascent_steps = check_int("ascent_steps", ascent_steps, 0)
    ascent_lr = check_real("ascent_lr", ascent_lr)
    if not ascent_lr > 0:
        raise ValueError(f"ascent_lr must be > 0, got {ascent_lr}")
    tol = check_real("tol", tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    walk = ClientWalk(data, optimizer, batch_size, shuffle)

    def batch_loss(p, xb, yb, valid):
        losses = loss_fn(p, xb, yb)
        if losses.shape != valid.shape:
            raise ValueError(f"loss_fn must return per-example losses of shape {valid.shape}, got {losses.shape}")
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(valid.sum(), 1)

    grad = jax.grad(batch_loss)
    perturb = functools.partial(wasserstein_perturb, loss_fn, gamma=gamma, ascent_steps=ascent_steps,
                                ascent_lr=ascent_lr, tol=tol)

    def local_update(params, client_id, num_steps, key):
        rows, n = walk.rows(client_id, key)

        def step(s, carry):
            p, opt_state = carry
            idx, valid = walk.batch(rows, n, s)
            xb, yb = walk.x[idx], walk.y[idx]
            xadv = perturb(p, xb, yb, valid)
            grads = grad(p, xadv, yb, valid)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        out, _ = jax.lax.fori_loop(0, num_steps, step, (params, optimizer.init(params)))
        return out

    return local_update
