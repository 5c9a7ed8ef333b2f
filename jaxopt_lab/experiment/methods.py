"""The method registry: ``method.name`` is any jaxopt_lab transform or optax alias.

Lookup order: the flat ``jaxopt_lab`` namespace (our transforms), then
``jaxopt_lab.lowrank`` (``q_galore``, ``apollo``, ...), then ``optax`` (``adamw``,
``sgd``, ``lion``, ...), then ``optax.contrib``
(``muon``, ``galore``, ...). Any hyperparameter may be given as a schedule
table ``{schedule = "<optax schedule>", ...its args}``; it is built with the
same optax function and checked against its signature.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax
from optax import contrib as optax_contrib

from jaxopt_lab.experiment.config import ConfigError, check_kwargs

def _namespaces() -> list[tuple[str, Any]]:
    import jaxopt_lab
    import jaxopt_lab.lowrank

    return [("jaxopt_lab", jaxopt_lab), ("jaxopt_lab.lowrank", jaxopt_lab.lowrank), ("optax", optax),
            ("optax.contrib", optax_contrib)]


def _is_transform_factory(obj: Any) -> bool:
    return callable(obj) and inspect.isfunction(obj) and not inspect.isclass(obj)


def available_methods() -> dict[str, str]:
    """Every name ``method.name`` accepts, mapped to the namespace it comes from."""
    out: dict[str, str] = {}
    for label, module in _namespaces():
        for name in dir(module):
            if name.startswith("_") or name in out:
                continue
            if _is_transform_factory(getattr(module, name)):
                out[name] = label
    return out


def resolve_method(name: str, key: str = "method") -> Callable[..., optax.GradientTransformation]:
    """The factory that ``method.name = name`` refers to (see module docstring); ``key`` names the table."""
    for _, module in _namespaces():
        obj = getattr(module, name, None)
        if obj is not None and _is_transform_factory(obj) and not name.startswith("_"):
            if getattr(obj, "__module__", "").startswith("jaxopt_lab.distributed.federated"):
                raise ConfigError(f"{key}.name {name!r} is a federated server rule: it runs in the federated "
                                  "simulator, from a config with a [federated] section (see experiments/fed_digits.toml)")
            return obj
    close = difflib.get_close_matches(name, list(available_methods()), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown {key}.name {name!r}: not a jaxopt_lab transform nor an optax alias{hint}"
    )


# optax's schedule factories: every public function of optax.schedules but the hyperparameter
# injectors (exponential_decay, join_schedules, ... are schedules without the _schedule suffix)
SCHEDULES = tuple(
    n for n in dir(optax.schedules)
    if not n.startswith("_") and not n.startswith("inject") and inspect.isfunction(getattr(optax.schedules, n))
)


def build_schedule(key: str, spec: Mapping[str, Any]) -> optax.Schedule:
    """Build ``{schedule = "warmup_cosine_decay_schedule", ...}`` into an optax schedule.

    ``join_schedules`` takes its ``schedules`` as a list of such tables;
    ``piecewise_constant_schedule``'s ``boundaries_and_scales`` is a table whose keys
    (TOML keys are strings) are the integer boundary steps.
    """
    kwargs = dict(spec)
    name = kwargs.pop("schedule")
    if not isinstance(name, str) or name not in SCHEDULES:
        close = difflib.get_close_matches(name, SCHEDULES, n=1) if isinstance(name, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}.schedule {name!r} is not an optax schedule{hint}; valid: {', '.join(SCHEDULES)}")
    fn = getattr(optax.schedules, name)
    check_kwargs(key, fn, kwargs)
    if name == "join_schedules" and "schedules" in kwargs:
        parts = kwargs["schedules"]
        if not isinstance(parts, list) or not all(isinstance(p, Mapping) and "schedule" in p for p in parts):
            raise ConfigError(f"{key}.schedules must be a list of schedule tables {{schedule = ..., ...}}, got {parts!r}")
        kwargs["schedules"] = [build_schedule(f"{key}.schedules[{i}]", p) for i, p in enumerate(parts)]
    if "boundaries_and_scales" in kwargs and isinstance(kwargs["boundaries_and_scales"], Mapping):
        table = {}
        for step, value in kwargs["boundaries_and_scales"].items():
            try:
                table[int(step)] = value
            except ValueError:
                raise ConfigError(f"{key}.boundaries_and_scales: the key {step!r} is not a step number") from None
        kwargs["boundaries_and_scales"] = table
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


# Ranges of hyperparameters, by argument name, wherever they appear (optax's aliases and ours
# share the names): exponential-average betas in [0, 1), decays and epsilons >= 0.
_UNIT_INTERVAL = ("b1", "b2", "b3", "adam_b1", "adam_b2", "decay", "momentum")
_NON_NEGATIVE = ("weight_decay", "adam_weight_decay", "eps", "eps_root", "adam_eps_root", "epsilon",
                 "initial_accumulator_value")


def check_ranges(key: str, kwargs: Mapping[str, Any]) -> None:
    """ConfigError for a known hyperparameter outside its range (numbers only: schedules pass)."""
    for arg, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if arg in _UNIT_INTERVAL and not 0 <= value < 1:
            raise ConfigError(f"{key}.{arg} must be in [0, 1), got {value!r}")
        if arg in _NON_NEGATIVE and not value >= 0:
            raise ConfigError(f"{key}.{arg} must be >= 0, got {value!r}")


def _is_method_table(value: Any) -> bool:
    return isinstance(value, Mapping) and "name" in value and "schedule" not in value


def build_method(method: Mapping[str, Any], axis_name: Any = None, key: str = "method",
                 wrap_inner: Any = None) -> optax.GradientTransformation:
    """Build the transformation a ``[method]`` table describes.

    A hyperparameter that is itself a table with a ``name`` (``inner = {name =
    "adamw", ...}``) is built as a transformation the same way; one with a
    ``schedule`` becomes an optax schedule. ``axis_name`` is passed to every
    transformation that takes one (the multi-worker methods). ``wrap_inner`` (a function of a
    transformation) is applied to the built ``inner`` table (how a fine-tuning run freezes the
    base under a method that needs to see it, such as ``lora_ggpo``).
    """
    kwargs = dict(method)
    name = kwargs.pop("name")
    fn = resolve_method(name, key)
    check_kwargs(key, fn, kwargs)
    check_ranges(key, kwargs)
    for arg, value in list(kwargs.items()):
        if _is_method_table(value):
            kwargs[arg] = build_method(value, axis_name, f"{key}.{arg}")
            if wrap_inner is not None and arg == "inner":
                kwargs[arg] = wrap_inner(kwargs[arg])
        elif isinstance(value, Mapping) and "schedule" in value:
            kwargs[arg] = build_schedule(f"{key}.{arg}", value)
        elif arg == "learning_rate" and isinstance(value, (int, float)) and not value > 0:
            raise ConfigError(f"{key}.learning_rate must be > 0, got {value!r}")
    if takes_axis_name(fn) and axis_name is not None:
        kwargs["axis_name"] = axis_name
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as e:  # a required argument missing, a bad value
        raise ConfigError(f"{key} {name!r}: {e}") from None


def needs_loss_fn(method: Mapping[str, Any]) -> bool:
    """Whether the method a table describes (or a method table nested in it, ``inner = {...}``)
    takes a ``loss_fn`` keyword in ``update``: a factory marked ``needs_loss_fn = True`` (IST,
    whose importance probes measure the loss with some layers suppressed). The trainer then passes
    ``loss_fn = lambda params: training loss on the step's micro-batch``."""
    if getattr(resolve_method(method["name"]), "needs_loss_fn", False):
        return True
    return any(needs_loss_fn(v) for v in method.values() if _is_method_table(v))


def takes_axis_name(fn: Callable) -> bool:
    """Whether ``fn`` builds a multi-worker transformation (it takes ``axis_name``)."""
    return "axis_name" in inspect.signature(fn).parameters


def learning_rate_schedule(method: Mapping[str, Any]) -> Callable[[int], float] | None:
    """The learning rate as a function of step, for logging (None if the method has none)."""
    value = method.get("learning_rate")
    if isinstance(value, Mapping) and "schedule" in value:
        return build_schedule("method.learning_rate", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return lambda step: value
    return None
