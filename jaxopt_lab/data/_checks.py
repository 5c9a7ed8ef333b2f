"""Argument checks shared by the data loaders.

Every check raises a ``ValueError`` (or ``TypeError`` for a wrong type) whose
message names the argument and the bad value, before any work is done.
"""

import math
import numbers


def check_int(name: str, value, minimum: int | None = None) -> int:
    """Checks that ``value`` is an integer (not a bool) and at least ``minimum``.

    Args:
      name: the argument's name, used in the error message.
      value: the value to check.
      minimum: the smallest allowed value, or None for no lower bound.

    Returns:
      ``value`` as a Python int.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name: str, value) -> float:
    """Checks that ``value`` is a finite real number (not a bool).

    Args:
      name: the argument's name, used in the error message.
      value: the value to check.

    Returns:
      ``value`` as a Python float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_fraction(name: str, value) -> float:
    """Checks that ``value`` lies in the open interval (0, 1).

    Args:
      name: the argument's name, used in the error message.
      value: the value to check.

    Returns:
      ``value`` as a Python float.
    """
    value = check_real(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value}")
    return value


def check_choice(name: str, value, allowed) -> None:
    """Checks that ``value`` is one of ``allowed``.

    Args:
      name: the argument's name, used in the error message.
      value: the value to check.
      allowed: the allowed values, listed in the error message.

    Returns:
      None.
    """
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
