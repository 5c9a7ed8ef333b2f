r"""Asynchronous Local-SGD's server rule: the delayed Nesterov momentum update, and dynamic local steps.

Liu, Chhaparia, Douillard, Kale, Rusu, Shen, Szlam & Ranzato, "Asynchronous
Local-SGD Training for Language Modeling" (2024),
https://arxiv.org/abs/2401.09135: "We propose a novel method that utilizes a
delayed Nesterov momentum update and adjusts the workers' local training steps
based on their computation speed."

In asynchronous Local-SGD each worker, as soon as it has finished its local
steps, sends its pseudo-gradient :math:`g = \theta_\text{server} -
\theta_\text{worker}` (the server parameters it started from minus where it
ended) and the server updates at once. Naive Nesterov momentum applied at every
such arrival works badly with stale pseudo-gradients; the delayed Nesterov
update (:func:`scale_by_delayed_nesterov`) applies every arrival as a plain
step and updates the momentum only once every :math:`N` arrivals, on their
average. Dynamic local updates (:func:`dynamic_local_steps`) give slower
workers fewer local steps, so that every worker finishes a round in about the
same wall-clock time.

The rule is an optax transformation over pseudo-gradients: the event-driven
simulator calls ``update`` with one arrival, or with a batch of arrivals in
the order they reached the server.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.transforms import _validation as check
from jaxopt_lab.transforms._numerics import compute_dtype


class DelayedNesterovState(NamedTuple):
    """State of :func:`scale_by_delayed_nesterov`."""

    count: jax.Array  # arrivals processed (masked-out ones excluded), int32 scalar
    momentum: optax.Updates  # m: the outer momentum, float32 (or the parameters' wider type)
    buffer: optax.Updates  # Δ: sum of the pseudo-gradients since the last momentum update, same dtypes


def _buffer_size(value: Any) -> Any:
    """``buffer_size`` as a Python int >= 1; a traced value (inject_hyperparams) is let through."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_:
        raise ValueError(f"buffer_size must be an int >= 1, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if getattr(value, "shape", None) == () and jnp.issubdtype(getattr(value, "dtype", float), jnp.integer):
            value = int(value)  # a concrete integer array (optax.inject_hyperparams' init)
        else:
            raise ValueError(f"buffer_size must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"buffer_size must be an int >= 1, got {value!r}")
    return int(value)


def scale_by_delayed_nesterov(
    buffer_size: int,
    beta: float = 0.9,
    momentum_activation: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""The direction of the delayed Nesterov server update (Liu et al. 2024, "Delayed Nesterov Update").

    Arrivals are numbered :math:`t = 0, 1, \dots`; :math:`g_t` is the
    pseudo-gradient of arrival :math:`t`, :math:`N` = ``buffer_size`` (the paper
    sets it to the number of workers), :math:`\beta` = ``beta``, :math:`c` =
    ``momentum_activation``, :math:`m = 0` and :math:`\Delta = 0` at the start.
    At each arrival :math:`\Delta \leftarrow \Delta + g_t`, then

    .. math::
        \text{if } (t + 1) \bmod N = 0: \quad
            & m \leftarrow \beta m + \Delta / N, \quad
              u_t = (1 - cN + c)\, \beta m + g_t / N, \quad \Delta \leftarrow 0, \\
        \text{else}: \quad
            & u_t = c\, \beta m + g_t / N,

    and the server steps :math:`\theta \leftarrow \theta - \varepsilon\, u_t`
    (:func:`delayed_nesterov`). With the default :math:`c = 0`, every arrival is
    a plain step :math:`\varepsilon g_t / N` and every :math:`N`-th arrival
    also applies the momentum :math:`\varepsilon \beta m`: over :math:`N`
    arrivals the server moves by :math:`\varepsilon(\beta m + \Delta/N)`, one
    Nesterov step on the average pseudo-gradient. :math:`c \in [0, 1/N]` spreads
    a fraction of the (previous) momentum over the arrivals in between; the
    total momentum applied per :math:`N` arrivals stays :math:`\beta m`.

    Calling ``update``:

    * one arrival: ``update(g, state)``, ``g`` shaped like the parameters;
      optionally ``mask=`` a bool scalar (False: the arrival is skipped).
    * a batch: ``update(gs, state, mask=mask)``, every leaf of ``gs`` with a
      leading axis of size :math:`K` (``gs[k]`` the :math:`k`-th arrival, in
      arrival order) and ``mask`` a bool array of shape :math:`(K,)` (default:
      all present). The arrivals are processed in order by a ``lax.scan``; a
      masked-out arrival changes nothing (it is not counted toward :math:`N`).
      The result, shaped like the parameters, is the sum
      :math:`\sum_k u_{t_k}` of the steps of the arrivals present: the net
      server step, exactly what feeding them one by one would add up to.

    ``params`` is not used. Any other extra argument (``staleness``,
    ``num_examples``, ...) is accepted and ignored. Whether ``update`` got one
    arrival or a batch is told from the shapes: a batch's leaves have one more
    axis than the state's.

    The momentum and :math:`\Delta` are kept in float32 (or the parameters'
    wider type); the result has the pseudo-gradients' dtypes.

    Args:
      buffer_size: :math:`N \ge 1`, arrivals per momentum update (the paper:
        the number of workers). An int; static under ``optax.inject_hyperparams``
        is recommended (traced, its range is not checked).
      beta: :math:`\beta \in [0, 1)`, the momentum decay.
      momentum_activation: :math:`c \in [0, 1/N]` (the paper's default 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` over pseudo-gradients,
      taking the extra argument ``mask``.
    """
    n = _buffer_size(buffer_size)
    check.in_unit_interval("beta", beta)
    check.non_negative("momentum_activation", momentum_activation)
    if isinstance(n, int):
        check.require("momentum_activation", momentum_activation, lambda v: v <= 1 / n, f"<= 1/buffer_size = 1/{n}")

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), compute_dtype(jnp.asarray(p).dtype))  # noqa: E731
        return DelayedNesterovState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(zeros, params),
            buffer=jax.tree.map(zeros, params),
        )

    def arrival(count, m, buf, g):
        """One arrival: leaves lists in the state's dtypes; returns (count, m, buf, u)."""
        count = count + 1
        boundary = (count % jnp.asarray(n, jnp.int32)) == 0
        new_m, new_buf, u = [], [], []
        for mi, bi, gi in zip(m, buf, g):
            c = mi.dtype
            nn, b, ca = (jnp.asarray(v, jnp.float32).astype(c) for v in (n, beta, momentum_activation))
            gi = gi.astype(c)
            bi = bi + gi
            mi = jnp.where(boundary, b * mi + bi / nn, mi)
            coef = jnp.where(boundary, 1 - ca * nn + ca, ca)
            u.append(coef * b * mi + gi / nn)
            new_m.append(mi)
            new_buf.append(jnp.where(boundary, jnp.zeros_like(bi), bi))
        return count, new_m, new_buf, u

    def update_fn(updates, state, params=None, *, mask=None, **extra_args):
        del params, extra_args
        treedef = jax.tree.structure(state.momentum)
        try:
            g = treedef.flatten_up_to(updates)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"delayed_nesterov: the pseudo-gradients must have the parameters' tree structure {treedef}, got "
                f"{jax.tree.structure(updates)}"
            ) from e
        m = treedef.flatten_up_to(state.momentum)
        buf = treedef.flatten_up_to(state.buffer)
        extra = {jnp.ndim(gi) - mi.ndim for gi, mi in zip(g, m)}
        if not g:
            return updates, state
        if extra == {0}:
            batched = False
        elif extra == {1} and len({jnp.shape(gi)[0] for gi in g}) == 1:
            batched = True
        else:
            raise ValueError(
                "delayed_nesterov: pass one arrival (leaves shaped like the parameters) or a batch (every leaf with "
                f"the same extra leading axis K); got shapes {[jnp.shape(gi) for gi in g]} for parameters of shapes "
                f"{[mi.shape for mi in m]}"
            )
        for gi, mi in zip(g, m):
            if jnp.shape(gi)[int(batched) :] != mi.shape:
                raise ValueError(
                    f"delayed_nesterov: a pseudo-gradient leaf of shape {jnp.shape(gi)} does not match the parameter "
                    f"shape {mi.shape}"
                )
        k = jnp.shape(g[0])[0] if batched else None
        if mask is not None:
            mask = jnp.asarray(mask)
            want = (k,) if batched else ()
            if mask.dtype != jnp.bool_ or mask.shape != want:
                raise ValueError(
                    f"delayed_nesterov: mask must be a bool array of shape {want} "
                    f"({'one flag per arrival of the batch' if batched else 'one arrival'}), got "
                    f"{mask.dtype}{list(mask.shape)}"
                )
        out_dtypes = [jnp.asarray(gi).dtype for gi in g]

        if not batched:
            count, new_m, new_buf, u = arrival(state.count, m, buf, g)
            if mask is not None:
                keep = lambda new, old: jnp.where(mask, new, old)  # noqa: E731
                count = keep(count, state.count)
                new_m = [keep(a, b) for a, b in zip(new_m, m)]
                new_buf = [keep(a, b) for a, b in zip(new_buf, buf)]
                u = [keep(a, jnp.zeros_like(a)) for a in u]
        else:
            present = jnp.ones((k,), jnp.bool_) if mask is None else mask

            def step(carry, xs):
                count, m, buf, total = carry
                gk, ok = xs
                c2, m2, b2, u = arrival(count, m, buf, gk)
                keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
                carry = (
                    keep(c2, count),
                    [keep(a, b) for a, b in zip(m2, m)],
                    [keep(a, b) for a, b in zip(b2, buf)],
                    [t + jnp.where(ok, a, jnp.zeros_like(a)) for t, a in zip(total, u)],
                )
                return carry, None

            total0 = [jnp.zeros_like(mi) for mi in m]
            (count, new_m, new_buf, u), _ = jax.lax.scan(step, (state.count, m, buf, total0), (g, present))

        out = treedef.unflatten([a.astype(d) for a, d in zip(u, out_dtypes)])
        return out, DelayedNesterovState(count, treedef.unflatten(new_m), treedef.unflatten(new_buf))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def delayed_nesterov(
    learning_rate: optax.ScalarOrSchedule,
    buffer_size: int,
    beta: float = 0.9,
    momentum_activation: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Asynchronous Local-SGD's server optimizer: :math:`\theta \leftarrow \theta - \varepsilon\, u_t` per arrival.

    The chain of :func:`scale_by_delayed_nesterov` (see it for :math:`u_t`, the
    batch form and ``mask``) and ``optax.scale_by_learning_rate(learning_rate)``.
    Feed it pseudo-gradients :math:`g = \theta_\text{server} -
    \theta_\text{worker}` and add the result to the server parameters
    (``optax.apply_updates``).

    A schedule for ``learning_rate`` is indexed, as in every optax chain, by the
    number of ``update`` calls: by arrival when arrivals are fed one per call;
    a batch of arrivals is one call and all of its arrivals get the rate of that
    call.

    Args:
      learning_rate: :math:`\varepsilon \ge 0`, the outer learning rate (float or schedule).
      buffer_size: :math:`N`, arrivals per momentum update (the paper: the number of workers).
      beta: :math:`\beta \in [0, 1)`, the momentum decay.
      momentum_activation: :math:`c \in [0, 1/N]`, default 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` taking the extra argument
      ``mask`` (and ignoring others, such as ``staleness``).
    """
    check.non_negative("learning_rate", learning_rate)
    return optax.chain(
        scale_by_delayed_nesterov(buffer_size, beta=beta, momentum_activation=momentum_activation),
        optax.scale_by_learning_rate(learning_rate),
    )


def dynamic_local_steps(speeds: Any, base_steps: int) -> np.ndarray:
    r"""Dynamic local updates (Liu et al. 2024): :math:`H_w = \lfloor v_w / \max_{w'} v_{w'} \cdot H \rfloor`.

    The fastest worker takes :math:`H` = ``base_steps`` local steps per round
    and worker :math:`w`, of speed :math:`v_w` (steps per unit time), a share
    proportional to its speed, so that every worker's round takes about the
    same wall-clock time. The floor is taken with a tolerance of a few float64
    rounding errors, so that e.g. speed 0.29 of 1 with :math:`H = 100` gives 29
    (``0.29 * 100`` is ``28.999999999999996`` in floating point).

    Args:
      speeds: the workers' speeds :math:`v_w > 0`, finite, a 1-D array-like
        (concrete: this runs on the host, where the simulator plans rounds).
      base_steps: :math:`H \ge 1`, an int: the fastest worker's local steps.

    Returns:
      A numpy int64 array of shape ``(W,)``: the local steps of each worker.

    Raises:
      ValueError: on bad input, or when a worker would get 0 steps (named, with
        the smallest ``base_steps`` that gives it one).
    """
    if isinstance(base_steps, bool) or not isinstance(base_steps, numbers.Integral) or base_steps < 1:
        raise ValueError(f"base_steps must be an int >= 1, got {base_steps!r}")
    if isinstance(speeds, jax.core.Tracer):
        raise ValueError("dynamic_local_steps needs concrete speeds (it runs on the host), got a traced array")
    v = np.asarray(speeds, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"speeds must be a non-empty 1-D array (one per worker), got shape {v.shape}")
    bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
    if bad.size:
        raise ValueError(f"speeds must be finite and > 0, got {float(v[bad[0]])!r} for worker {int(bad[0])}")
    h = int(base_steps)
    exact = v / v.max() * h
    steps = np.floor(exact * (1 + 8 * np.finfo(np.float64).eps)).astype(np.int64)
    zero = np.flatnonzero(steps == 0)
    if zero.size:
        w = int(zero[0])
        need = math.ceil(v.max() / v[w])
        raise ValueError(
            f"worker {w} (speed {float(v[w])!r}, {v.max() / v[w]:.3g}x slower than the fastest) would get "
            f"floor({exact[w]:.3g}) = 0 local steps with base_steps={h}; raise base_steps to at least {need}"
        )
    return steps
