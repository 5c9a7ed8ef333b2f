r"""FedLEx: federated loss exploration, a global guidance matrix that scales the clients' gradients.

Internò, Olhofer, Jin & Hammer, "Federated Loss Exploration for Improved Convergence
on Non-IID Data" (IJCNN 2024), https://arxiv.org/abs/2506.18640; official code:
https://github.com/ChristianInterno/FedLEx (``src/client/fedlexclient.py``,
``src/GTL_utils.py``, ``src/server/fedlexserver.py``).

**Exploration** (once, before training): a fraction of the clients (the *explorers*,
official ``--perc_clients_for_mask``) each train the base model :math:`\theta_b` for
``E_exp`` local epochs (official ``--epoochs_mask`` = 1) and send back their models
:math:`\theta_i`. The server builds, per parameter tensor :math:`l`, the *learning spread*

.. math::

   s_l = \frac{1}{|E|}\sum_{i \in E} (\theta_{i,l} - \theta_{b,l})^{\odot 2},
   \qquad G_l = \frac{s_l - \min s_l}{\max s_l - \min s_l}

(min-max over the tensor's entries, official ``--guidence_normalization MinMax``;
``normalization="robust"``: :math:`(s_l - \operatorname{median})/\mathrm{IQR}`).

**Training**: FedAvg (official aggregation: weights by example counts, a server SGD
step), where every client multiplies each local gradient elementwise by :math:`G`
before its optimizer step: :math:`x_{k+1} = x_k - \eta_l\, G \odot \nabla f_i(x_k; B_k)`.

:math:`G` sits in the server rule's state (:class:`FedLExState`) and reaches the
clients as the simulator's ``client_context`` (:func:`fedlex_context`), like FedAMD's
control variate. Usage::

    explore = fl.make_local_update(loss_fn, clients, optax.sgd(0.1), batch_size=16)
    G = fl.fedlex_guidance(explore, params, explorer_ids, fl.epoch_steps(sizes, 16)[explorer_ids], seed=0)
    local = fl.fedlex_local_update(loss_fn, clients, optax.sgd(0.1), batch_size=16)
    sim = fl.FederatedSimulator(local, fl.fedlex(G), fl.SyncRound(10), num_clients=100,
                                local_steps=..., client_context=fl.fedlex_context)

What differs from the official code, and why:

- the base :math:`\theta_b` is the model the explorers start from (the server's initial
  model by default). The official code first trains a ``tl_base`` copy one epoch on the
  first explorer's data, but trains the *same* module object in place for every
  explorer (``mask = model.train()`` returns the model itself), so its explorers are not
  independent; we keep the paper's description: independent explorers from one model;
- the clients multiply their gradients by :math:`G`, as the paper describes; the version of
  ``fedlexclient.py`` we read (commit 23c3074) loads ``checkpoints/tl_base<exp>.ckpt`` (the base
  model's weights) as the multiplier instead of the saved ``mask<exp>.pt``, which we take for a slip;
- a fixed ``E_exp`` epochs, without the official early stopping on the last batch's loss
  (``--Patience_mask``; a host-side decision that a fixed-length compiled loop cannot make);
- a tensor whose spread is constant (e.g. all zeros) gets :math:`G_l = 1` instead of the
  official 0/0 = NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated.fedavg import fedavg
from jaxopt_lab.distributed.federated.local import ClientData, ClientWalk

NORMALIZATIONS = ("minmax", "robust")
_EXPLORE_STREAM = 0x4C4558  # key counter of the explorers' training keys


class FedLExState(NamedTuple):
    """The global guidance matrix (a pytree like the params), held by the server rule."""

    guidance: Any


def fedlex_context(rule_state):
    """The ``client_context`` of :class:`FederatedSimulator` for FedLEx: the guidance :math:`G`
    of the :class:`FedLExState` in ``rule_state``."""
    found = [s for s in jax.tree.leaves(rule_state, is_leaf=lambda x: isinstance(x, FedLExState))
             if isinstance(s, FedLExState)]
    if not found:
        raise ValueError("fedlex_context: the rule state holds no FedLExState (is the rule fedlex()?)")
    return found[0].guidance


def guidance_from_models(base, explored, normalization: str = "minmax"):
    r""":math:`G` from the explorers' models ``explored`` (leading axis: explorers) and the base model."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def one(b, e):
        s = jnp.mean(jnp.square(e - b[None]), axis=0)
        if normalization == "minmax":
            lo, spread = jnp.min(s), jnp.max(s) - jnp.min(s)
        else:
            lo = jnp.median(s)
            spread = jnp.quantile(s, 0.75) - jnp.quantile(s, 0.25)
        return jnp.where(spread > 0, (s - lo) / jnp.where(spread > 0, spread, 1.0), 1.0).astype(b.dtype)

    return jax.tree.map(one, base, explored)


def fedlex_guidance(local_update: Callable, params, explorer_ids, num_steps, seed: int = 0,
                    normalization: str = "minmax"):
    """The exploration phase: trains the explorers from ``params`` and returns :math:`G`.

    Args:
      local_update: a plain client ``(params, client_id, num_steps, key) -> params``
        (:func:`~jaxopt_lab.distributed.federated.make_local_update`).
      params: the base model :math:`\\theta_b` (the server's initial model).
      explorer_ids: the exploring clients (int array).
      num_steps: local steps of each explorer (int or per explorer), e.g. one epoch.
      seed: seeds the explorers' training keys.
      normalization: ``"minmax"`` (official default) or ``"robust"``.
    """
    ids = np.asarray(explorer_ids, np.int32).reshape(-1)
    if ids.size == 0:
        raise ValueError("explorer_ids must name at least one client")
    steps = np.broadcast_to(np.asarray(num_steps, np.int32), ids.shape)
    if (steps < 0).any():
        raise ValueError(f"num_steps must be >= 0, got {steps.min()}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    root = np.array([0, int(seed) & 0xFFFFFFFF], np.uint32)

    @jax.jit
    def explore(p, ids, steps):
        keys = jax.vmap(lambda i: _rng.key_data(root, _EXPLORE_STREAM, i))(jnp.arange(ids.shape[0]))
        out = jax.vmap(local_update, in_axes=(None, 0, 0, 0))(p, ids, steps, keys)
        return guidance_from_models(p, out, normalization)

    return explore(params, jnp.asarray(ids), jnp.asarray(steps))


def scale_by_fedlex(guidance) -> optax.GradientTransformation:
    """Holds :math:`G` in its state (:class:`FedLExState`) and passes the updates through."""

    def init_fn(params):
        del params
        return FedLExState(jax.tree.map(jnp.asarray, guidance))

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def fedlex(guidance, learning_rate: optax.ScalarOrSchedule = 1.0, momentum: float | None = None,
           weighting: str = "examples") -> optax.GradientTransformationExtraArgs:
    """FedLEx's server rule: ``chain(scale_by_fedlex(G), fedavg(learning_rate, momentum, weighting=weighting))``.

    Run it with :func:`fedlex_local_update` clients and ``client_context=fedlex_context``.
    """
    return optax.chain(scale_by_fedlex(guidance), fedavg(learning_rate, momentum, weighting=weighting))


def fedlex_local_update(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    data: ClientData,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    *,
    shuffle: bool = True,
):
    """FedLEx's client: ``local_update(params, client_id, num_steps, key, G) -> (params, {})``: local
    minibatch training as :func:`~jaxopt_lab.distributed.federated.make_local_update`, each gradient
    multiplied elementwise by ``G`` before ``optimizer``. ``G`` of ones is FedAvg's client exactly."""
    walk = ClientWalk(data, optimizer, batch_size, shuffle)
    grad = jax.grad(functools.partial(walk.mean_loss, loss_fn))

    def local_update(params, client_id, num_steps, key, guidance):
        rows, n = walk.rows(client_id, key)

        def step(s, carry):
            p, opt_state = carry
            idx, valid = walk.batch(rows, n, s)
            g = jax.tree.map(lambda gg, m: gg * m.astype(gg.dtype), grad(p, idx, valid), guidance)
            updates, opt_state = optimizer.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        out, _ = jax.lax.fori_loop(0, num_steps, step, (params, optimizer.init(params)))
        return out, {}

    return local_update
