"""Argument checks shared by the single-worker transformations.

The checks run when a transformation is built. Under ``optax.inject_hyperparams``
the factory is called again inside ``update`` with the hyperparameters as
arrays, traced when ``update`` is jitted: a traced value cannot be checked and
is let through (``init``, usually run outside jit, checks the same values).
Schedules (callables) are let through as well.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_float(value: Any) -> float | None:
    """``value`` as a Python float, or None if it is traced or a schedule.

    A complex value with a zero imaginary part counts as its real part:
    ``optax.inject_hyperparams`` casts the hyperparameters to the params'
    widest dtype, complex64 for complex params.
    """
    if value is None or callable(value) or is_traced(value):
        return None
    if np.iscomplexobj(value) and np.ndim(value) == 0 and np.imag(value) == 0:
        value = np.real(value)
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:
        return None


def require(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """Raise ``ValueError("<name> must be <requirement>, got <value>")`` if ``not ok(value)``."""
    v = _concrete_float(value)
    if v is not None and not ok(v):  # NaN fails every comparison, so it is refused too
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def number(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """As :func:`require`, but a value that is not a real number (None, a bool, a string, a schedule) is refused too."""
    if is_traced(value):
        return
    real = isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))
    if not real or isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    require(name, value, ok, requirement)


def non_negative(name: str, value: Any) -> None:
    require(name, value, lambda v: v >= 0, ">= 0")


def positive(name: str, value: Any) -> None:
    require(name, value, lambda v: v > 0, "> 0")


def in_unit_interval(name: str, value: Any) -> None:
    """``0 <= value < 1`` (decay rates, momentum)."""
    require(name, value, lambda v: 0 <= v < 1, "in [0, 1)")


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (a hyperparameter injected by ``optax.inject_hyperparams`` under jit)."""
    return isinstance(value, jax.core.Tracer)


def not_static(name: str) -> ValueError:
    """The error for an argument that must be a Python value but came as a JAX array."""
    return ValueError(f"{name} must be static; under optax.inject_hyperparams pass static_args=({name!r},)")


def static_int(name: str, value: Any, minimum: int | None = None, what: str = "an int") -> int:
    """An int known when tracing (a shape, a period, a seed); a JAX array gets the ``static_args`` hint.

    ``optax.inject_hyperparams`` turns every int argument into an array (a
    tracer once ``update`` is jitted): list such arguments in its
    ``static_args``. A JAX array is refused even when concrete, so that the
    error comes from ``init`` rather than from the first jitted ``update``.
    """
    if isinstance(value, jax.Array):
        raise not_static(name)
    if isinstance(value, (bool, jnp.bool_)) or getattr(value, "dtype", None) == jnp.bool_:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be {what} >= {minimum}, got {value!r}")
    return out


def static_axis(name: str, value: Any) -> int:
    """An axis index known when tracing: a Python int or a concrete integer scalar.

    ``optax.inject_hyperparams`` turns every int argument into an array; jitted,
    that array is a tracer, which cannot index an axis.
    """
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be static; under optax.inject_hyperparams pass static_args=({name!r},)"
        )
    if isinstance(value, (bool, jnp.bool_)) or getattr(value, "dtype", None) == jnp.bool_:
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
