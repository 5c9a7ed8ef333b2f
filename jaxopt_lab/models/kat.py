"""KAT: a small vision transformer whose MLP is a group-rational KAN (GR-KAN).

Yang & Wang, "Kolmogorov-Arnold Transformer" (2024): the transformer's MLP
``Linear -> GELU -> Linear`` becomes ``GR-KAN -> Linear -> GR-KAN -> Linear``,
where each GR-KAN is a learnable rational function ``P(x) / Q(x)`` (degree 5
over degree 4, KAT's safe Pade form ``Q = 1 + |b_1 x| + ... + |b_4 x^4|``)
shared by each of ``G`` channel groups. KAT initialises the first rational to
the identity and the second to a rational fitted to Swish (its released
``kat_*_swish`` models and FlashKAT; GELU is an option); so does this model
(``act_init``; fitted once in numpy, see :func:`fit_rational`). The activation
runs through :func:`jaxopt_lab.kernels.grkan` (Pallas on GPU/TPU,
block-partial-sum backward; ``impl`` picks the implementation).

Differences from KAT's code: the numerator coefficients are per group here
(KAT shares one numerator across groups and keeps a per-group denominator);
the linear layers use flax's default initialisation and attention a normal(0.02)
one (KAT's effective MLP init is truncated normal(0.02), and its attention uses
a "mimetic" init); our fits are made in the form the kernel evaluates,
``1 + sum |b_j| |x|^j``: KAT's ``init.json`` "gelu" coefficients were fitted in
the form ``1 + |sum b_j x^j|`` and are far from GELU under its own kernel
(f(3) = 1.53), whereas its Swish coefficients agree with ours (to 1e-6).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_lab.kernels import check_impl, grkan
from jaxopt_lab.models.gpt import _INIT, _check_positive

RATIONAL_INITS = ("identity", "gelu", "swish")


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _swish(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


@functools.lru_cache(maxsize=None)
def fit_rational(name: str, lo: float = -3.0, hi: float = 3.0, num: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients ``(a (6,), b (4,))`` of a GR-KAN rational that approximates ``name``.

    ``"identity"`` is exact (``a = (0, 1, 0, 0, 0, 0)``, ``b = 0``). For
    ``"gelu"`` (exact, erf-based) and ``"swish"`` (``x * sigmoid(x)``), the fit
    minimises ``sum_i (P(x_i) / Q(x_i) - f(x_i))^2`` over ``num`` points of
    ``[lo, hi]`` (KAT fits on ``[-3, 3]``) by the Sanathanan-Koerner
    iteration: repeated linear least squares of ``(P(x) - f(x) Q(x)) / Q_prev(x)``
    with ``|b_j| = c_j >= 0`` as the unknowns (bounded least squares, scipy).
    Float64 numpy, computed once per arguments (cached).
    """
    if name not in RATIONAL_INITS:
        raise ValueError(f"unknown rational init {name!r}; expected one of {RATIONAL_INITS}")
    if name == "identity":
        return np.array([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]), np.zeros(4)
    from scipy.optimize import lsq_linear

    fn = {"gelu": _gelu, "swish": _swish}[name]
    xs = np.linspace(lo, hi, num)
    fx = fn(xs)
    powers = np.stack([xs**k for k in range(6)], axis=1)  # P(x) = powers @ a
    abs_powers = np.stack([np.abs(xs) ** j for j in range(1, 5)], axis=1)  # Q(x) = 1 + abs_powers @ c
    lower = np.r_[np.full(6, -np.inf), np.zeros(4)]
    q = np.ones_like(xs)
    for _ in range(8):
        lhs = np.concatenate([powers, -fx[:, None] * abs_powers], axis=1) / q[:, None]
        sol = lsq_linear(lhs, fx / q, bounds=(lower, np.inf), method="bvls").x
        q = 1.0 + abs_powers @ sol[6:]
    return sol[:6], sol[6:]


class GroupRational(nnx.Module):
    """GR-KAN activation: ``y = P(x) / Q(x)`` with coefficients per channel group.

    Args:
        features: size of the last axis of the input; divisible by ``groups``.
        groups: number of channel groups (KAT uses 8).
        init: the function the rational starts as: one of :data:`RATIONAL_INITS`.
        impl: implementation of :func:`jaxopt_lab.kernels.grkan` (``None``: auto).
    """

    def __init__(self, features: int, groups: int = 8, init: str = "gelu", impl: str | None = None):
        _check_positive(features=features, groups=groups)
        if features % groups != 0:
            raise ValueError(f"features={features} is not divisible by groups={groups}")
        check_impl(impl)
        a, b = fit_rational(init)
        self.features = features
        self.groups = groups
        self.init = init
        self.impl = impl
        self.a = nnx.Param(jnp.asarray(np.tile(a, (groups, 1)), dtype=jnp.float32))
        self.b = nnx.Param(jnp.asarray(np.tile(b, (groups, 1)), dtype=jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return grkan(x, self.a[...], self.b[...], groups=self.groups, impl=self.impl)


class KATBlock(nnx.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + kan(ln(x))``.

    ``kan`` is KAT's GR-KAN MLP: ``rational_1 -> Linear(width, hidden) ->
    rational_2 -> Linear(hidden, width)``, with the rationals initialised to
    ``act_init`` (KAT: identity, then GELU). Attention is non-causal
    multi-head self-attention.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        hidden: int,
        groups: int = 8,
        act_init: Sequence[str] = ("identity", "swish"),
        impl: str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        _check_positive(width=width, heads=heads, hidden=hidden)
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        act_init = tuple(act_init)
        if len(act_init) != 2:
            raise ValueError(f"act_init must name two rational inits, got {act_init!r}")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.ln_attn = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, kernel_init=_INIT, rngs=rngs)
        self.attn_out = nnx.Linear(width, width, kernel_init=_INIT, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(width, rngs=rngs)
        self.act1 = GroupRational(width, groups, act_init[0], impl)
        self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
        self.act2 = GroupRational(hidden, groups, act_init[1], impl)
        self.fc2 = nnx.Linear(hidden, width, rngs=rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.attn_out(out.reshape(batch, length, self.width))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.ln_attn(x))
        return x + self.fc2(self.act2(self.fc1(self.act1(self.ln_mlp(x)))))


class KAT(nnx.Module):
    """Kolmogorov-Arnold Transformer classifier: a ViT with GR-KAN MLPs (sized for 8x8 digits).

    Images are cut into ``patch_size x patch_size`` patches, embedded linearly,
    prefixed with a learned class token, given learned positional embeddings
    and passed through ``depth`` :class:`KATBlock` s; the head reads the class
    token after a final LayerNorm.

    Args:
        num_classes: number of output logits.
        image_size: side of the square ``(B, image_size, image_size, C)`` input.
        in_channels: channels ``C`` of the input images.
        patch_size: side of a patch; must divide ``image_size``.
        width: model width; divisible by ``heads`` and ``groups``.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: the GR-KAN MLP's hidden width is ``mlp_ratio * width``.
        groups: channel groups of each rational (KAT: 8).
        act_init: initial functions of the two rationals of each MLP (KAT's
            released models: ``("identity", "swish")``); see :data:`RATIONAL_INITS`.
        impl: implementation of the GR-KAN activation: ``None`` (auto: Pallas on
            GPU/TPU, reference on CPU), ``"pallas"``, ``"interpret"``, ``"reference"``.
        rngs: random streams for the parameter initialisation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 8,
        in_channels: int = 1,
        patch_size: int = 2,
        width: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: int = 2,
        groups: int = 8,
        act_init: Sequence[str] = ("identity", "swish"),
        impl: str | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        _check_positive(num_classes=num_classes, image_size=image_size, in_channels=in_channels,
                        patch_size=patch_size, width=width, depth=depth, heads=heads,
                        mlp_ratio=mlp_ratio, groups=groups)
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        if width % groups != 0:
            raise ValueError(f"width={width} is not divisible by groups={groups}")
        check_impl(impl)
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.width = width
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nnx.Linear(patch_size * patch_size * in_channels, width, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
        self.pos_embed = nnx.Param(_INIT(rngs.params(), (1, self.num_patches + 1, width), jnp.float32))
        self.blocks = nnx.List(
            [KATBlock(width, heads, mlp_ratio * width, groups, act_init, impl, rngs=rngs) for _ in range(depth)]
        )
        self.ln_final = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, kernel_init=_INIT, rngs=rngs)

    def set_impl(self, impl: str | None) -> None:
        """Switches every GR-KAN activation of the model to ``impl`` (parameters unchanged)."""
        check_impl(impl)
        for _, module in nnx.iter_graph(self):
            if isinstance(module, GroupRational):
                module.impl = impl

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(B, H, W, C)`` images to ``(B, num_classes)`` logits."""
        s, c, p = self.image_size, self.in_channels, self.patch_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (s, s, c):
            raise ValueError(f"expected images of shape (B, {s}, {s}, {c}), got shape {tuple(x.shape)}")
        batch = x.shape[0]
        patches = x.reshape(batch, s // p, p, s // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.patch_embed(patches.reshape(batch, self.num_patches, p * p * c))
        cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, self.width))
        h = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_final(h[:, 0]))
