"""LoRA adapters on flax nnx ``Linear`` layers, and the pieces a fine-tuning run needs.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a
pretrained kernel ``W`` frozen and trains a low-rank correction::

    y = x W + b + s * dropout(x) A B,      s = alpha / rank,

with ``A`` (in x rank) drawn at random and ``B`` (rank x out) zero, so the adapted model
starts equal to the pretrained one. ``A`` is drawn as the official code draws it (microsoft/LoRA
``loralib/layers.py`` ``Linear.reset_parameters`` and PEFT ``LoraLayer.reset_lora_parameters``:
``nn.init.kaiming_uniform_(lora_A, a=sqrt(5))``), uniform on ``[-1/sqrt(in), 1/sqrt(in)]``
(:data:`lora_a_init`); flax's ``nnx.LoRA`` default, he-uniform on ``[-sqrt(6/in), sqrt(6/in)]``
(sqrt(6) times wider), is opt-in through ``a_initializer=nnx.initializers.he_uniform()``. :class:`LoRALinear` is flax's ``nnx.LoRALinear`` (the
kernel and bias keep ``nnx.Linear``'s paths, the factors live at ``.../lora/lora_a`` and
``.../lora/lora_b`` as ``nnx.LoRAParam``) with the ``alpha / rank`` scale, dropout on the
adapter's input, and merge/unmerge.

flax orientation: the kernel is ``(in, out)`` and ``x @ A @ B``; the papers (PyTorch) write
``W (out x in) + s B A`` with ``A (r x in)``, ``B (out x r)`` — the transposes of these.

What a run uses:

- :func:`apply_lora`: replace the ``nnx.Linear`` layers whose path matches ``targets`` (a
  regular expression, matched in full against ``"blocks/0/qkv"``-style paths) by
  :class:`LoRALinear` s holding the same kernel and bias;
- :func:`merge_lora` / :func:`unmerge_lora`: fold ``s A B`` into the kernel (one matmul at
  inference) and back;
- :func:`trainable_labels` and :func:`freeze_base`: an optax transformation that trains only
  the adapters (and ``train_also`` paths); the frozen parameters get ``optax.set_to_zero``,
  which holds no state, so the optimizer state is the adapters' alone;
- :func:`lora_pairs`: the (A, B) pairs of a parameter tree by path, for the gradient rules
  (LoRA-Pro, LoRA-GGPO) written as optax transforms;
- :func:`trainable_report`: trainable parameters and their bytes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

TRAINABLE = "trainable"
FROZEN = "frozen"

# PyTorch's kaiming_uniform_(a=sqrt(5)) on A (fan_in = in): gain^2 = 2 / (1 + a^2) = 1/3, bound
# sqrt(3 * gain^2 / fan_in) = 1 / sqrt(fan_in); A is (in x r) here, so fan_in is axis -2.
lora_a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRALinear(nnx.LoRALinear):
    """``nnx.LoRALinear`` with LoRA's ``alpha / rank`` scale, input dropout and merging.

    ``y = x W + b + (alpha / rank) * dropout(x) A B`` (nothing is added once merged).

    Args:
      in_features, out_features: as ``nnx.Linear``.
      lora_rank: the rank r of ``A`` (in x r) and ``B`` (r x out), 1 <= r <= min(in, out).
      alpha: the scale's numerator (the scale is ``alpha / lora_rank``); None: ``lora_rank``
        (scale 1). 0 switches the adapter off exactly.
      dropout: dropout rate on the adapter's input, in [0, 1); active only when the module
        is in training mode (``model.train()``; ``nnx.Dropout``'s ``deterministic`` flag).
      rngs: initialisation of ``A`` and, with dropout, its stream.
      a_initializer: ``A``'s initializer; default :data:`lora_a_init`, uniform on
        ``[-1/sqrt(in), 1/sqrt(in)]`` as microsoft/LoRA and PEFT (``kaiming_uniform_(a=sqrt(5))``);
        ``nnx.initializers.he_uniform()`` is flax's ``nnx.LoRA`` default (sqrt(6) times wider).
      **kwargs: the rest of ``nnx.Linear``'s arguments (use_bias, dtype, ...).
    """

    def __init__(self, in_features: int, out_features: int, *, lora_rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rngs: nnx.Rngs, a_initializer=lora_a_init, **kwargs):
        check_lora_args(lora_rank, alpha, dropout, in_features, out_features)
        super().__init__(in_features, out_features, lora_rank=lora_rank, rngs=rngs, a_initializer=a_initializer,
                         **kwargs)
        self.lora_rank = int(lora_rank)
        self.alpha = float(lora_rank if alpha is None else alpha)
        self.scale = self.alpha / self.lora_rank
        self.merged = False
        self.lora_dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs if dropout > 0 else None)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
                    rngs: nnx.Rngs) -> "LoRALinear":
        """A LoRALinear holding ``linear``'s kernel and bias (the same values), with new adapters."""
        out = cls(linear.in_features, linear.out_features, lora_rank=rank, alpha=alpha, dropout=dropout, rngs=rngs,
                  use_bias=linear.bias is not None, dtype=linear.dtype, param_dtype=linear.param_dtype,
                  precision=linear.precision, lora_param_dtype=linear.param_dtype)
        out.kernel[...] = linear.kernel[...]
        if linear.bias is not None:
            out.bias[...] = linear.bias[...]
        return out

    def delta(self) -> jax.Array:
        """``(alpha / rank) A B``, the kernel's correction (in x out)."""
        return self.scale * (self.lora.lora_a[...] @ self.lora.lora_b[...])

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        if self.merged:
            return y
        return y + self.scale * self.lora(self.lora_dropout(x))


def check_lora_args(rank: Any, alpha: Any, dropout: Any, in_features: int | None = None,
                    out_features: int | None = None) -> None:
    """ValueError naming a bad rank (not an int in [1, min(in, out)]), alpha (negative or not
    finite) or dropout (outside [0, 1))."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be a positive int, got {rank!r}")
    if in_features is not None and rank > min(in_features, out_features):
        raise ValueError(f"lora rank {rank} is larger than the layer's smaller side min({in_features}, {out_features})")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha < 0):
        raise ValueError(f"lora alpha must be a finite number >= 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")


# ---- paths ------------------------------------------------------------------------------


def key_name(key: Any) -> str:
    """One jax path key as a string (``DictKey('qkv')`` -> ``qkv``, ``SequenceKey(0)`` -> ``0``)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple) -> str:
    """A jax key path (or an nnx graph path) as ``"blocks/0/qkv/kernel"``; the trailing
    ``.value`` of an nnx Variable is dropped."""
    parts = [key_name(k) if not isinstance(k, (str, int)) else str(k) for k in path]
    if parts and parts[-1] == "value" and not isinstance(path[-1], (str, int)):
        parts = parts[:-1]
    return "/".join(parts)


def linear_paths(model: nnx.Module) -> list[str]:
    """Paths of the ``nnx.Linear`` layers of ``model`` (``"blocks/0/qkv"``), in graph order."""
    return [path_str(p) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]


def _set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What :func:`apply_lora` adapts (the ``[model.lora]`` table of an experiment config).

    Attributes:
      rank: r of every adapter.
      alpha: the scale is ``alpha / rank``; None: ``rank``.
      targets: a regular expression matched in full against the paths of the model's
        ``nnx.Linear`` and ``nnx.Conv`` layers (``"blocks/0/qkv"``, ``"convs/1"``); the default
        adapts every one; ``""`` none (only ``train_also`` trains).
      dropout: on the adapters' input (training mode only).
      train_also: a regular expression over parameter paths (``"head/.*"``) that train fully
        beside the adapters (a new classification head); "" for none.
      seed: the adapters' initialisation.
    """

    rank: int = 8
    alpha: float | None = None
    targets: str = ".*"
    dropout: float = 0.0
    train_also: str = ""
    seed: int = 0

    def __post_init__(self):
        check_lora_args(self.rank, self.alpha, self.dropout)
        for name in ("targets", "train_also"):
            try:
                re.compile(getattr(self, name))
            except (re.error, TypeError) as e:
                raise ValueError(f"lora {name} {getattr(self, name)!r} is not a regular expression: {e}") from None


def apply_lora(model: nnx.Module, targets: str = ".*", rank: int = 8, alpha: float | None = None,
               dropout: float = 0.0, *, rngs: nnx.Rngs) -> list[str]:
    """Replace, in place, every ``nnx.Linear`` of ``model`` whose path matches ``targets`` by a
    :class:`LoRALinear` with the same kernel and bias, and every ``nnx.Conv`` by a
    :class:`~jaxopt_lab.finetune.lora_conv.LoRAConv` (the kernel as a ``(kh kw c_in) x c_out``
    matrix); returns the adapted paths. ``targets = ""`` adapts nothing (then only the
    ``train_also`` parameters of a fine-tuning run train: a linear probe with ``"head/.*"``).

    Raises ValueError (naming the pattern and the model's Linear paths) when nothing
    matches, and for a rank larger than a matched layer's smaller side.
    """
    from jaxopt_lab.finetune.lora_conv import LoRAConv

    check_lora_args(rank, alpha, dropout)
    if targets == "":  # no adapter: a frozen base whose train_also paths train (a linear probe)
        return []
    pattern = re.compile(targets)
    found = [(p, node) for p, node in nnx.iter_graph(model)
             if (isinstance(node, nnx.Linear) and not isinstance(node, nnx.LoRALinear))
             or (isinstance(node, nnx.Conv) and not isinstance(node, LoRAConv))]
    chosen = [(p, node) for p, node in found if pattern.fullmatch(path_str(p))]
    if not chosen:
        raise ValueError(f"lora targets {targets!r} match none of the model's Linear or Conv layers: "
                         f"{', '.join(path_str(p) for p, _ in found) or '(none)'}")
    for path, layer in chosen:
        fan_in = layer.in_features * (math.prod(layer.kernel_size) if isinstance(layer, nnx.Conv) else 1)
        check_lora_args(rank, alpha, dropout, fan_in, layer.out_features)
    for path, layer in chosen:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if isinstance(layer, nnx.Conv):
            new = LoRAConv.from_conv(layer, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
        else:
            new = LoRALinear.from_linear(layer, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
        _set_child(parent, path[-1], new)
    return [path_str(p) for p, _ in chosen]


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    return [(path_str(p), node) for p, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)]


def adapted_layers(model: nnx.Module) -> list[tuple[str, Any]]:
    """Every adapted layer by path: :class:`LoRALinear` s and
    :class:`~jaxopt_lab.finetune.lora_conv.LoRAConv` s (:func:`lora_layers` gives the former only)."""
    from jaxopt_lab.finetune.lora_conv import LoRAConv

    return [(path_str(p), node) for p, node in nnx.iter_graph(model) if isinstance(node, (LoRALinear, LoRAConv))]


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into its kernel, in place: ``W <- W + s A B``; the forward then adds
    nothing (one matmul per layer). The factors are kept, so :func:`unmerge_lora` undoes it."""
    for _, layer in adapted_layers(model):
        if not layer.merged:
            layer.kernel[...] = layer.kernel[...] + layer.delta().astype(layer.kernel.dtype)
            layer.merged = True


def unmerge_lora(model: nnx.Module) -> None:
    """Undo :func:`merge_lora`: ``W <- W - s A B`` (equal to the kernel before merging up to
    floating-point rounding)."""
    for _, layer in adapted_layers(model):
        if layer.merged:
            layer.kernel[...] = layer.kernel[...] - layer.delta().astype(layer.kernel.dtype)
            layer.merged = False


# ---- which parameters train -------------------------------------------------------------

A_NAME, B_NAME = "lora_a", "lora_b"


def is_lora_path(path: str) -> bool:
    """Whether a parameter path is an adapter factor (``.../lora/lora_a`` or ``.../lora/lora_b``)."""
    parts = path.split("/")
    return len(parts) >= 2 and parts[-2] == "lora" and parts[-1] in (A_NAME, B_NAME)


def trainable_labels(train_also: str = "") -> Callable[[Any], Any]:
    """A label function for ``optax.multi_transform``: ``"trainable"`` for adapter factors and
    parameters whose path matches ``train_also`` in full, ``"frozen"`` for the rest."""
    extra = re.compile(train_also) if train_also else None

    def labels(params):
        def label(path, _):
            p = path_str(path)
            return TRAINABLE if is_lora_path(p) or (extra is not None and extra.fullmatch(p)) else FROZEN

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


def freeze_base(tx: optax.GradientTransformation, train_also: str = "") -> optax.GradientTransformation:
    """``tx`` on the adapters (and ``train_also``), zero updates and no state for the rest."""
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, trainable_labels(train_also))


def trainable_report(params: Any, train_also: str = "", labels: Callable[[Any], Any] | None = None
                     ) -> dict[str, int]:
    """Parameter counts and bytes: all, trainable (adapters + ``train_also``; or those ``labels``
    marks ``"trainable"``, a label function as :func:`trainable_labels` returns), frozen."""
    labels = jax.tree.leaves((labels or trainable_labels(train_also))(params))
    leaves = jax.tree.leaves(params)
    out = {"params": 0, "param_bytes": 0, "trainable_params": 0, "trainable_bytes": 0}
    for label, leaf in zip(labels, leaves):
        n = math.prod(leaf.shape)
        b = n * jnp.dtype(leaf.dtype).itemsize
        out["params"] += n
        out["param_bytes"] += b
        if label == TRAINABLE:
            out["trainable_params"] += n
            out["trainable_bytes"] += b
    return out


# ---- (A, B) pairs by path, for the gradient rules -----------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAPair:
    """Where one adapter's leaves sit in a flattened tree (indices into its leaves)."""

    prefix: str  # the layer's path ("blocks/0/qkv")
    a: int  # leaf index of A (in x r)
    b: int  # leaf index of B (r x out)
    kernel: int | None  # leaf index of the base kernel (in x out), if the tree holds it


def lora_pairs(paths: list[str]) -> list[LoRAPair]:
    """The adapters among flattened leaves (their ``path_str`` paths, in leaf order): one
    :class:`LoRAPair` per layer that has both ``lora/lora_a`` and ``lora/lora_b``.

    A factor without its partner is a ValueError (a tree masked so that only one factor
    reaches a gradient rule would silently give wrong updates).
    """
    index = {p: i for i, p in enumerate(paths)}
    pairs, seen = [], set()
    for p in paths:
        if not is_lora_path(p):
            continue
        prefix = p.rsplit("/", 2)[0]
        if prefix in seen:
            continue
        seen.add(prefix)
        a, b = f"{prefix}/lora/{A_NAME}", f"{prefix}/lora/{B_NAME}"
        if a not in index or b not in index:
            raise ValueError(f"adapter {prefix!r} has only {'A' if a in index else 'B'} in the tree: "
                             "a LoRA gradient rule needs both factors of every adapter")
        pairs.append(LoRAPair(prefix, index[a], index[b], index.get(f"{prefix}/kernel")))
    return pairs


def flatten_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)`` of a tree (nnx State or plain), paths as :func:`path_str`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef
