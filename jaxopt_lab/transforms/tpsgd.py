r"""tpSGD: backpropagation-free, layer-wise SGD with random target projections.

"Learning with Local Gradients at the Edge" (2022): Target Projection SGD
generalizes direct random target projection (DRTP; Frenkel, Lefebvre & Bol,
2021) to arbitrary losses. Each hidden layer :math:`l` is trained alone, with
only forward passes, towards a local target :math:`t_l = \operatorname{onehot}(y)
B_l`, a fixed random projection of the labels; the output layer is trained on
the task loss with its input held fixed. No gradient crosses a layer, so no
activation has to be kept for a backward pass.

No official code is public (searched); the rule here is the paper's
description with DRTP's local loss, the squared error of the layer's
activation to its target, :math:`\ell_l = \frac{1}{2b}\lVert \sigma(a_l) -
t_l\rVert^2` over a batch of :math:`b`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


class TPSGDState(NamedTuple):
    """State of :func:`scale_by_target_projection`."""

    projections: optax.Updates  # per leaf: B_l (num_classes, out) for a hidden layer's kernel and bias, else (0,)


def target_projection_grad(
    layer_input: jax.Array,
    preact: jax.Array,
    labels: jax.Array,
    projection: jax.Array,
    activation: str = "relu",
) -> tuple[jax.Array, jax.Array]:
    r"""One hidden layer's local gradients ``(g_kernel, g_bias)`` (float32), the rule of :func:`scale_by_target_projection`.

    :math:`\delta = (\sigma(a) - \operatorname{onehot}(y) B) \odot \sigma'(a) / b`,
    :math:`g_W = h^\top\delta`, :math:`g_b = \sum_i \delta_i`. For a convolution
    (DRTP's form), ``preact`` is ``(b, H, W, o)`` and ``projection``
    ``(num_classes, H W o)``: a target for every output unit at every position;
    ``layer_input`` is the patch matrix of
    :func:`jaxopt_lab.transforms.tract.conv_patches`, and :math:`g_W` comes out
    ``(kh kw c_in, o)``, the kernel reshaped. Computing it inside
    the forward loop, as soon as a layer's output exists, lets the layer's input
    be freed at once (the memory-lean step of ``scripts/tpsgd_digits.py``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    a = jnp.asarray(preact, jnp.float32)
    batch = a.shape[0]
    onehot = jax.nn.one_hot(jnp.reshape(labels, (-1,)), projection.shape[0], dtype=jnp.float32)
    target = (onehot @ projection.astype(jnp.float32)).reshape(a.shape)  # one target per output unit (and position)
    s, ds = jax.jvp(ACTIVATIONS[activation], (a,), (jnp.ones_like(a),))  # sigma(a), sigma'(a) (elementwise)
    delta = ((s - target) * ds / batch).reshape(-1, a.shape[-1])
    h = jnp.asarray(layer_input, jnp.float32)
    return h.reshape(-1, h.shape[-1]).T @ delta, delta.sum(0)


def conv_projection(seed: int, layer: int, num_classes: int, output_shape) -> jax.Array:
    """A conv layer's fixed random projection ``(num_classes, H * W * o)``: N(0, 1), from ``seed`` and ``layer``.

    It depends on the layer's output shape, which ``init`` does not know, so it
    is drawn again at each step from the same key rather than stored.
    """
    size = 1
    for d in output_shape:
        size *= int(d)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), layer), 1)
    return jax.random.normal(key, (num_classes, size), jnp.float32)


def _layer_ids(params, hidden_layers) -> list[int]:
    """Per leaf (``jax.tree.leaves`` order): the hidden layer it belongs to, or -1."""
    if isinstance(hidden_layers, jax.Array):
        raise check.not_static("hidden_layers")
    if callable(hidden_layers):
        return [int(i) for i in jax.tree.leaves(hidden_layers(params))]
    from jaxopt_lab.transforms.tract import _path_name

    prefixes = list(hidden_layers)
    ids = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path_name(path)
        match = [i for i, p in enumerate(prefixes) if name == p or name.startswith(p + "/")]
        ids.append(match[0] if match else -1)
    return ids


def scale_by_target_projection(
    hidden_layers: Sequence[str] | Callable[[Any], Any],
    num_classes: int,
    activation: str = "relu",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Replace each hidden layer's gradient by its local target-projection gradient.

    For hidden layer :math:`l` with input :math:`h_{l-1}` (``layer_inputs[l]``,
    ``(b, n)``), pre-activation :math:`a_l` (``layer_preacts[l]``, ``(b, o)``)
    and labels :math:`y` (``labels``, ``(b,)`` ints),

    .. math::
        t_l = \operatorname{onehot}(y)\, B_l, \qquad
        \delta_l = \frac{1}{b}\big(\sigma(a_l) - t_l\big) \odot \sigma'(a_l), \qquad
        g_{W_l} = h_{l-1}^\top \delta_l, \quad g_{b_l} = \textstyle\sum_i \delta_{l,i},

    the gradient of :math:`\ell_l = \frac{1}{2b}\lVert\sigma(a_l) - t_l\rVert^2`
    with respect to the layer's own kernel ``(n, o)`` and bias ``(o,)`` only.
    :math:`B_l` has i.i.d. :math:`\mathcal N(0, 1)` entries, drawn at ``init``
    from ``seed`` and layer :math:`l` and kept fixed (the state); a conv
    layer's (``layer_preacts[l]`` of shape ``(b, H, W, o)``) is DRTP's
    ``(num_classes, H W o)``, one target per unit and position, drawn from a
    fixed key at each step (:func:`conv_projection`). Leaves outside
    the hidden layers (the output layer) keep the gradient they come with:
    compute it with the output layer's input under ``jax.lax.stop_gradient``,
    so the whole step needs forward passes and one local gradient.

    Args:
      hidden_layers: path prefixes of the hidden layers in order
        (``["layers/0", "layers/1"]``), or a label function ``params -> tree of
        ints`` (layer index, -1 for others). A 2-D (dense) or 4-D (conv, then
        ``layer_inputs[l]`` is the layer's ``conv_patches``) leaf is the kernel,
        a 1-D leaf the bias.
      num_classes: number of classes of ``labels``, int >= 1.
      activation: the hidden layers' :math:`\sigma`: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
      seed: seed of the projections.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``layer_inputs``, ``layer_preacts`` (sequences or dicts indexed by layer)
      and ``labels``.
    """
    num_classes = check.static_int("num_classes", num_classes, 1)
    seed = check.static_int("seed", seed, 0)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")

    def _ids(tree):
        ids = _layer_ids(tree, hidden_layers)
        for (path, leaf), i in zip(jax.tree_util.tree_flatten_with_path(tree)[0], ids):
            if i >= 0 and jnp.ndim(leaf) not in (1, 2, 4):
                raise ValueError(f"hidden layer leaf {jax.tree_util.keystr(path)} must be a 2-D dense or 4-D conv "
                                 "kernel or a 1-D bias")
            if i >= 0 and jnp.iscomplexobj(leaf):
                raise ValueError(f"tpSGD: hidden layer leaf {jax.tree_util.keystr(path)} is {leaf.dtype}: real only")
        return ids

    def init_fn(params):
        ids = _ids(params)
        leaves, treedef = jax.tree.flatten(params)
        key = jax.random.PRNGKey(seed)
        out = []
        for i, p in zip(ids, leaves):
            if i < 0:
                out.append(jnp.zeros((0,), jnp.float32))
            else:
                out.append(jax.random.normal(jax.random.fold_in(key, i), (num_classes, p.shape[-1]), jnp.float32))
        return TPSGDState(treedef.unflatten(out))

    def update_fn(updates, state, params=None, *, layer_inputs: Sequence | Mapping | None = None,
                  layer_preacts: Sequence | Mapping | None = None, labels: jax.Array | None = None, **extra_args):
        del params, extra_args
        ids = _ids(updates)
        if not any(i >= 0 for i in ids):
            return updates, state
        if layer_inputs is None or layer_preacts is None or labels is None:
            raise ValueError("tpSGD needs update(..., layer_inputs=, layer_preacts=, labels=)")
        leaves, treedef = jax.tree.flatten(updates)
        projections = jax.tree.leaves(state.projections)
        out = []
        for i, g, b_l in zip(ids, leaves, projections):
            if i < 0:
                out.append(g)
                continue
            a = layer_preacts[i]
            if jnp.ndim(a) > 2:  # a conv layer: B_l (num_classes, H W o), drawn from the same key at every step
                b_l = conv_projection(seed, i, num_classes, jnp.shape(a)[1:])
            g_kernel, g_bias = target_projection_grad(layer_inputs[i], a, labels, b_l, activation)
            out.append((g_kernel.reshape(g.shape) if g.ndim > 1 else g_bias).astype(g.dtype))
        return treedef.unflatten(out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tpsgd(
    learning_rate: optax.ScalarOrSchedule,
    hidden_layers: Sequence[str] | Callable[[Any], Any],
    num_classes: int,
    activation: str = "relu",
    momentum: float | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """tpSGD: :func:`scale_by_target_projection` then SGD (the paper's layer-wise SGD).

    Args:
      learning_rate: float >= 0 or a schedule.
      hidden_layers: path prefixes (or label function) of the hidden layers.
      num_classes: number of classes.
      activation: the hidden layers' nonlinearity.
      momentum: SGD momentum (None: plain SGD).
      seed: seed of the random projections.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(scale_by_target_projection(hidden_layers, num_classes, activation, seed),
                       optax.sgd(learning_rate, momentum))
