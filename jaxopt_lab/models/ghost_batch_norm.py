"""Ghost Batch Normalization: batch norm over small "ghost" batches of a large batch.

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks" (NeurIPS 2017),
https://arxiv.org/abs/1705.08741, Algorithm 1. Official code:
https://github.com/eladhoffer/bigBatch (``GhostBatchNorm`` splits the batch into
chunks and runs ``F.batch_norm`` on each, updating the running statistics once
per chunk).

Training mode. A batch of ``B = n * g`` examples is split, in order, into ``n``
ghost batches of ``g`` examples; ghost batch ``l`` is normalized with its own
statistics over the example (and spatial) axes:

.. math::
    \\mu_l = \\mathrm{mean}(x_l), \\quad \\sigma_l^2 = \\mathrm{mean}((x_l - \\mu_l)^2), \\quad
    y_l = \\gamma \\frac{x_l - \\mu_l}{\\sqrt{\\sigma_l^2 + \\epsilon}} + \\beta

and the running statistics are updated once per ghost batch, in order, with
flax's convention ``r <- m r + (1 - m) s_l`` (``m`` = ``momentum``, biased
variance), i.e. ``r <- m^n r + (1 - m) sum_l m^(n-1-l) s_l`` for the whole
batch. So the layer with ``ghost_size = B`` is exactly ``nnx.BatchNorm``, and in
general it equals ``nnx.BatchNorm`` applied to each ghost batch in turn
(outputs and running statistics). Evaluation mode (``use_running_average``,
set by ``model.eval()``) normalizes with the running statistics, as batch norm
does. Deliberate difference from the official PyTorch code: flax's momentum
convention and the biased running variance (PyTorch keeps the unbiased one),
so that ``ghost_size = B`` reduces to ``nnx.BatchNorm``.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from flax import nnx


class GhostBatchNorm(nnx.Module):
    """Batch norm over ghost batches of ``ghost_size`` examples (feature axis last).

    Args:
        num_features: size of the last (feature) axis.
        ghost_size: examples per ghost batch; a training batch must be a multiple of it.
        momentum: running-statistics decay in ``[0, 1)`` (flax convention, default 0.99).
        epsilon: added to the variance, ``> 0``.
        use_running_average: normalize with the running statistics (evaluation);
            ``model.eval()`` / ``model.train()`` set it.
        use_bias, use_scale: learn the shift ``beta`` / scale ``gamma``.
        rngs: unused (no random initialisation); accepted like ``nnx.BatchNorm``.
    """

    def __init__(
        self,
        num_features: int,
        ghost_size: int = 32,
        *,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        use_bias: bool = True,
        use_scale: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        for name, value in (("num_features", num_features), ("ghost_size", ghost_size)):
            try:
                ok = not isinstance(value, bool) and operator.index(value) >= 1
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.num_features = int(num_features)
        self.ghost_size = int(ghost_size)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.use_running_average = bool(use_running_average)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if use_bias else None

    def _affine(self, y: jax.Array) -> jax.Array:
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalizes ``(B, ..., num_features)``; in training ``B`` must be a multiple of ``ghost_size``."""
        if x.ndim < 2 or x.shape[-1] != self.num_features:
            raise ValueError(f"expected inputs of shape (B, ..., {self.num_features}), got shape {tuple(x.shape)}")
        running = self.use_running_average if use_running_average is None else use_running_average
        if running:
            y = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
            return self._affine(y).astype(x.dtype)
        batch = x.shape[0]
        if batch % self.ghost_size:
            raise ValueError(f"batch size {batch} is not a multiple of ghost_size={self.ghost_size}")
        n = batch // self.ghost_size
        g = x.reshape((n, self.ghost_size) + x.shape[1:])
        compute = jnp.promote_types(x.dtype, jnp.float32)
        axes = tuple(range(1, g.ndim - 1))
        mu = jnp.mean(g.astype(compute), axis=axes, keepdims=True)  # (n, 1, ..., 1, C)
        var = jnp.mean(jnp.square(g.astype(compute) - mu), axis=axes, keepdims=True)
        y = ((g - mu) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        # sequential EMA over the ghost batches, in closed form: weight (1-m) m^(n-1-l) on ghost batch l
        m = self.momentum
        weights = (1.0 - m) * m ** jnp.arange(n - 1, -1, -1, dtype=compute)
        mus, vars_ = mu.reshape(n, -1), var.reshape(n, -1)
        self.mean[...] = (m**n * self.mean[...] + weights @ mus).astype(self.mean[...].dtype)
        self.var[...] = (m**n * self.var[...] + weights @ vars_).astype(self.var[...].dtype)
        return self._affine(y).astype(x.dtype)
