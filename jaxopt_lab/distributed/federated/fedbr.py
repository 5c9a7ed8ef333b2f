r"""FedBR: local learning bias reduction (classifier output balancing, feature alignment min-max).

Guo, Tang, Lin, "FedBR: Improving Federated Learning on Heterogeneous Data via Local Learning
Bias Reduction" (ICML 2023), https://arxiv.org/abs/2205.13462; official code:
https://github.com/lins-lab/fedbr (``fedbr/algorithms.py`` class ``FedBR``,
``fedbr/scripts/train_fed.py``), which the defaults reproduce.

The model is split into a feature extractor :math:`f` and a head :math:`h` (logits
:math:`h(f(x))`); FedBR adds a discriminator (projection) :math:`D`, a 3-layer ReLU MLP
:math:`d \to 2d \to 2d \to d` on the features, which is part of the federated model (the
official server averages it with the rest; here ``params = {"model": ..., "discriminator": ...}``,
:func:`fedbr_init`). The client is sent :math:`(f_t, h_t, D_t)` and fixed pseudo-data
:math:`U` (P rows: each the mean of 10 random proxy images, drawn once before training,
:func:`fedbr_pseudo_data`). Local step k on minibatch :math:`(x_b, y_b)_{b\le B}`:

1. *pseudo-data mixed with local data*: for each :math:`i \le P` a random local row
   :math:`r_i`: :math:`\tilde u_i = (u_i + x_{r_i})/2`, target
   :math:`q_i = (\mathbf 1/C + e_{y_{r_i}})/2` (official ``get_unlabeled_by_self``, K = 1);
2. features :math:`z^u_i = f(\tilde u_i)`, :math:`z^s_b = f(x_b)` and the global features
   :math:`z^g_i = f_t(\tilde u_i)` of the received extractor (official: computed once, at the
   round's first step, from that step's mixed pseudo-data, then reused);
3. with :math:`e = D(\cdot)`, :math:`\operatorname{sim}` the cosine similarity and the
   contrastive log-ratio

   .. math:: \ell_i = \log \frac{\exp(\tau_1 \operatorname{sim}(e^u_i, e^g_i))}
      {\exp(\tau_1 \operatorname{sim}(e^u_i, e^g_i)) + \exp(\tau_2 \operatorname{sim}(e^u_i, e^s_i))},

   the discriminator step descends :math:`\gamma\,\frac1P \sum_i \ell_i` with the features
   held fixed (it *maximizes* the alignment loss), then the model step, with the updated
   :math:`D` held fixed, descends

   .. math:: \mathrm{CE}(h(z^s), y) + \mu\,\bigl(-\tfrac1P\textstyle\sum_i \ell_i\bigr)
      + \lambda\,\mathrm{CE}(h(z^u), q) + \delta\, \mathrm{Decorr}(z^s),

   :math:`\mathrm{Decorr}(z) = \operatorname{mean}\bigl((\hat z^\top \hat z / B)^2\bigr)` with
   :math:`\hat z` the per-feature z-scored :math:`z` (FedDecorr's loss, which the official
   update adds with :math:`\delta = 0.1`).

So :math:`\lambda` is the classifier output balancing (pseudo-data pushed towards balanced
outputs) and :math:`\mu` the feature alignment (pseudo-data features pulled towards the global
model's, away from the local data's); official values :math:`\mu = 0.5, \lambda = 1,
\gamma = 1, \tau_1 = \tau_2 = 2, \delta = 0.1`. With :math:`\mu = \lambda = \delta = 0` the model
step is plain minibatch SGD on the cross-entropy, the discriminator is not updated, and the
client equals :func:`~jaxopt_lab.distributed.federated.make_local_update`'s.

Differences from the official code, all forced by the setting or options:

- the official client trains on ``minibatches = [one batch]``, so its mixup of pairs of
  minibatches (``get_new_all_x``) mixes the batch with itself: the identity; not implemented;
- the official negative pairs :math:`e^u_i` with :math:`e^s_i`, row for row (it needs
  P = B = 32); here the pseudo row i is paired with the batch's valid row :math:`i \bmod B_\text{valid}`,
  so any P works (equal to the official pairing when P = B and the batch is full);
- the discriminator and the model share ``optimizer`` (the official uses the same SGD,
  momentum 0.9, for both), with separate fresh states per dispatch (the official clients copy
  the server's never-stepped optimizers each round); ``disc_optimizer`` may differ;
- ``refresh_global_features=True`` computes :math:`z^g` from each step's own mixed pseudo-data
  (the paper's reading) instead of reusing the first step's (official);
- the proxy pseudo-data: the official uses means of CIFAR-10 images for CIFAR tasks; with no
  proxy set at hand, :func:`fedbr_pseudo_data` averages rows of whatever pool it is given (the
  commented-out official ``get_augmentation_mean_data`` averaged client data).

Use with the FedAvg server (``fl.fedavg(1.0, weighting="uniform")`` is the official uniform
average) and an ``eval_fn`` that reads ``params["model"]``; or keep the simulator's params the
model's alone with :func:`fedbr_server` (the discriminator in the rule's state, sent as the
``client_context``) and :func:`fedbr_context_client` (what ``experiments/fed_heterogeneity.toml`` runs)::

    local = fl.fedbr_local_update(features_fn, head_fn, clients, optax.sgd(0.05), 8, pseudo, num_classes=10)
    rule, context = fl.fedbr_server(fl.fedbr_discriminator_init(128, jax.random.key(0)))
    sim = fl.FederatedSimulator(fl.fedbr_context_client(local), rule, fl.SyncRound(10), num_clients=100,
                                local_steps=..., client_context=context)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated._checks import check_int, check_real
from jaxopt_lab.distributed.federated.local import ClientData, ClientWalk, _key_data

_MIX_TAG = 0x46424252  # "FBBR": the stream of the pseudo-data mixing draws


def fedbr_discriminator_init(feature_dim: int, key, dtype=jnp.float32) -> dict:
    """The discriminator :math:`D`: ``d -> 2d -> 2d -> d`` linear layers (ReLU between), torch's
    ``nn.Linear`` initialization (uniform in :math:`\\pm 1/\\sqrt{\\text{fan in}}`, weights and biases)."""
    d = check_int("feature_dim", feature_dim, 1)
    sizes = [(d, 2 * d), (2 * d, 2 * d), (2 * d, d)]
    keys = jax.random.split(jnp.asarray(key) if not hasattr(key, "dtype") else key, 2 * len(sizes))
    layers = []
    for i, (a, b) in enumerate(sizes):
        bound = 1.0 / np.sqrt(a)
        layers.append({"w": jax.random.uniform(keys[2 * i], (a, b), dtype, -bound, bound),
                       "b": jax.random.uniform(keys[2 * i + 1], (b,), dtype, -bound, bound)})
    return {"layers": layers}


def fedbr_discriminator_apply(disc, z):
    """:math:`D(z)`: linear, ReLU, linear, ReLU, linear."""
    layers = disc["layers"]
    for layer in layers[:-1]:
        z = jax.nn.relu(z @ layer["w"] + layer["b"])
    return z @ layers[-1]["w"] + layers[-1]["b"]


def fedbr_init(model_params, feature_dim: int, key) -> dict:
    """FedBR's federated parameters: ``{"model": model_params, "discriminator": D}``."""
    return {"model": model_params, "discriminator": fedbr_discriminator_init(feature_dim, key)}


def fedbr_pseudo_data(pool, num: int = 32, per_sample: int = 10, seed: int = 0) -> np.ndarray:
    """Pseudo-data as the official code draws it: ``num`` rows, each the mean of ``per_sample``
    rows of ``pool`` drawn uniformly with replacement (official: 32 means of 10 proxy images)."""
    pool = np.asarray(pool)
    num, per_sample = check_int("num", num, 1), check_int("per_sample", per_sample, 1)
    if pool.shape[0] < 1:
        raise ValueError("pool must hold at least one row")
    idx = np.random.default_rng(seed).integers(0, pool.shape[0], size=(num, per_sample))
    return pool[idx].mean(axis=1).astype(pool.dtype if np.issubdtype(pool.dtype, np.floating) else np.float32)


def _cosine(a, b, eps=1e-8):
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def _log_ratio(eu, eg, es, tau1, tau2):
    """:math:`\\ell_i` of the module docstring, per pseudo row."""
    a, b = tau1 * _cosine(eu, eg), tau2 * _cosine(eu, es)
    return a - jnp.logaddexp(a, b)


def _decorr(z, valid):
    """FedDecorr's loss over the valid rows: z-score per feature (unbiased std + 1e-4), mean of
    the squared correlation matrix entries. A batch with one valid row (a pass's remainder; the
    official loader never yields one, torch's std would be NaN there) gives 0."""
    w = valid.astype(z.dtype)[:, None]
    n = jnp.maximum(valid.sum(), 1).astype(z.dtype)
    mean = jnp.sum(w * z, axis=0) / n
    var = jnp.sum(w * (z - mean) ** 2, axis=0) / jnp.maximum(n - 1, 1)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)  # finite gradient at var = 0
    zn = w * (z - mean) / (std + 1e-4)
    corr = zn.T @ zn / n
    return jnp.mean(corr**2)


def fedbr_local_update(
    features_fn: Callable[[Any, jax.Array], jax.Array],
    head_fn: Callable[[Any, jax.Array], jax.Array],
    data: ClientData,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    pseudo_data,
    *,
    num_classes: int,
    mu: float = 0.5,
    lam: float = 1.0,
    gamma: float = 1.0,
    tau1: float = 2.0,
    tau2: float = 2.0,
    decorr: float = 0.1,
    disc_optimizer: optax.GradientTransformation | None = None,
    refresh_global_features: bool = False,
    shuffle: bool = True,
):
    r"""FedBR's client: ``local_update(params, client_id, num_steps, key) -> params`` over
    ``params = {"model", "discriminator"}`` (module docstring; minibatches walked as in
    :func:`~jaxopt_lab.distributed.federated.make_local_update`).

    Args:
      features_fn: ``(model_params, x) -> (batch, d)`` features (e.g. ``MLP.features``).
      head_fn: ``(model_params, z) -> (batch, C)`` logits (e.g. ``MLP.head``).
      data: padded clients (:func:`pad_clients`); integer labels.
      optimizer: the model's optimizer (official: ``optax.sgd(lr, momentum=0.9)``, weight decay chained).
      batch_size: local minibatch size.
      pseudo_data: ``(P, ...)`` pseudo inputs, shaped like one input each (:func:`fedbr_pseudo_data`).
      num_classes: C (the balanced target).
      mu: weight of the feature-alignment term (official 0.5; 0: off, no discriminator step).
      lam: weight of the output-balancing term (official 1.0; 0: off).
      gamma: scale of the discriminator's loss (official 1.0).
      tau1: temperature of the positive (global) pair (official 2.0).
      tau2: temperature of the negative (local) pair (official 2.0).
      decorr: weight of the FedDecorr term the official update adds (0.1; 0: off).
      disc_optimizer: the discriminator's optimizer (None: ``optimizer``, as the official).
      refresh_global_features: recompute the global pseudo features every step (False: official).
      shuffle: shuffle each client's examples per dispatch.
    """
    mu, lam, gamma = check_real("mu", mu), check_real("lam", lam), check_real("gamma", gamma)
    tau1, tau2, decorr = check_real("tau1", tau1), check_real("tau2", tau2), check_real("decorr", decorr)
    for name, v in (("mu", mu), ("lam", lam), ("gamma", gamma), ("decorr", decorr)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    for name, v in (("tau1", tau1), ("tau2", tau2)):
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    num_classes = check_int("num_classes", num_classes, 2)
    disc_optimizer = optimizer if disc_optimizer is None else disc_optimizer
    if not (hasattr(disc_optimizer, "init") and hasattr(disc_optimizer, "update")):
        raise ValueError(f"disc_optimizer must be an optax GradientTransformation or None, got {disc_optimizer!r}")
    walk = ClientWalk(data, optimizer, batch_size, shuffle)
    pseudo = jnp.asarray(pseudo_data)
    if pseudo.ndim < 1 or pseudo.shape[0] < 1 or pseudo.shape[1:] != walk.x.shape[1:]:
        raise ValueError(f"pseudo_data must have shape (P, {', '.join(map(str, walk.x.shape[1:]))}) like one "
                         f"input per row, got {tuple(pseudo.shape)}")
    num_pseudo = pseudo.shape[0]
    uniform_q = 1.0 / num_classes
    uses_pseudo = bool(mu or lam)

    def mixed(kd, s, x, y, valid):
        """Step s's mixed pseudo-data and targets (pseudo row i mixed with valid batch row r_i)."""
        nv = jnp.maximum(valid.sum(), 1)
        r = jnp.minimum((_rng.uniform(kd, _MIX_TAG, s, size=num_pseudo) * nv).astype(jnp.int32), nv - 1)
        u = (pseudo + x[r].astype(pseudo.dtype)) / 2
        q = (uniform_q + jax.nn.one_hot(y[r], num_classes, dtype=u.dtype)) / 2
        return u, q

    def negatives(zs, valid):
        nv = jnp.maximum(valid.sum(), 1)
        return zs[jnp.arange(num_pseudo) % nv]

    def ce_mean(logits, y, valid):
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(valid.sum(), 1)

    def disc_loss(disc, zu, zg, zs):
        eu, eg, es = (fedbr_discriminator_apply(disc, z) for z in (zu, zg, zs))
        return gamma * jnp.mean(_log_ratio(eu, eg, es, tau1, tau2))

    def gen_loss(model, disc, x, y, valid, u, q, zg):
        zs = features_fn(model, x)
        loss = ce_mean(head_fn(model, zs), y, valid)
        if uses_pseudo:
            zu = features_fn(model, u)
        if mu:
            eu, eg = fedbr_discriminator_apply(disc, zu), fedbr_discriminator_apply(disc, zg)
            es = fedbr_discriminator_apply(disc, negatives(zs, valid))
            loss = loss + mu * -jnp.mean(_log_ratio(eu, eg, es, tau1, tau2))
        if lam:
            loss = loss + lam * -jnp.mean(jnp.sum(jax.nn.log_softmax(head_fn(model, zu)) * q, axis=-1))
        if decorr:
            loss = loss + decorr * _decorr(zs, valid)
        return loss

    gen_grad = jax.grad(gen_loss)
    disc_grad = jax.grad(disc_loss)

    def local_update(params, client_id, num_steps, key):
        rows, n = walk.rows(client_id, key)
        kd = _key_data(key)
        model0 = params["model"]
        idx0, valid0 = walk.batch(rows, n, 0)
        if mu:  # the global features: of step 0's mixed pseudo-data, under the received extractor
            u0, _ = mixed(kd, 0, walk.x[idx0], walk.y[idx0], valid0)
            zg0 = jax.lax.stop_gradient(features_fn(model0, u0))
        else:
            zg0 = jnp.zeros((num_pseudo, 1), jnp.float32)

        def step(s, carry):
            model, disc, opt_state, disc_state = carry
            idx, valid = walk.batch(rows, n, s)
            x, y = walk.x[idx], walk.y[idx]
            if uses_pseudo:
                u, q = mixed(kd, s, x, y, valid)
            else:
                u = q = None
            zg = zg0
            if mu:
                if refresh_global_features:
                    zg = jax.lax.stop_gradient(features_fn(model0, u))
                zu = jax.lax.stop_gradient(features_fn(model, u))
                zs = jax.lax.stop_gradient(negatives(features_fn(model, x), valid))
                dg = disc_grad(disc, zu, zg, zs)
                d_updates, disc_state = disc_optimizer.update(dg, disc_state, disc)
                disc = optax.apply_updates(disc, d_updates)
            g = gen_grad(model, disc, x, y, valid, u, q, zg)
            updates, opt_state = optimizer.update(g, opt_state, model)
            return optax.apply_updates(model, updates), disc, opt_state, disc_state

        disc0 = params["discriminator"]
        init = (model0, disc0, optimizer.init(model0), disc_optimizer.init(disc0))
        model, disc, _, _ = jax.lax.fori_loop(0, num_steps, step, init)
        return {"model": model, "discriminator": disc}

    return local_update


class FedBRServerState(NamedTuple):
    """The federated discriminator, kept by the server rule (:func:`fedbr_server`)."""

    discriminator: Any


def fedbr_context(rule_state):
    """The ``client_context`` of :func:`fedbr_server`'s rule: the current discriminator."""
    found = [s for s in jax.tree.leaves(rule_state, is_leaf=lambda x: isinstance(x, FedBRServerState))
             if isinstance(s, FedBRServerState)]
    if not found:
        raise ValueError("fedbr_context: the rule state holds no FedBRServerState (is the rule fedbr_server's?)")
    return found[0].discriminator


def fedbr_server(discriminator, learning_rate: float = 1.0, weighting: str = "uniform"):
    """FedBR with the model's parameters alone as the simulator's params: the discriminator
    rides in the server rule's state, is sent as the ``client_context`` and averaged back from the
    clients' ``client_aux`` with the model's weights (use :func:`fedbr_context_client` clients).

    Returns ``(rule, client_context)``. The model's rule is ``fedavg(learning_rate, weighting=...)``
    (official: learning rate 1, uniform weights); the discriminator moves the same way:
    :math:`D \\leftarrow D + \\eta \\sum_i w_i (D_i - D)`. Equivalent to :func:`fedbr_local_update`
    over ``{"model", "discriminator"}`` params with that FedAvg.
    """
    from jaxopt_lab.distributed.federated.aggregate import WEIGHTINGS, client_weights, weighted_sum
    from jaxopt_lab.distributed.federated.fedavg import fedavg

    learning_rate = check_real("learning_rate", learning_rate)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

    def init_fn(params):
        del params
        return FedBRServerState(jax.tree.map(jnp.asarray, discriminator))

    def update_fn(updates, state, params=None, **extra):
        del params
        aux = extra.get("client_aux")
        if aux is None or "discriminator" not in aux:
            raise ValueError("fedbr_server needs client_aux={'discriminator'}: use fedbr_context_client clients")
        mask = jnp.asarray(extra["mask"], bool)
        w = client_weights(mask, weighting, extra)
        delta = jax.tree.map(lambda d, d0: d - d0[None], aux["discriminator"], state.discriminator)
        mean = weighted_sum(delta, w, mask)
        disc = jax.tree.map(lambda d0, m: d0 + learning_rate * m.astype(d0.dtype), state.discriminator, mean)
        return updates, FedBRServerState(disc)

    holder = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return optax.chain(holder, fedavg(learning_rate, weighting=weighting)), fedbr_context


def fedbr_context_client(local_update):
    """:func:`fedbr_local_update`'s client in the ``client_context`` form of :func:`fedbr_server`:
    ``(model_params, client_id, num_steps, key, discriminator) -> (model_params, {"discriminator"})``."""

    def client(params, client_id, num_steps, key, discriminator):
        out = local_update({"model": params, "discriminator": discriminator}, client_id, num_steps, key)
        return out["model"], {"discriminator": out["discriminator"]}

    return client
