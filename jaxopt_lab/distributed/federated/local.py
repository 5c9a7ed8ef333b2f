"""Client data padded to one shape, and the local training function the simulator vmaps.

The simulator only needs a pure function ``local_update(params, client_id,
num_steps, key) -> new_params`` (``client_id`` and ``num_steps`` are traced
int32 scalars; it is vmapped over the clients a server step trains, so it must
not branch in Python on them). :func:`make_local_update` builds one for the
common case: minibatch SGD (any optax optimizer, fresh state per dispatch) over
a client's examples, stored padded in a :class:`ClientData`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated._checks import check_int, check_real

LocalUpdate = Callable[[Any, jax.Array, jax.Array, jax.Array], Any]


class ClientData(NamedTuple):
    """Every client's examples padded to one shape.

    Attributes:
      x: ``(num_clients, max_size, ...)`` inputs; rows past a client's size are zeros.
      y: ``(num_clients, max_size, ...)`` targets, padded likewise.
      sizes: ``(num_clients,)`` int32 example counts.
    """

    x: jax.Array
    y: jax.Array
    sizes: jax.Array

    @property
    def num_clients(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def max_size(self) -> int:
        return int(self.x.shape[1])


def pad_clients(x, y, partition, multiple: int = 1) -> ClientData:
    """Gathers each client's examples into a padded ``ClientData``.

    Args:
      x: ``(num_examples, ...)`` inputs.
      y: ``(num_examples, ...)`` targets.
      partition: a :class:`jaxopt_lab.data.ClientPartition` or a sequence of
        per-client index arrays.
      multiple: pad the per-client length up to a multiple of this (e.g. the batch size).

    Returns:
      A :class:`ClientData` of jax arrays.
    """
    indices: Sequence[np.ndarray] = getattr(partition, "indices", partition)
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    multiple = check_int("multiple", multiple, 1)
    if len(indices) == 0:
        raise ValueError("partition must have at least one client")
    sizes = np.array([len(i) for i in indices], np.int32)
    max_size = max(int(sizes.max()), 1)
    max_size = -(-max_size // multiple) * multiple
    xs = np.zeros((len(indices), max_size) + x.shape[1:], x.dtype)
    ys = np.zeros((len(indices), max_size) + y.shape[1:], y.dtype)
    for k, idx in enumerate(indices):
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= x.shape[0]):
            raise ValueError(f"client {k} has an example index outside [0, {x.shape[0]})")
        xs[k, : idx.size] = x[idx]
        ys[k, : idx.size] = y[idx]
    return ClientData(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(sizes))


def epoch_steps(sizes, batch_size: int, epochs: int = 1) -> np.ndarray:
    """Local steps for ``epochs`` passes over each client's data: ``epochs * ceil(n_k / batch_size)``
    (0 for a client without data), int32 of shape ``(num_clients,)``."""
    batch_size = check_int("batch_size", batch_size, 1)
    epochs = check_int("epochs", epochs, 1)
    sizes = np.asarray(sizes, np.int64)
    return (epochs * (-(-sizes // batch_size))).astype(np.int32)


def make_local_update(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    data: ClientData,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    *,
    prox_mu: float = 0.0,
    shuffle: bool = True,
    curriculum=None,
) -> LocalUpdate:
    r"""Minibatch local training over padded client data, as the simulator wants it.

    ``local_update(params, client_id, num_steps, key)`` runs ``num_steps`` (a
    traced int) optimizer steps from ``params`` with a fresh ``optimizer`` state.
    The client's examples are shuffled once per call (a uniformly random order
    drawn from ``key``; or kept in order with ``shuffle=False``) and walked in batches of ``batch_size``; the
    last batch of a pass holds the remainder (its loss is the mean over the
    valid examples only), and a step past the end starts the next pass over the
    same order. So ``num_steps = ceil(n_k / batch_size)`` is one epoch
    (:func:`epoch_steps`). Under ``vmap`` the loop runs to the largest
    ``num_steps`` of the batch; lanes that are done are kept unchanged.

    With ``prox_mu`` :math:`= \mu > 0` each gradient gets the FedProx term
    :math:`\mu (w - \theta_\text{start})`.

    With ``curriculum`` (:func:`~jaxopt_lab.distributed.federated.curriculum`) the client
    orders its examples by difficulty (curriculum, anti-curriculum or random) and draws
    each minibatch from the paced prefix of that order instead of walking shuffled
    epochs (:mod:`~jaxopt_lab.distributed.federated.curriculum`; ``shuffle`` is then unused).

    Args:
      loss_fn: ``(params, x_batch, y_batch) -> per-example losses`` of shape ``(batch,)``.
      data: the padded clients (:func:`pad_clients`).
      optimizer: the client optimizer (e.g. ``optax.sgd(0.1)``).
      batch_size: local minibatch size.
      prox_mu: FedProx proximal coefficient (>= 0).
      shuffle: shuffle each client's examples per dispatch.
      curriculum: an ordered-learning option (:func:`~jaxopt_lab.distributed.federated.curriculum`), or None.

    Returns:
      ``local_update(params, client_id, num_steps, key) -> params``.
    """
    prox_mu = check_real("prox_mu", prox_mu)
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    walk = ClientWalk(data, optimizer, batch_size, shuffle)
    grad = jax.grad(functools.partial(walk.mean_loss, loss_fn))
    paced = None
    if curriculum is not None:
        from jaxopt_lab.distributed.federated.curriculum import CurriculumWalk

        paced = CurriculumWalk(curriculum, walk.max_size, int(data.sizes.shape[0]), walk.batch_size)

    def local_update(params, client_id, num_steps, key):
        rows, n = walk.rows(client_id, key)
        if paced is not None:
            kd = _key_data(key)
            own = client_id * walk.max_size + jnp.arange(walk.max_size)
            ranks = paced.ranks(client_id, n, kd, lambda: loss_fn(params, walk.x[own], walk.y[own]))

        def step(s, carry):
            p, opt_state = carry
            if paced is None:
                idx, valid = walk.batch(rows, n, s)
            else:
                r, valid = paced.batch(ranks, n, s, num_steps, kd)
                idx = client_id * walk.max_size + r
            grads = grad(p, idx, valid)
            if prox_mu:
                grads = jax.tree.map(lambda g, w, w0: g + prox_mu * (w - w0), grads, p, params)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        out, _ = jax.lax.fori_loop(0, num_steps, step, (params, optimizer.init(params)))
        return out

    return local_update


class ClientWalk:
    """How a local update reads one client's examples: a per-dispatch order, walked in minibatches.

    Shared by :func:`make_local_update` and FedAMD's client. ``rows(client_id,
    key)`` gives the client's example rows in the flattened data (shuffled
    uniformly from ``key`` with padding rows last, or in order) and its size
    ``n``; ``batch(rows, n, s)`` gives step ``s``'s row indices and validity
    mask: passes of ``ceil(n / batch_size)`` batches, the last one holding the
    remainder; ``mean_loss`` averages ``loss_fn`` over the valid rows only.
    """

    def __init__(self, data: ClientData, optimizer, batch_size: int, shuffle: bool):
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.shuffle = shuffle
        num_clients, self.max_size = int(data.sizes.shape[0]), int(data.x.shape[1])
        self.x = data.x.reshape((num_clients * self.max_size,) + data.x.shape[2:])
        self.y = data.y.reshape((num_clients * self.max_size,) + data.y.shape[2:])
        self.sizes = data.sizes

    def rows(self, client_id, key):
        n = self.sizes[client_id]
        if self.shuffle:  # padding rows sort last; a counter-based hash, not threefry (a loop on XLA:CPU)
            u = _rng.uniform(_key_data(key), size=self.max_size)
            order = jnp.argsort(u + (jnp.arange(self.max_size) >= n))
        else:
            order = jnp.arange(self.max_size)
        return client_id * self.max_size + order, n

    def batch(self, rows, n, s):
        per_pass = jnp.maximum((n + self.batch_size - 1) // self.batch_size, 1)
        pos = (s % per_pass) * self.batch_size + jnp.arange(self.batch_size)
        return rows[jnp.minimum(pos, self.max_size - 1)], pos < n

    def mean_loss(self, loss_fn, p, idx, valid):
        losses = loss_fn(p, self.x[idx], self.y[idx])
        if losses.shape != idx.shape:
            raise ValueError(f"loss_fn must return per-example losses of shape {idx.shape}, got {losses.shape}")
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(valid.sum(), 1)


def _key_data(key):
    """uint32 key data of a raw or typed PRNG key."""
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key
