"""AdamP and SGDP: no radial step on scale-invariant weights.

Heo, Chun, Oh, Han, Yun, Kim, Uh & Ha, "AdamP: Slowing Down the Slowdown for
Momentum Optimizers on Scale-invariant Weights" (ICLR 2021),
https://arxiv.org/abs/2006.08217. Reference code: github.com/clovaai/AdamP,
also ``torch_optimizer.AdamP`` / ``torch_optimizer.SGDP``, whose step this
module reproduces (see :func:`scale_by_adamp` for the exact conventions).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms._numerics import abs_sq, compute_dtype, one_minus, one_minus_power, unzip


class ScaleByAdamPState(NamedTuple):
    """State of :func:`scale_by_adamp`."""

    count: jax.Array  # steps taken, int32 scalar
    mu: optax.Updates  # first moment, not bias-corrected
    nu: optax.Updates  # second moment, not bias-corrected


class ScaleBySGDPState(NamedTuple):
    """State of :func:`scale_by_sgdp`."""

    trace: optax.Updates  # momentum buffer


def _remove_radial(grad, param, perturb, *, delta, wd_ratio, eps, channel_axis):
    r"""AdamP's projection of one tensor; returns ``(perturb, weight-decay ratio)``.

    All three arrays are in the compute dtype. Tensors with ``ndim <= 1`` are
    left alone (ratio 1), as in the reference code.
    """
    if param.ndim <= 1 or param.size == 0:
        return perturb, jnp.ones((), perturb.dtype)
    if not -param.ndim <= channel_axis < param.ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for a parameter of shape {param.shape}")
    axis = channel_axis % param.ndim
    per_channel = tuple(i for i in range(param.ndim) if i != axis)
    whole = tuple(range(param.ndim))

    def dot(a, b, axes):  # the real inner product (of complex tensors too, as vectors of R²)
        return jnp.sum((a.conj() * b).real if jnp.iscomplexobj(a) else a * b, axis=axes, keepdims=True)

    def norm(x, axes):
        return jnp.sqrt(jnp.sum(abs_sq(x), axis=axes, keepdims=True))

    def view(axes):
        """Whether max |cos(grad, param)| over the slices is below delta/sqrt(slice size); param's norms."""
        w_norm = norm(param, axes)
        cos = jnp.abs(dot(grad, param, axes)) / (norm(grad, axes) + eps) / (w_norm + eps)
        size = math.prod(param.shape[i] for i in axes)
        return jnp.max(cos) < delta / math.sqrt(size), w_norm

    def project(axes, w_norm):
        unit = param / (w_norm + eps)
        return perturb - unit * dot(unit, perturb, axes)

    # The channel view is tried first; the layer view only when it fails.
    channel_ok, channel_norm = view(per_channel)
    layer_ok, layer_norm = view(whole)
    out = jnp.where(
        channel_ok,
        project(per_channel, channel_norm),
        jnp.where(layer_ok, project(whole, layer_norm), perturb),
    )
    ratio = jnp.where(channel_ok | layer_ok, jnp.asarray(wd_ratio, out.dtype), jnp.ones((), out.dtype))
    return out, ratio


def _check_projection_args(eps, weight_decay, delta, wd_ratio, channel_axis) -> int:
    check.non_negative("eps", eps)
    check.non_negative("weight_decay", weight_decay)
    check.non_negative("delta", delta)
    check.non_negative("wd_ratio", wd_ratio)
    return check.static_axis("channel_axis", channel_axis)


def scale_by_adamp(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    channel_axis: int = -1,
) -> optax.GradientTransformation:
    r"""Rescale updates by AdamP's direction (Heo et al., 2021), weight decay included.

    Elementwise Adam moments of the raw gradient :math:`g_t` (:math:`t \ge 1`):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \qquad
        p_t = \frac{m_t \;\text{or, nesterov,}\; \beta_1 m_t + (1-\beta_1) g_t}
                   {\sqrt{v_t / (1-\beta_2^t)} + \epsilon},

    then :math:`p_t` is projected (below) and the output is

    .. math::
        u_t = \frac{p_t}{1-\beta_1^t} + \lambda\, r\, \theta_{t-1},

    with :math:`r` = ``wd_ratio`` where the projection applied and 1 elsewhere.
    Chained with :func:`optax.scale_by_learning_rate` this is the reference
    step :math:`\theta \leftarrow \theta(1 - \eta\lambda r) - \frac{\eta}{1-\beta_1^t} p_t`:
    decoupled weight decay, multiplied by the learning rate (AdamW-style).
    The projection test uses the weights *before* the decay, as the reference
    does; :math:`\epsilon` is added to :math:`\sqrt{\hat v_t}` (optax and PyTorch
    ``Adam`` placement) and also guards the norms of the projection.

    **Projection** (per parameter tensor :math:`w` with :math:`\operatorname{ndim}
    \ge 2`; vectors and scalars are left alone). Two views of :math:`w` are
    tried, in order: the *channel* view (one slice per output channel, i.e.
    per index of ``channel_axis``, :math:`d` = number of elements of a slice)
    and the *layer* view (the whole tensor, :math:`d` = its size). For the first
    view in which

    .. math::
        \max_{\text{slices } s} \frac{|\langle g_s, w_s\rangle|}
            {(\lVert g_s\rVert + \epsilon)(\lVert w_s\rVert + \epsilon)}
        < \frac{\delta}{\sqrt d}

    (:math:`g` the raw gradient: :math:`w` looks scale-invariant), the radial
    component is removed from the step slice by slice,
    :math:`p_s \leftarrow p_s - \hat w_s \langle \hat w_s, p_s\rangle` with
    :math:`\hat w_s = w_s / (\lVert w_s\rVert + \epsilon)`, and the weight decay
    is multiplied by ``wd_ratio``. Otherwise the step is unchanged.

    **channel_axis.** The reference code reshapes a torch weight to
    ``(size(0), -1)``: its channel axis is the first one (``out_features`` of a
    ``Linear`` weight ``(out, in)``, ``out_channels`` of a ``Conv2d`` weight
    ``(out, in, kh, kw)``). Flax (``nnx.Linear``, ``nnx.Conv``, ``linen.Dense``,
    ``linen.Conv``) stores kernels as ``(in, out)`` and ``(kh, kw, in, out)``:
    output channels *last*, hence the default ``channel_axis=-1``. Pass
    ``channel_axis=0`` for torch-layout weights. Norms and dot products do not
    depend on the order of the other axes, so a flax kernel with
    ``channel_axis=-1`` gets exactly the step of its transposed torch weight.
    Under ``optax.inject_hyperparams`` list ``"channel_axis"`` in
    ``static_args`` (it indexes an axis, so it cannot be traced).

    The arithmetic is done in float32 (or wider); moments are stored in the
    parameters' dtype and the updates returned in the gradients' dtype.

    Args:
      b1: decay rate :math:`\beta_1` of the first moment, in [0, 1).
      b2: decay rate :math:`\beta_2` of the second moment, in [0, 1).
      eps: :math:`\epsilon` >= 0.
      weight_decay: decoupled weight decay :math:`\lambda` >= 0.
      delta: :math:`\delta` >= 0, threshold of the scale-invariance test.
      wd_ratio: :math:`r` >= 0, weight-decay factor of projected tensors.
      nesterov: use the Nesterov form of the first moment.
      channel_axis: axis of the output channels (default -1, flax layout).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.in_unit_interval("b1", b1)
    check.in_unit_interval("b2", b2)
    channel_axis = _check_projection_args(eps, weight_decay, delta, wd_ratio, channel_axis)

    def init_fn(params):
        return ScaleByAdamPState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_adamp needs params: call update(grads, state, params)")
        count = optax.safe_increment(state.count)
        beta1, beta2 = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
        bc1, bc2 = one_minus_power(b1, count), one_minus_power(b2, count)

        def leaf(g, w, m, v):
            ct = compute_dtype(g.dtype)
            gf, wf = g.astype(ct), w.astype(ct)
            c1, c2 = beta1.astype(ct), beta2.astype(ct)
            m_new = c1 * m.astype(ct) + one_minus(b1, ct) * gf
            v_new = c2 * v.astype(ct) + one_minus(b2, ct) * abs_sq(gf)
            denom = jnp.sqrt(v_new) / jnp.sqrt(bc2.astype(ct)) + jnp.asarray(eps, ct)
            perturb = (c1 * m_new + one_minus(b1, ct) * gf if nesterov else m_new) / denom
            perturb, ratio = _remove_radial(
                gf, wf, perturb, delta=delta, wd_ratio=wd_ratio, eps=jnp.asarray(eps, ct), channel_axis=channel_axis
            )
            u = perturb / bc1.astype(ct) + jnp.asarray(weight_decay, ct) * ratio * wf
            return u.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

        treedef = jax.tree.structure(updates)
        out = jax.tree.map(leaf, updates, params, state.mu, state.nu)
        u, mu, nu = unzip(treedef, out, 3)
        return u, ScaleByAdamPState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    channel_axis: int = -1,
) -> optax.GradientTransformation:
    r"""The AdamP optimizer (Heo et al., 2021): Adam without radial steps on scale-invariant weights.

    ``optax.chain(scale_by_adamp(...), optax.scale_by_learning_rate(learning_rate))``:

    .. math::
        \theta_t = \theta_{t-1} - \eta_t\Bigl(\frac{\Pi(p_t)}{1-\beta_1^t} + \lambda r\,\theta_{t-1}\Bigr)

    with :math:`\Pi` the projection and :math:`p_t, r` as in
    :func:`scale_by_adamp` (which documents ``channel_axis``: -1 for flax
    kernels, 0 for torch-layout weights). Same defaults as the reference.

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or an optax schedule.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: >= 0, added to :math:`\sqrt{\hat v}` and to the projection's norms.
      weight_decay: decoupled weight decay :math:`\lambda` >= 0 (times :math:`\eta`).
      delta: threshold of the scale-invariance test, >= 0.
      wd_ratio: weight-decay factor of projected tensors, >= 0.
      nesterov: Nesterov form of the first moment.
      channel_axis: axis of the output channels (static int).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_adamp(
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            channel_axis=channel_axis,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def scale_by_sgdp(
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    channel_axis: int = -1,
) -> optax.GradientTransformation:
    r"""Rescale updates by SGDP's direction (Heo et al., 2021), weight decay included.

    With the raw gradient :math:`g_t` and a momentum buffer starting at 0:

    .. math::
        b_t = \mu\, b_{t-1} + (1 - \tau)\, g_t, \qquad
        p_t = b_t \;\text{or, nesterov,}\; g_t + \mu\, b_t ,

    (:math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``; the dampening
    applies from the first step on, unlike ``torch.optim.SGD``), then
    :math:`p_t` is projected (below) and the output is

    .. math::
        u_t = p_t + \frac{\lambda\, r}{1 - \mu}\, \theta_{t-1},

    with :math:`r` = ``wd_ratio`` where the projection applied, 1 elsewhere.
    The :math:`1/(1-\mu)` factor is the reference code's (it keeps the decay,
    which bypasses the buffer, in pace with the momentum step, whose
    steady-state size is :math:`1/(1-\mu)` times the gradient's).

    **Projection**: exactly that of :func:`scale_by_adamp`, with the same
    ``channel_axis`` convention (default -1: output channels last, the flax
    layout; 0 for torch-layout weights; a static argument under
    ``optax.inject_hyperparams``).

    Args:
      momentum: :math:`\mu` in [0, 1).
      dampening: :math:`\tau` in [0, 1].
      weight_decay: decoupled weight decay :math:`\lambda` >= 0.
      nesterov: Nesterov momentum.
      eps: :math:`\epsilon` >= 0, guards the projection's norms.
      delta: :math:`\delta` >= 0, threshold of the scale-invariance test.
      wd_ratio: :math:`r` >= 0, weight-decay factor of projected tensors.
      channel_axis: axis of the output channels (default -1, flax layout).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.in_unit_interval("momentum", momentum)
    check.require("dampening", dampening, lambda v: 0 <= v <= 1, "in [0, 1]")
    channel_axis = _check_projection_args(eps, weight_decay, delta, wd_ratio, channel_axis)

    def init_fn(params):
        return ScaleBySGDPState(trace=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_sgdp needs params: call update(grads, state, params)")

        def leaf(g, w, b):
            ct = compute_dtype(g.dtype)
            gf, wf = g.astype(ct), w.astype(ct)
            mom = jnp.asarray(momentum, ct)
            b_new = mom * b.astype(ct) + one_minus(dampening, ct) * gf
            perturb = gf + mom * b_new if nesterov else b_new
            perturb, ratio = _remove_radial(
                gf, wf, perturb, delta=delta, wd_ratio=wd_ratio, eps=jnp.asarray(eps, ct), channel_axis=channel_axis
            )
            u = perturb + jnp.asarray(weight_decay, ct) * ratio / one_minus(momentum, ct) * wf
            return u.astype(g.dtype), b_new.astype(b.dtype)

        treedef = jax.tree.structure(updates)
        out = jax.tree.map(leaf, updates, params, state.trace)
        u, trace = unzip(treedef, out, 2)
        return u, ScaleBySGDPState(trace=trace)

    return optax.GradientTransformation(init_fn, update_fn)


def sgdp(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    channel_axis: int = -1,
) -> optax.GradientTransformation:
    r"""The SGDP optimizer (Heo et al., 2021): momentum SGD without radial steps on scale-invariant weights.

    ``optax.chain(scale_by_sgdp(...), optax.scale_by_learning_rate(learning_rate))``:

    .. math::
        \theta_t = \theta_{t-1} - \eta_t\Bigl(\Pi(p_t) + \frac{\lambda r}{1-\mu}\theta_{t-1}\Bigr)

    with :math:`\Pi` the projection and :math:`p_t, r` as in
    :func:`scale_by_sgdp` (which documents ``channel_axis``: -1 for flax
    kernels, 0 for torch-layout weights). Argument order and meaning are the
    reference ``SGDP``'s, defaults included (momentum 0, as in clovaai/AdamP ``SGDP.__init__``).

    Args:
      learning_rate: :math:`\eta`, a float >= 0 or an optax schedule.
      momentum: :math:`\mu` in [0, 1).
      dampening: in [0, 1], scales the gradient entering the buffer.
      weight_decay: decoupled weight decay :math:`\lambda` >= 0 (times :math:`\eta/(1-\mu)`).
      nesterov: Nesterov momentum.
      eps: >= 0, guards the projection's norms.
      delta: threshold of the scale-invariance test, >= 0.
      wd_ratio: weight-decay factor of projected tensors, >= 0.
      channel_axis: axis of the output channels (static int).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_sgdp(
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            channel_axis=channel_axis,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
