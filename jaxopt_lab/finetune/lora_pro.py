r"""LoRA-Pro: adjust the gradients of LoRA's factors so that the low-rank step best matches full fine-tuning.

Wang, Liang, He, Wang & Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (ICLR 2025),
https://arxiv.org/abs/2407.18242; official code https://github.com/mrflogs/LoRA-Pro (the rule
is ``lorapro_full_adjustment`` in its ``DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py``).

In the paper's (PyTorch) orientation ``W' = W + s B A`` with ``B`` (m x r), ``A`` (r x n); a
step ``(g^A, g^B)`` on the factors moves ``W'`` by the *equivalent gradient*
``g̃ = s (B g^A + g^B A)``. With the full gradient ``g`` (m x n) the LoRA gradients are
``g^A_lora = s Bᵀ g`` and ``g^B_lora = s g Aᵀ``. LoRA-Pro picks ``(g^A, g^B)`` minimising
``‖g̃ - g‖_F`` (Theorem 2.1)::

    g^A = (1/s²) (BᵀB)⁻¹ g^A_lora + X A
    g^B = (1/s²) [I - B (BᵀB)⁻¹ Bᵀ] g^B_lora (AAᵀ)⁻¹ - B X

for any r x r ``X`` (every X gives the same ``g̃``), and among them the one closest to the
LoRA gradients (Theorem 2.2) has ``X`` solving the Sylvester equation::

    BᵀB X + X AAᵀ = -(1/s²) (BᵀB)⁻¹ g^A_lora Aᵀ.

``mode="sgd"`` returns that ``(g^A, g^B)``. ``mode="adamw"`` (the paper's Algorithm 2 and the
official code's default) keeps Adam's moments of the *full-size* equivalent gradient ``g̃``
(m x n per adapted layer: the memory of full fine-tuning's Adam, as the official code does),
turns ``m̂ / (√v̂ + ε)`` back into LoRA gradients ``s Bᵀ(·)``, ``s (·) Aᵀ`` and applies the
adjustment above to them; the result is then applied with plain SGD (the official scripts
run ``optim="sgd"``).

As the official code: the inverses are ``pinv(M + δ I)`` with ``δ = 1e-8``; the Sylvester
equation uses ``BᵀB`` and ``AAᵀ`` without ``δ`` (solved here by the eigendecompositions of the
two symmetric matrices, a zero denominator giving 0 instead of the official's NaN); the
bias corrections use the step number plus one (``step_offset=1``: the official code
increments its step counter before the adjustment and then adds one; ``step_offset=0``
gives Adam's usual correction). Checked line by line against ``lorapro_full_adjustment``
(commit fe26027): the first-pass adjustment without ``X``, the moments of ``g̃`` (the first
step's ``(1-β₁) g̃``, ``(1-β₂) g̃²`` as a zero-initialised EMA), ``ε = 1e-8`` added to
``√v / √(1-β₂ᵗ)``, the LoRA gradients ``s Bᵀ d``, ``s d Aᵀ`` of the Adam direction ``d`` and the
Sylvester solve ``BᵀB X + X AAᵀ = -(1/s²)(BᵀB+δI)⁺ g^A Aᵀ`` are the same here. Differences:

* precision: the moments here are float32 (or the parameters' dtype where wider); the
  official run keeps them in the model's bfloat16, and rounds ``g̃²`` through bfloat16;
* clipping: the official scripts leave Hugging Face's ``max_grad_norm=1.0`` on, which
  DeepSpeed applies *after* the adjustment, dividing the adjusted directions by
  ``max(1, (‖raw LoRA gradients‖ + 1e-6) / 1.0)`` (the norm of the gradients before any
  adjustment). Here ``clip_norm=None`` (default) does not clip: as in that comparison, where
  every method ran under the same trainer clipping, clipping is the trainer's business;
  ``clip_norm=1.0`` reproduces the official run's;
* weight decay: the official scripts use 0 and apply the update with ``torch.optim.SGD``;
  ``weight_decay`` here is SGD's (``λ p`` added to the adjusted direction of A and B before the
  learning rate), the same rule;
* other trainable leaves: the official code pairs every trainable tensor as (A, B); here
  leaves outside an adapter get Adam (``adamw``) or pass unchanged (``sgd``).

The factors are found by path (:func:`jaxopt_lab.finetune.lora_pairs`: ``.../lora/lora_a``,
``.../lora/lora_b``, flax's ``(in x r)`` and ``(r x out)``, the transposes of the paper's).
Frozen parameters should not reach it: wrap it with
:func:`jaxopt_lab.finetune.freeze_base`, as a fine-tuning config does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.finetune.lora import flatten_with_paths, lora_pairs
from jaxopt_lab.transforms import _validation as check

MODES = ("adamw", "sgd")


class ScaleByLoRAProState(NamedTuple):
    """``count``: steps taken; ``mu``/``nu``: Adam's moments (``adamw`` only), shaped as the params:
    at each adapter's A the moment of its full-size equivalent gradient (flax orientation, in x
    out), at its B a scalar placeholder, at any other leaf its own moment."""

    count: jax.Array
    mu: tuple
    nu: tuple


def _wide(dtype):
    """The computing dtype: float32, or the parameters' own where wider (float64 tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def _pinv_reg(m: jax.Array, delta: float) -> jax.Array:
    return jnp.linalg.pinv(m + delta * jnp.eye(m.shape[0], dtype=m.dtype))


def solve_sylvester_sym(m: jax.Array, n: jax.Array, c: jax.Array) -> jax.Array:
    """X with ``m X + X n = c`` for symmetric ``m`` (r x r) and ``n`` (k x k), by their
    eigendecompositions; a zero denominator ``λ_i + μ_j`` gives 0."""
    lam, u = jnp.linalg.eigh(m)
    mu, v = jnp.linalg.eigh(n)
    f = u.T @ c @ v
    den = lam[:, None] + mu[None, :]
    y = jnp.where(den == 0, 0.0, f / jnp.where(den == 0, 1.0, den))
    return u @ y @ v.T


def adjust(a: jax.Array, b: jax.Array, ga: jax.Array, gb: jax.Array, scale: float, delta: float,
           with_x: bool = True) -> tuple[jax.Array, jax.Array]:
    """LoRA-Pro's closed form in the paper's orientation: ``A`` (r x n), ``B`` (m x r), LoRA
    gradients ``ga`` (r x n), ``gb`` (m x r) -> adjusted ``(g^A, g^B)`` (with the Sylvester ``X``
    when ``with_x``)."""
    s2 = 1.0 / scale**2
    aat, btb = a @ a.T, b.T @ b
    aat_inv, btb_inv = _pinv_reg(aat, delta), _pinv_reg(btb, delta)
    new_a = s2 * (btb_inv @ ga)
    new_b = s2 * ((gb - b @ (btb_inv @ (b.T @ gb))) @ aat_inv)
    if with_x:
        x = solve_sylvester_sym(btb, aat, -s2 * (btb_inv @ ga @ a.T))
        new_a = new_a + x @ a
        new_b = new_b - b @ x
    return new_a, new_b


def scale_by_lora_pro(scale: float = 2.0, mode: str = "adamw", b1: float = 0.9, b2: float = 0.999,
                      eps: float = 1e-8, delta: float = 1e-8, step_offset: int = 1,
                      clip_norm: float | None = None) -> optax.GradientTransformation:
    r"""LoRA-Pro's adjusted directions for every (A, B) pair of the tree (see the module docstring)::

        ĝ_A = (1/s²)(BᵀB)⁻¹ g_A + X A,   ĝ_B = (1/s²)[I - B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ - B X,
        BᵀB X + X AAᵀ = -(1/s²)(BᵀB)⁻¹ g_A Aᵀ,

    with ``(g_A, g_B)`` the raw LoRA gradients (``sgd``) or, in ``adamw``, ``s Bᵀ d`` and ``s d Aᵀ``
    for Adam's direction ``d = m̂ / (√v̂ + ε)`` of the moments of ``g̃ = s (B g̃_A + g̃_B A)`` (the
    equivalent gradient of the first, X-free adjustment of the raw gradients). Paper orientation.

    Args:
      scale: the adapters' ``s = alpha / rank`` (the model's ``lora.alpha / lora.rank``; the
        official code hard-codes 16 / 8 = 2).
      mode: ``"adamw"`` (Adam on the full-size equivalent gradient, then the adjustment;
        the official default) or ``"sgd"`` (the adjustment of the raw LoRA gradients).
      b1, b2, eps: Adam's (``adamw``).
      delta: the regulariser of the r x r inverses.
      step_offset: added to the step number in the bias corrections (1: the official code).
      clip_norm: if given, every output is divided by ``max(1, (‖g‖ + 1e-6) / clip_norm)``, ``‖g‖``
        the global norm of the incoming (unadjusted) gradients: DeepSpeed's clipping in the
        official runs (``clip_norm=1.0``, Hugging Face's default ``max_grad_norm``). None: no clipping.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.number("scale", scale, lambda v: v > 0, "a number > 0 (alpha / rank)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check.number("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)")
    check.number("b2", b2, lambda v: 0 <= v < 1, "in [0, 1)")
    check.number("eps", eps, lambda v: v >= 0, ">= 0")
    check.number("delta", delta, lambda v: v >= 0, ">= 0")
    step_offset = check.static_int("step_offset", step_offset, 0)
    if clip_norm is not None:
        check.number("clip_norm", clip_norm, lambda v: v > 0, "a number > 0 or None")
    adam = mode == "adamw"

    def split(tree):
        paths, leaves, treedef = flatten_with_paths(tree)
        pairs = lora_pairs(paths)
        in_pair = {i for p in pairs for i in (p.a, p.b)}
        others = [i for i in range(len(leaves)) if i not in in_pair]
        return leaves, treedef, pairs, others

    def init_fn(params):
        paths, leaves, _ = flatten_with_paths(params)
        for path, leaf in zip(paths, leaves):
            if jnp.iscomplexobj(leaf):
                raise ValueError(f"lora_pro takes real parameters; {path!r} is complex")
        leaves, _, pairs, others = split(params)
        if not adam:
            return ScaleByLoRAProState(jnp.zeros([], jnp.int32), (), ())
        treedef = jax.tree.structure(params)

        def zeros():  # params-shaped (optax.tree.map_params works), a fresh buffer per moment (donation)
            out = [jnp.zeros(leaves[i].shape, _wide(leaves[i].dtype)) for i in range(len(leaves))]
            for p in pairs:  # A's place holds the full-size moment of its layer, B's nothing
                out[p.a] = jnp.zeros((leaves[p.a].shape[0], leaves[p.b].shape[1]), _wide(leaves[p.a].dtype))
                out[p.b] = jnp.zeros((), _wide(leaves[p.b].dtype))  # a scalar placeholder (orbax saves no empty arrays)
            return jax.tree.unflatten(treedef, out)

        return ScaleByLoRAProState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_lora_pro needs params: call update(grads, state, params)")
        grads, treedef, pairs, others = split(updates)
        values = jax.tree.leaves(params)
        out = list(grads)
        count = state.count + 1
        t = count + step_offset

        def corrections(dtype):  # 1 - b**t as -expm1(t log b): no cancellation in float32
            tt = t.astype(dtype)
            return (-jnp.expm1(tt * jnp.log(jnp.asarray(b1, dtype))), -jnp.expm1(tt * jnp.log(jnp.asarray(b2, dtype))))

        if adam:
            mu, mu_def = jax.tree.flatten(state.mu)
            nu = jax.tree.flatten(state.nu)[0]
        for p in pairs:
            # flax (in x r), (r x out) -> the paper's A (r x n), B (m x r)
            dt = _wide(values[p.a].dtype)
            a, b = values[p.a].astype(dt).T, values[p.b].astype(dt).T
            ga, gb = grads[p.a].astype(dt).T, grads[p.b].astype(dt).T
            if adam:
                bc1, bc2 = corrections(dt)
                ea, eb = adjust(a, b, ga, gb, scale, delta, with_x=False)
                equiv = (scale * (b @ ea + eb @ a)).T  # flax orientation (in x out)
                k = p.a
                mu[k] = b1 * mu[k] + (1 - b1) * equiv
                nu[k] = b2 * nu[k] + (1 - b2) * equiv * equiv
                g = ((mu[k] / bc1) / (jnp.sqrt(nu[k]) / jnp.sqrt(bc2) + eps)).T  # paper orientation (m x n)
                ga, gb = scale * (b.T @ g), scale * (g @ a.T)
            na, nb = adjust(a, b, ga, gb, scale, delta, with_x=True)
            out[p.a] = na.T.astype(grads[p.a].dtype)
            out[p.b] = nb.T.astype(grads[p.b].dtype)
        if adam:
            for k in others:
                i = k
                g = grads[i].astype(_wide(grads[i].dtype))
                bc1, bc2 = corrections(g.dtype)
                mu[k] = b1 * mu[k] + (1 - b1) * g
                nu[k] = b2 * nu[k] + (1 - b2) * g * g
                out[i] = ((mu[k] / bc1) / (jnp.sqrt(nu[k]) / jnp.sqrt(bc2) + eps)).astype(grads[i].dtype)
            mu, nu = jax.tree.unflatten(mu_def, mu), jax.tree.unflatten(mu_def, nu)
        else:
            mu, nu = state.mu, state.nu
        if clip_norm is not None:  # DeepSpeed's unscale_and_clip_grads, with the norm of the raw gradients
            norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(_wide(g.dtype)), updates))
            divisor = jnp.maximum(1.0, (norm + 1e-6) / clip_norm)
            out = [(o / divisor).astype(o.dtype) for o in out]
        return jax.tree.unflatten(treedef, out), ScaleByLoRAProState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro(learning_rate: optax.ScalarOrSchedule, scale: float = 2.0, mode: str = "adamw", b1: float = 0.9,
             b2: float = 0.999, eps: float = 1e-8, delta: float = 1e-8, weight_decay: float = 0.0,
             step_offset: int = 1, clip_norm: float | None = None) -> optax.GradientTransformation:
    r"""LoRA-Pro: :func:`scale_by_lora_pro`, weight decay (0: the official scripts), the learning rate::

        (A, B) ← (A, B) - η (ĝ_{A,B} + λ (A, B)),

    ``ĝ`` the adjusted directions of :func:`scale_by_lora_pro` (the official ``torch.optim.SGD`` step).

    Args:
      learning_rate: a number or an optax schedule.
      weight_decay: decoupled weight decay on the trained leaves (the paper's λ).
      scale, mode, b1, b2, eps, delta, step_offset, clip_norm: see :func:`scale_by_lora_pro`.
    """
    check.non_negative("weight_decay", weight_decay)
    return optax.chain(
        scale_by_lora_pro(scale, mode, b1, b2, eps, delta, step_offset, clip_norm),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
