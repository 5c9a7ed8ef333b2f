"""Argument checks of the federated package: a ``ValueError`` naming the bad value, before any compute."""

from __future__ import annotations

import math
import numbers

import numpy as np

from jaxopt_lab.data._checks import check_int, check_real

__all__ = ["check_int", "check_real", "check_positive", "check_probability", "check_per_client"]


def check_positive(name: str, value) -> float:
    """A finite real number > 0, as a Python float."""
    value = check_real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_probability(name: str, value) -> float:
    """A real number in [0, 1]."""
    value = check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_per_client(name: str, value, num_clients: int, *, integer: bool = False, minimum: float | None = None,
                     maximum: float | None = None, positive: bool = False) -> np.ndarray:
    """A scalar (broadcast to every client) or a 1-D sequence of length ``num_clients``.

    Returns a float64 (or int64 with ``integer``) numpy array of shape ``(num_clients,)``.
    """
    if isinstance(value, (numbers.Number, np.number)) and not isinstance(value, bool):
        arr = np.full((num_clients,), value)
    else:
        try:
            arr = np.asarray(value)
        except Exception as e:  # noqa: BLE001 - a value numpy cannot read is the caller's error
            raise ValueError(f"{name} must be a number or a sequence of {num_clients} numbers, got {value!r}") from e
        if arr.ndim != 1 or arr.shape[0] != num_clients:
            raise ValueError(
                f"{name} must have one entry per client ({num_clients}), got shape {arr.shape}"
                + (f" (length {len(arr)})" if arr.ndim == 1 else "")
            )
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if integer and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold integers, got {_show(arr)}")
    arr = arr.astype(np.int64 if integer else np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {_show(arr)}")
    bad = np.zeros(arr.shape, bool)
    if minimum is not None:
        bad |= arr < minimum
    if maximum is not None:
        bad |= arr > maximum
    if positive:
        bad |= arr <= 0
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        bounds = []
        if positive:
            bounds.append("> 0")
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        raise ValueError(f"{name} must be {' and '.join(bounds)}, got {arr[k].item()!r} for client {k}")
    return arr


def _show(arr: np.ndarray) -> str:
    return np.array2string(arr, threshold=8)


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def finite(value: float) -> bool:
    return math.isfinite(value)
