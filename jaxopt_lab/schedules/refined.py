"""Refined learning-rate schedules: a schedule derived from a previous run's gradient norms.

Defazio, Cutkosky, Mehta & Mishchenko, "When, Why and How Much? Adaptive
Learning Rate Scheduling by Refinement" (2023), https://arxiv.org/abs/2310.07831
(v2: "Optimal Linear Decay Learning Rate Schedules and Further Refinements").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("sgd", "adam")
# Exponent p of the norm in w_t = ĝ_t^{-p} Σ_{s>t} ĝ_s^{-p}, per method.
_POWER = {"sgd": 2.0, "adam": 1.0}
# Default median-filter width as a fraction of the run length: the authors' scripts' sigma2 = 0.1
# (facebookresearch/adaptive_scheduling), made odd as they do: 2 * (int(0.1 * T) // 2) + 1.
DEFAULT_SMOOTHING_FRACTION = 0.1


def _as_norms(grad_norms: Any) -> np.ndarray:
    """``grad_norms`` as a float64 1-D array, checked: >= 2 finite positive values."""
    try:
        g = np.asarray(grad_norms, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"grad_norms must be a sequence of numbers, got {grad_norms!r}") from None
    if g.ndim != 1:
        raise ValueError(f"grad_norms must be 1-D, got shape {g.shape}")
    if g.size < 2:
        raise ValueError(f"grad_norms must hold at least 2 values (the last step's weight is 0), got {g.size}: {g.tolist()!r}")
    bad = ~(np.isfinite(g) & (g > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"grad_norms must be finite and > 0, got grad_norms[{i}] = {float(g[i])!r}")
    return g


def _check_window(smoothing_window: Any, n: int) -> int:
    if smoothing_window is None:
        return 2 * (int(DEFAULT_SMOOTHING_FRACTION * n) // 2) + 1
    if isinstance(smoothing_window, bool) or not isinstance(smoothing_window, (int, np.integer)):
        raise ValueError(f"smoothing_window must be an integer >= 1 or None, got {smoothing_window!r}")  # noqa: TRY004
    if smoothing_window < 1:
        raise ValueError(f"smoothing_window must be >= 1, got {smoothing_window!r}")
    return int(smoothing_window)


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def median_smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running median of width ``window`` as the authors filter the norms (their README's recipe).

    ``scipy.ndimage.median_filter(np.pad(values, (0, 2 * window), mode="reflect"),
    size=window, mode="nearest")[:-2 * window]``: the end is extended by a mirror
    image of the last values (so the last medians see the trend, not copies of the
    last value), the start by its first value. Output ``i`` is the median of
    ``window`` consecutive values of that extension, ``window // 2`` before ``i``
    and ``(window - 1) // 2`` after (scipy's centring); for an even ``window`` it
    is the upper of the two middle values (scipy's rank ``window // 2``), not
    their mean. ``window=1`` is the identity.
    """
    values = np.asarray(values, dtype=np.float64)
    if window == 1:
        return values.copy()
    n = values.size
    extended = np.pad(values, (0, 2 * window), mode="reflect")
    padded = np.pad(extended, (window // 2, (window - 1) // 2), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    return np.sort(windows, axis=-1)[:, window // 2][:n]  # scipy's rank window // 2: the upper median


def refined_schedule_weights(
    grad_norms: Sequence[float] | np.ndarray,
    smoothing_window: int | None = None,
    method: str = "sgd",
) -> np.ndarray:
    r"""Refined schedule shape from a previous run's gradient norms (max 1, last 0).

    Defazio et al. (2023), Algorithms 1 (SGD) and 2 (Adam). With the norms
    :math:`g_1, \dots, g_T` of a previous run of the same length, smoothed by a
    running median of width :math:`\tau` (``smoothing_window``),
    :math:`\hat g = \operatorname{median\_filter}(g, \tau)`:

    .. math::
        w_t = \hat g_t^{-p} \sum_{s=t+1}^{T} \hat g_s^{-p}, \qquad
        \eta_t = \frac{w_t}{\max_{s} w_s},

    with :math:`p = 2` for ``method="sgd"`` (``g_t`` = the Euclidean norm
    :math:`\lVert g_t\rVert_2` of the gradient) and :math:`p = 1` for
    ``method="adam"`` (``g_t`` should then be the :math:`\ell_1` norm of the
    preconditioned gradient, :math:`\lVert g_t / (\sqrt{v_t} + \epsilon)\rVert_1`).
    This weights step :math:`t` by the inverse squared norm at :math:`t` times
    the inverse squared norms still to come, so large late gradients give fast
    annealing and large early ones an automatic warm-up.

    For constant norms, :math:`w_t \propto T - t` and the SGD (and Adam)
    schedule is exactly linear decay to zero: :math:`\eta_t = (T - t)/(T - 1)`.
    The last weight is always 0.

    The median filter is the authors' (facebookresearch/adaptive_scheduling:
    README's ``median_filter`` recipe, ``find_schedule.py``
    ``find_closed_form_schedule``, its plotting script's ``sigma2 = 0.1`` and
    ``sched / max(sched)``): see :func:`median_smooth`. ``smoothing_window=1``
    disables it and ``None`` uses their width ``2 * (int(0.1 * T) // 2) + 1``
    (odd, about a tenth of the run). The computation is in float64.

    Args:
      grad_norms: the previous run's per-step norms, at least 2, finite and > 0.
      smoothing_window: median-filter width :math:`\tau` in steps (>= 1), or None.
      method: ``"sgd"`` (p = 2) or ``"adam"`` (p = 1).

    Returns:
      A float64 array of length :math:`T` with maximum 1 (index ``t`` is the
      multiplier for optimizer step ``t``, 0-based).
    """
    g = _as_norms(grad_norms)
    window = _check_window(smoothing_window, g.size)
    p = _POWER[_check_method(method)]
    inv = median_smooth(g, window) ** -p
    # tail[t] = Σ_{s>t} inv[s]: reversed cumulative sum, shifted by one.
    tail = np.concatenate([np.cumsum(inv[::-1])[::-1][1:], [0.0]])
    w = inv * tail
    return w / w.max()


def _check_peak(peak_value: Any) -> float:
    try:
        v = float(peak_value)
    except (TypeError, ValueError):
        raise ValueError(f"peak_value must be a number > 0, got {peak_value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"peak_value must be finite and > 0, got {peak_value!r}")
    return v


def _check_warmup(warmup_steps: Any) -> int:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    return int(warmup_steps)


def refined_schedule(
    grad_norms: Sequence[float] | np.ndarray,
    peak_value: float,
    warmup_steps: int = 0,
    smoothing_window: int | None = None,
    method: str = "sgd",
) -> optax.Schedule:
    r"""The refined schedule :math:`\text{peak\_value}\cdot\eta_t` as a jit-able optax schedule.

    :math:`\eta_t` is :func:`refined_schedule_weights` (Defazio et al. 2023,
    https://arxiv.org/abs/2310.07831), so the schedule's maximum is
    ``peak_value``. Optionally multiplied by a linear warm-up
    :math:`\min(1, t / \text{warmup\_steps})` (the paper adds one to the refined
    schedule when the previous run's early norms do not already produce it).

    The schedule is a lookup into a float32 array: ``schedule(count)`` returns
    the value for optimizer step ``count`` (0-based, as optax passes it);
    counts past the end return the last value (0), negative counts the first.

    Args:
      grad_norms: the previous run's per-step norms (see :func:`refined_schedule_weights`).
      peak_value: the largest learning rate, > 0.
      warmup_steps: length of the linear warm-up ramp (0: none).
      smoothing_window: median-filter width in steps, or None for the default.
      method: ``"sgd"`` or ``"adam"``.

    Returns:
      An ``optax.Schedule``.
    """
    peak = _check_peak(peak_value)
    warmup = _check_warmup(warmup_steps)
    weights = refined_schedule_weights(grad_norms, smoothing_window=smoothing_window, method=method)
    values = jnp.asarray(peak * weights, dtype=jnp.float32)
    last = values.shape[0] - 1

    def schedule(count):
        count = jnp.asarray(count)
        lr = values[jnp.clip(count, 0, last).astype(jnp.int32)]
        if warmup:
            lr = lr * jnp.clip(count.astype(jnp.float32) / warmup, 0.0, 1.0)
        return lr

    return schedule


def grad_norms_from_run(run_dir: str, key: str = "grad_norm") -> np.ndarray:
    """Per-step ``key`` values of a jaxopt_lab run's ``metrics.jsonl``, in step order.

    Records without ``key`` (e.g. the step-0 evaluation record) are skipped; a
    repeated step keeps its last record. Steps missing between the first and the
    last logged one are filled by linear interpolation, so entry ``i`` belongs
    to the ``i``-th logged step onwards, one per optimizer step.
    """
    from jaxopt_lab.experiment.metrics import read_metrics

    by_step: dict[int, Any] = {}
    for r in read_metrics(run_dir):
        if key in r and "step" in r:
            by_step[int(r["step"])] = r[key]
    if not by_step:
        raise ValueError(f"no records with key {key!r} in the metrics of run_dir {run_dir!r}")
    steps = np.array(sorted(by_step))
    try:
        values = np.array([by_step[s] for s in steps], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{key!r} in run_dir {run_dir!r} holds non-numeric values") from None
    if steps.size > 1 and np.any(np.diff(steps) != 1):
        full = np.arange(steps[0], steps[-1] + 1)
        values = np.interp(full, steps, values)
    return values


def refined_schedule_from_run(
    run_dir: str,
    peak_value: float,
    key: str = "grad_norm",
    warmup_steps: int = 0,
    smoothing_window: int | None = None,
    method: str = "sgd",
) -> optax.Schedule:
    """:func:`refined_schedule` from the ``key`` column of ``RUN_DIR/metrics.jsonl``.

    Defazio et al. (2023), https://arxiv.org/abs/2310.07831: run once (e.g. with
    linear decay), then rerun with the schedule refined from that run's norms.
    The trainer logs ``grad_norm`` (the Euclidean gradient norm) every step, the
    input ``method="sgd"`` expects; for ``method="adam"`` log the ℓ1 norm of the
    preconditioned gradient under some key and pass it as ``key``.
    See :func:`grad_norms_from_run` for how records are read.
    """
    norms = grad_norms_from_run(run_dir, key=key)
    return refined_schedule(norms, peak_value, warmup_steps=warmup_steps, smoothing_window=smoothing_window, method=method)
