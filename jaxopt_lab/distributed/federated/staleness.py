r"""Staleness functions: how much an update computed on an old server model counts.

The staleness of an update is :math:`\tau = v_\text{apply} - v_\text{dispatch}`,
the number of server steps applied between the client's dispatch and the
server step that consumes its result. A staleness function maps it to a weight
:math:`s(\tau) \in (0, 1]` with :math:`s(0) = 1`.

From Xie, Koyejo & Gupta, "Asynchronous Federated Optimization" (FedAsync,
OPT 2020), https://arxiv.org/abs/1903.03934, Section 5.2:

- constant: :math:`s(\tau) = 1`;
- polynomial: :math:`s_a(\tau) = (\tau + 1)^{-a}`;
- hinge: :math:`s_{a,b}(\tau) = 1` if :math:`\tau \le b`, else
  :math:`1 / (a(\tau - b) + 1)`.

FedBuff (Nguyen et al., AISTATS 2022, https://arxiv.org/abs/2106.06639) weights
by :math:`1/\sqrt{1 + \tau}`, i.e. ``polynomial(0.5)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxopt_lab.distributed.federated._checks import check_real

StalenessFn = Callable[[jax.Array], jax.Array]

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")


def _nonnegative(name: str, value) -> float:
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def constant_staleness() -> StalenessFn:
    r""":math:`s(\tau) = 1`: every update counts fully, however stale."""

    def fn(tau):
        return jnp.ones(jnp.shape(tau), jnp.float32)

    return fn


def polynomial_staleness(a: float = 0.5) -> StalenessFn:
    r""":math:`s_a(\tau) = (\tau + 1)^{-a}`, ``a >= 0`` (FedBuff uses ``a = 0.5``)."""
    a = _nonnegative("staleness exponent a", a)

    def fn(tau):
        return jnp.power(jnp.asarray(tau, jnp.float32) + 1.0, -a)

    return fn


def hinge_staleness(a: float = 10.0, b: float = 4.0) -> StalenessFn:
    r""":math:`s_{a,b}(\tau) = 1` for :math:`\tau \le b`, else :math:`1/(a(\tau-b)+1)`; ``a, b >= 0``."""
    a = _nonnegative("hinge slope a", a)
    b = _nonnegative("hinge threshold b", b)

    def fn(tau):
        tau = jnp.asarray(tau, jnp.float32)
        return jnp.where(tau <= b, 1.0, 1.0 / (a * (tau - b) + 1.0))

    return fn


def staleness_function(spec: str | StalenessFn | None, **kwargs) -> StalenessFn:
    """A staleness function from a name (``"constant"``, ``"polynomial"``, ``"hinge"``) and its
    keyword arguments, or a callable passed through; ``None`` means constant."""
    if spec is None:
        spec = "constant"
    if callable(spec):
        if kwargs:
            raise ValueError(f"staleness arguments {sorted(kwargs)} only apply to a named staleness function")
        return spec
    makers = {"constant": constant_staleness, "polynomial": polynomial_staleness, "hinge": hinge_staleness}
    if spec not in makers:
        raise ValueError(f"staleness must be one of {', '.join(map(repr, STALENESS_FUNCTIONS))} or a callable, got {spec!r}")
    try:
        return makers[spec](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for staleness {spec!r}: {e}") from None
