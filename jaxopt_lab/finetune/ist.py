r"""IST: importance-aware sparse tuning — a few adapted layers train each step, chosen by a
learned per-layer importance score.

Yao et al., "Layer-wise Importance Matters: Less Memory for Better Performance in
Parameter-efficient Fine-tuning of Large Language Models" (EMNLP 2024 Findings); official code
github.com/antgroup/importance-aware-sparse-tuning-IST-paper (``ist.py``, ``ISTCallback``),
whose rule and hyperparameters this follows.

The LoRA pairs are grouped by layer (``layer_pattern`` over their paths: ``blocks/3/qkv`` and
``blocks/3/mlp_in`` are layer ``3``); L layers hold a score ``s`` (zeros at the start; large
``s_l`` means "suppressing layer l's adapters costs little": a *low* importance). Every step:

1. Every ``interval`` steps (not at step 0), the score moves by a REINFORCE estimate. With
   ``p = σ(s)``, ``rl_steps`` sets ``S_k`` of ``⌊L · suppress_ratio⌋`` layers are drawn
   without replacement with probabilities ∝ ``p``, a set equal to an earlier one of the same
   update redrawn (the official ``while self.tensor_in_list(selects, select)``); the loss ``ℓ_k`` is measured with the
   adapters of ``S_k`` scaled by ``suppression`` (0.25) — here, their ``B`` factors scaled,
   which is the same forward; the rewards are ``r_k = exp(-ℓ_k)`` centred,
   ``r̂_k = r_k - mean_j r_j``, and::

       s_l <- s_l + rl_lr · Σ_k r̂_k · [l ∈ S_k] · p_l (1 - p_l).

2. ``⌊L · update_ratio⌋`` (at least 1) active layers are drawn without replacement with
   probabilities ∝ ``σ(-s)`` (the important ones, more often); the other layers' gradients
   and updates are zero.

Defaults are the official code's: ``rl_steps=3``, ``rl_lr=10``, ``suppression=0.25``,
``interval=10``, ``update_ratio=0.25``, ``suppress_ratio=0.5``.

As an optax transformation the losses of step 1 come from a ``loss_fn(params) -> scalar``
keyword argument of ``update`` (the official code evaluates a separate batch of the training
set; pass a closure over such a batch). Differences from the official code: (a) where fewer
than ``rl_steps`` distinct sets exist (``C(L, ⌊L · suppress_ratio⌋) < rl_steps``), where the
official loop never ends, a set may repeat after ``MAX_REDRAWS`` redraws; (b) forced by a pure
transformation: an inactive layer's factors get a zero gradient through ``inner`` instead of
being skipped, so a stateful ``inner`` (Adam) decays their moments on those steps (PyTorch
skips parameters with no gradient). ``official_min_one=False`` keeps the
official ``int(L · ratio)`` even when it is 0 (then nothing trains). Leaves that are not LoRA
factors (a ``train_also`` head) train every step.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.finetune.lora import flatten_with_paths, lora_pairs
from jaxopt_lab.transforms import _validation as check

DEFAULT_LAYER_PATTERN = r"blocks/(\d+)/"
MAX_REDRAWS = 1000  # redraws of a probe set equal to an earlier one (the official loop has no bound)


class ISTState(NamedTuple):
    """``count``: steps taken; ``scores``: the per-layer scores ``s`` (L,); ``active``: the layers
    the last step trained (L,) bool; ``key``: the sampling stream; ``inner``: the inner state."""

    count: jax.Array
    scores: jax.Array
    active: jax.Array
    key: jax.Array
    inner: optax.OptState


def layer_groups(paths: list[str], layer_pattern: str = DEFAULT_LAYER_PATTERN) -> tuple[list[str], list[list[int]]]:
    """The layers of the LoRA pairs among flattened leaves: ``(names, leaf indices per layer)``,
    layers in order of first appearance. A layer's name is ``layer_pattern``'s first group (its
    whole match without groups), searched in the pair's path. A pair it does not match is a
    ValueError naming it."""
    pattern = re.compile(layer_pattern)
    names, groups = [], []
    for p in lora_pairs(paths):
        m = pattern.search(p.prefix)
        if m is None:
            raise ValueError(f"ist layer_pattern {layer_pattern!r} does not match the adapter {p.prefix!r}: "
                             "every LoRA pair must belong to a layer")
        name = m.group(1) if pattern.groups else m.group(0)
        if name not in names:
            names.append(name)
            groups.append([])
        groups[names.index(name)].extend([p.a, p.b])
    return names, groups


def choose(key: jax.Array, weights: jax.Array, n: int) -> jax.Array:
    """A 0/1 float mask (L,) of ``n`` indices drawn without replacement with probabilities
    ∝ ``weights`` (``torch.multinomial(weights, n)``'s distribution)."""
    idx = jax.random.choice(key, weights.shape[0], (n,), replace=False, p=weights / jnp.sum(weights))
    return jnp.zeros(weights.shape, jnp.float32).at[idx].set(1.0)


def choose_distinct(key: jax.Array, weights: jax.Array, n: int, sets: int) -> jax.Array:
    """``sets`` masks (sets, L) as :func:`choose` draws them, the ``k``-th from
    ``jax.random.split(key, sets)[k]``, redrawn (keys ``fold_in(key_k, 1), fold_in(key_k, 2), ...``)
    while it equals an earlier one, at most :data:`MAX_REDRAWS` times: the official IST loop's
    distinct suppression sets."""
    masks = []
    for k, key_k in enumerate(jax.random.split(key, sets)):
        def repeated(m, masks=tuple(masks)):
            return jnp.any(jnp.stack([jnp.all(m == e) for e in masks])) if masks else jnp.asarray(False)

        def cond(c, repeated=repeated):
            m, tries = c
            return repeated(m) & (tries < MAX_REDRAWS)

        def body(c, key_k=key_k):
            _, tries = c
            return choose(jax.random.fold_in(key_k, tries + 1), weights, n), tries + 1

        m, _ = jax.lax.while_loop(cond, body, (choose(key_k, weights, n), jnp.zeros([], jnp.int32)))
        masks.append(m)
    return jnp.stack(masks)


def _count(L: int, ratio: float, min_one: bool) -> int:
    n = int(L * ratio)
    return max(1, n) if min_one else n


def ist(inner: optax.GradientTransformation, layer_pattern: str = DEFAULT_LAYER_PATTERN, update_ratio: float = 0.25,
        suppress_ratio: float = 0.5, rl_steps: int = 3, rl_lr: float = 10.0, suppression: float = 0.25,
        interval: int = 10, seed: int = 0, official_min_one: bool = True) -> optax.GradientTransformation:
    """IST around ``inner`` (see the module docstring).

    Args:
      inner: the method that updates the adapters (in a fine-tuning config, under ``freeze_base``).
      layer_pattern: a regular expression whose first group names an adapter's layer.
      update_ratio: the fraction of layers trained per step (official 0.25).
      suppress_ratio: the fraction of layers suppressed in each score probe (official 0.5).
      rl_steps: probes per score update (official 3).
      rl_lr: the score's step size (official 10).
      suppression: the factor on a probed layer's adapters (official 0.25).
      interval: steps between score updates (official 10).
      seed: the sampling stream.
      official_min_one: draw at least one layer even where ``int(L · ratio)`` is 0 (True; the
        official code would train nothing on a model with fewer than 4 layers).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, loss_fn=...)``
      needs ``params`` and ``loss_fn`` when the tree holds LoRA pairs.
    """
    try:
        re.compile(layer_pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"ist layer_pattern {layer_pattern!r} is not a regular expression: {e}") from None
    check.number("update_ratio", update_ratio, lambda v: 0 < v <= 1, "in (0, 1]")
    check.number("suppress_ratio", suppress_ratio, lambda v: 0 < v <= 1, "in (0, 1]")
    check.number("rl_lr", rl_lr, lambda v: v >= 0, ">= 0")
    check.number("suppression", suppression, lambda v: v >= 0, ">= 0")
    rl_steps = check.static_int("rl_steps", rl_steps, 1)
    interval = check.static_int("interval", interval, 1)
    seed = check.static_int("seed", seed, 0)

    def init_fn(params):
        names, _ = layer_groups(flatten_with_paths(params)[0], layer_pattern)
        L = len(names)
        return ISTState(jnp.zeros([], jnp.int32), jnp.zeros((L,), jnp.float32), jnp.ones((L,), bool),
                        jax.random.key(seed), inner.init(params))

    def update_fn(updates, state, params=None, loss_fn=None, **extra):
        paths, grads, treedef = flatten_with_paths(updates)
        names, groups = layer_groups(paths, layer_pattern)
        L = len(names)
        if L == 0:  # no adapters: the inner method alone
            u, inner_state = inner.update(updates, state.inner, params, **extra)
            return u, state._replace(count=state.count + 1, inner=inner_state)
        if params is None:
            raise ValueError("ist needs params: call update(grads, state, params, loss_fn=...)")
        if loss_fn is None:
            raise ValueError("ist needs loss_fn (params -> scalar loss) as a keyword of update: "
                             "its importance probes measure the loss with some layers suppressed")
        n_up = _count(L, update_ratio, official_min_one)
        n_sup = _count(L, suppress_ratio, official_min_one)
        values = jax.tree.leaves(params)
        owner = {i: g for g, leaves in enumerate(groups) for i in leaves}
        key, k_score, k_sel = jax.random.split(state.key, 3)

        def suppressed(mask):
            factor = 1.0 - mask * (1.0 - suppression)
            out = list(values)
            for g, leaves in enumerate(groups):
                b = leaves[1::2]
                for i in b:
                    out[i] = (values[i] * factor[g]).astype(values[i].dtype)
            return jax.tree.unflatten(treedef, out)

        def probe(scores):
            p = jax.nn.sigmoid(scores)
            masks = choose_distinct(k_score, p, n_sup, rl_steps)
            losses = jnp.stack([jnp.asarray(loss_fn(suppressed(masks[k])), jnp.float32) for k in range(rl_steps)])
            rewards = jnp.exp(-losses)
            rewards = rewards - jnp.mean(rewards)
            return scores + rl_lr * jnp.sum(rewards[:, None] * masks, axis=0) * p * (1 - p)

        due = (state.count % interval == 0) & (state.count > 0)
        scores = jax.lax.cond(due, probe, lambda s: s, state.scores) if n_sup > 0 else state.scores
        active = (choose(k_sel, jax.nn.sigmoid(-scores), n_up) if n_up > 0 else jnp.zeros((L,), jnp.float32))
        on = [None] * len(grads)
        for i in owner:
            on[i] = active[owner[i]]
        masked = [g if on[i] is None else g * on[i].astype(g.dtype) for i, g in enumerate(grads)]
        u, inner_state = inner.update(jax.tree.unflatten(treedef, masked), state.inner, params, **extra)
        out = jax.tree.leaves(u)
        out = [x if on[i] is None else x * on[i].astype(x.dtype) for i, x in enumerate(out)]
        return jax.tree.unflatten(treedef, out), ISTState(state.count + 1, scores, active > 0, key, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# In an experiment config (method.name = "ist", inner = {...}): the trainer passes ``loss_fn`` (the
# training loss of the step's micro-batch as a function of the parameters) to update, and a
# fine-tuning run freezes IST's inner method, not IST, whose probes need the whole model's parameters.
ist.needs_loss_fn = True
ist.perturbs_frozen_base = True
