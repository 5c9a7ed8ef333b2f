"""Changing the batch size: learning-rate scaling rules and regime adaptation.

* Square-root scaling, ``lr(B) = lr(B0) * sqrt(B / B0)``: Hoffer, Hubara &
  Soudry, "Train longer, generalize better" (NeurIPS 2017),
  https://arxiv.org/abs/1705.08741, Sec. 4 (keeps the covariance of the
  gradient noise, hence the diffusion rate of SGD, as the batch grows), and the
  maximal stable learning rate of Adam-type optimizers in Granziol et al.,
  "Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach
  to Neural Network Training" (JMLR 2022), https://arxiv.org/abs/2006.09092.
* Linear scaling, ``lr(B) = lr(B0) * B / B0``: Granziol et al.'s maximal
  stable learning rate of SGD (from the extremal eigenvalue of the batch
  Hessian, which grows as ``1/B`` above the full-batch one), as in Goyal et al.
  (2017).
* Regime adaptation (Hoffer et al., Sec. 5): train a batch ``B`` model for the
  same number of *updates* as the ``B0`` model, i.e. ``B / B0`` times the
  epochs, with the learning-rate drops at the same update counts.

:func:`rescale_config` applies the rule that fits the optimizer (linear for
SGD, square root for adaptive methods) to an experiment config.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

# Optimizers whose maximal stable learning rate scales linearly with the batch (Granziol et al.)
LINEAR_SCALING_METHODS = frozenset({"sgd", "noisy_sgd", "sgdp", "polyak_sgd"})
# Adaptive (per-coordinate preconditioned) optimizers: square-root scaling (Granziol et al.)
SQRT_SCALING_METHODS = frozenset({
    "adam", "adamw", "nadam", "nadamw", "adamax", "adamaxw", "amsgrad", "radam", "adabelief", "adan", "yogi",
    "rmsprop", "adagrad", "adafactor", "lamb", "novograd", "adamp", "perp_adamw", "diffgrad", "galore", "fira",
    "q_galore", "apollo", "apollo_mini", "stable_spam", "gradnorm_lorp",
})
RULES = ("auto", "linear", "sqrt", "none")


def _check_batch(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def batch_scale(base_batch: int, new_batch: int, rule: str) -> float:
    """The learning-rate factor of ``rule`` (``"linear"``: B/B0, ``"sqrt"``: sqrt(B/B0), ``"none"``: 1)."""
    ratio = _check_batch("new_batch", new_batch) / _check_batch("base_batch", base_batch)
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "none":
        return 1.0
    raise ValueError(f"rule must be one of 'linear', 'sqrt', 'none', got {rule!r}")


def _scaled(learning_rate, factor: float):
    if callable(learning_rate):
        return lambda step: learning_rate(step) * factor
    if not isinstance(learning_rate, numbers.Real) or isinstance(learning_rate, bool) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a positive number or a schedule, got {learning_rate!r}")
    return float(learning_rate) * factor


def linear_scaled_learning_rate(learning_rate, base_batch: int, new_batch: int):
    """``learning_rate * new_batch / base_batch`` (a number, or a schedule wrapped to scale its values)."""
    return _scaled(learning_rate, batch_scale(base_batch, new_batch, "linear"))


def sqrt_scaled_learning_rate(learning_rate, base_batch: int, new_batch: int):
    """``learning_rate * sqrt(new_batch / base_batch)`` (a number, or a schedule wrapped to scale its values)."""
    return _scaled(learning_rate, batch_scale(base_batch, new_batch, "sqrt"))


def regime_adaptation(epochs, base_batch: int, new_batch: int):
    """Epoch counts (a number or a sequence: a budget, learning-rate drop epochs) for batch ``new_batch``
    so that it makes as many updates as ``base_batch`` did: each multiplied by ``new_batch / base_batch``."""
    ratio = _check_batch("new_batch", new_batch) / _check_batch("base_batch", base_batch)
    if isinstance(epochs, Sequence):
        return type(epochs)(e * ratio for e in epochs)
    if not isinstance(epochs, numbers.Real) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative number or a sequence of them, got {epochs!r}")
    return epochs * ratio


def steps_for_batch(base_steps: int, base_batch: int, new_batch: int, *, adapt_regime: bool = True) -> int:
    """Optimizer steps of a run at ``new_batch`` from one of ``base_steps`` at ``base_batch``.

    ``adapt_regime=True`` (Hoffer et al.'s regime adaptation): the same number of updates, ``base_steps``.
    ``False``: the same number of epochs (examples seen), ``ceil(base_steps * base_batch / new_batch)``.
    """
    base_steps = _check_batch("base_steps", base_steps)
    ratio = _check_batch("base_batch", base_batch) / _check_batch("new_batch", new_batch)
    return base_steps if adapt_regime else max(1, math.ceil(base_steps * ratio - 1e-9))


def scaling_rule(method_name: str) -> str:
    """``"linear"`` for SGD-type methods, ``"sqrt"`` for adaptive ones; ValueError for a method in neither list."""
    if method_name in LINEAR_SCALING_METHODS:
        return "linear"
    if method_name in SQRT_SCALING_METHODS:
        return "sqrt"
    raise ValueError(
        f"no batch-size scaling rule is known for method {method_name!r}: pass rule='linear' (SGD-like) or "
        f"rule='sqrt' (adaptive) to rescale_config"
    )


_STEP_KEYS = ("warmup_steps", "decay_steps", "transition_steps", "transition_begin")


def _scale_schedule(spec: Mapping[str, Any], lr_factor: float, step_factor: float | None) -> dict[str, Any]:
    out = dict(spec)
    for key, value in spec.items():
        if key.endswith("value") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value) * lr_factor
        elif step_factor is not None and key in _STEP_KEYS and isinstance(value, int):
            out[key] = max(1 if value else 0, round(value * step_factor))
        elif step_factor is not None and key == "boundaries_and_scales":
            out[key] = {str(max(1, round(int(b) * step_factor))): s for b, s in value.items()}
        elif step_factor is not None and key == "boundaries":
            out[key] = [max(1, round(int(b) * step_factor)) for b in value]
        elif key == "schedules":
            out[key] = [_scale_schedule(s, lr_factor, step_factor) for s in value]
    return out


def rescale_config(config, new_batch: int, *, rule: str = "auto", keep: str = "updates"):
    """A copy of an experiment config for batch size ``new_batch``, its learning rate rescaled.

    Args:
      config: an ``ExperimentConfig`` or its dict (``to_dict()``); the same kind is returned. Its batch
        is ``train.batch_size * train.grad_accum`` (per worker); ``new_batch`` must be a multiple of
        ``train.grad_accum``.
      new_batch: the new batch size per optimizer step.
      rule: ``"auto"`` (linear for SGD-type methods, square root for adaptive ones: Granziol et al.),
        ``"linear"``, ``"sqrt"`` (also Hoffer et al.'s rule for SGD), or ``"none"``.
      keep: ``"updates"`` (regime adaptation: ``train.steps`` and the schedule's step counts unchanged,
        so ``new/base`` times the epochs) or ``"epochs"`` (``train.steps`` and the schedule's step
        counts multiplied by ``base/new``).

    ``method.learning_rate`` may be a number or a schedule table: every ``*value`` key of the table
    (``init_value``, ``peak_value``, ``end_value``, ``value``; nested ``join_schedules`` too) is scaled.
    """
    from jaxopt_lab.experiment import config as config_lib

    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if keep not in ("updates", "epochs"):
        raise ValueError(f"keep must be 'updates' or 'epochs', got {keep!r}")
    new_batch = _check_batch("new_batch", new_batch)
    is_config = isinstance(config, config_lib.ExperimentConfig)
    raw = config.to_dict() if is_config else copy.deepcopy(dict(config))
    train = dict(raw.get("train", {}))
    accum = int(train.get("grad_accum", config_lib.TrainConfig.grad_accum))
    base_batch = int(train.get("batch_size", config_lib.TrainConfig.batch_size)) * accum
    if new_batch % accum:
        raise ValueError(f"new_batch={new_batch} is not a multiple of train.grad_accum={accum}")
    method = dict(raw.get("method", {}))
    if "learning_rate" not in method:
        raise ValueError("the config's method has no learning_rate to rescale")
    if rule == "auto":
        rule = scaling_rule(method.get("name", ""))
    lr_factor = batch_scale(base_batch, new_batch, rule)
    step_factor = base_batch / new_batch if keep == "epochs" else None
    lr = method["learning_rate"]
    if isinstance(lr, Mapping):
        method["learning_rate"] = _scale_schedule(lr, lr_factor, step_factor)
    else:
        method["learning_rate"] = _scaled(lr, lr_factor)
    train["batch_size"] = new_batch // accum
    if keep == "epochs":
        train["steps"] = steps_for_batch(int(train.get("steps", config_lib.TrainConfig.steps)), base_batch, new_batch,
                                         adapt_regime=False)
    raw["method"], raw["train"] = method, train
    return config_lib.from_dict(raw) if is_config else raw


def predicted_max_learning_rate(batch_sizes: Sequence[int], base_batch: int, base_lr: float, rule: str
                                ) -> list[float]:
    """``base_lr`` measured at ``base_batch``, carried to each batch size by ``rule`` (the predicted curve)."""
    return [base_lr * batch_scale(base_batch, b, rule) for b in batch_sizes]
