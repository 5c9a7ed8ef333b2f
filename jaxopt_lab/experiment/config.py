"""Experiment configuration: a TOML file, validated before any compute.

A config has seven sections::

    [run]         name, seed, out_dir
    [data]        name = a loader of ``jaxopt_lab.data.DATASETS`` + its keyword args
    [model]       name = a model of ``jaxopt_lab.models.MODELS`` + its keyword args
                  (``preset`` where the model has presets)
    [method]      name = any jaxopt_lab transform or optax alias + its keyword args;
                  a hyperparameter may be a schedule table
                  ``{schedule = "cosine_decay_schedule", init_value = 1e-3, decay_steps = 500}``
    [train]       steps, batch_size, grad_accum, eval_every, eval_batches, loss, sharpness_every,
                  instability_every, norm_test_eta, max_batch_size
    [workers]     count, mode ("vmap" | "shard_map"), devices_per_worker (d > 1: each worker
                  spans d devices and shards its state over them; shard_map only); batch_size
                  is per worker
    [checkpoint]  every, keep
    [logging]     tensorboard, progress

The fixed sections (run, train, workers, checkpoint, logging) are typed dataclasses; the
free sections (data, model, method) are checked against the signature of the
callable they name. Any unknown section or key is a :class:`ConfigError` naming
it (with the closest valid spelling).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


class UnknownKeyError(ConfigError):
    """A key the callable a table names does not take; ``key`` is its dotted name (``method.momentum``),
    ``keys`` every such key of the table (the message names the first)."""

    def __init__(self, message: str, key: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.key = key
        self.keys = keys or (key,)


def with_prefix(error: ConfigError, prefix: str) -> ConfigError:
    """``error`` (same class and attributes) with ``prefix`` before its message (``variant 'a': ``)."""
    out = type(error).__new__(type(error))
    out.__dict__.update(error.__dict__)
    out.args = (prefix + str(error),)
    return out


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
    eval_every: int = 50  # 0: evaluate only after the last step
    eval_batches: int = 0  # held-out batches per evaluation, at most (a smaller split gives fewer); 0: the whole split
    loss: str = "cross_entropy"  # or "stable_max" (classification and lm tasks)
    sharpness_every: int = 0  # log the Hessian's top eigenvalue against 2/lr every k steps; 0: off
    instability_every: int = 0  # a GPT: log its max attention logit and output log Z every k steps; 0: off
    norm_test_eta: float = 0.0  # > 0: grow the batch by the norm test (AdAdaGrad); 0: fixed batch
    max_batch_size: int = 1024  # the adaptive batch's ceiling


@dataclasses.dataclass(frozen=True)
class WorkersConfig:
    count: int = 1  # W; > 1 needs a multi-worker method (data_parallel, diloco, gossip, ...)
    mode: str = "vmap"  # "vmap" (one device) or "shard_map" (over the devices)
    # d: devices one worker spans (shard_map): a (workers x model) mesh, each worker's parameters,
    # gradients and optimizer state sharded over its d devices (FSDP, or the model's nnx annotations)
    devices_per_worker: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # optimizer steps between checkpoints; 0: only the last step
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True


FIXED_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "train": TrainConfig,
    "workers": WorkersConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
FREE_SECTIONS = ("data", "model", "method")
SECTIONS = ("run", "data", "model", "method", "train", "workers", "checkpoint", "logging")

# Keys whose change does not change the numbers a run produces: a resume may differ in these.
RESUME_MAY_DIFFER = ("run.name", "run.out_dir", "checkpoint", "logging")


# Keys ``resume --set`` may change to extend (or shorten what is left of) a run: how many steps,
# and when and on how much it evaluates. None of them changes the numbers of the steps already
# taken, the batch of a step (drawn from (run.seed, step)) nor a learning-rate schedule (its
# decay_steps is a method key of its own). Recorded in the run's config history like a recovery key.
RESUME_EXTEND_KEYS = ("train.steps", "train.eval_every", "train.eval_batches")


def may_change_on_resume(key: str) -> bool:
    """A key ``resume --set``/``--unset`` may change (recorded in the run's config history): a recovery
    key (:func:`is_recovery_key`) or one of :data:`RESUME_EXTEND_KEYS`. (``logging.*``,
    ``checkpoint.*``, ``run.name`` and ``run.out_dir`` may differ too, unrecorded.)"""
    return key in RESUME_EXTEND_KEYS or is_recovery_key(key)


def is_recovery_key(key: str) -> bool:
    """A key ``resume --set`` may change to recover a run (recorded in its config history): a
    hyperparameter of the method (``method.learning_rate``, ``method.inner.b2``, a schedule's
    values), never which transformation or schedule it is (``name``, ``schedule``), a seed, nor
    data, model or batch. A change that does not fit the checkpoint's optimizer state (a rank, a
    momentum where there was none) is refused when the checkpoint is restored."""
    parts = key.split(".")
    return parts[0] == "method" and len(parts) > 1 and not {"name", "schedule", "seed"} & set(parts[1:])

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
_POSITIVE = {
    "train.steps", "train.batch_size", "train.grad_accum", "checkpoint.keep", "workers.count", "train.max_batch_size",
    "workers.devices_per_worker",
}
_NON_NEGATIVE = {"train.eval_every", "train.eval_batches", "train.sharpness_every", "train.instability_every",
                 "checkpoint.every", "run.seed"}
LOSSES = ("cross_entropy", "stable_max")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment config (see the module docstring for the schema)."""

    run: RunConfig
    data: dict[str, Any]
    model: dict[str, Any]
    method: dict[str, Any]
    train: TrainConfig
    workers: WorkersConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in SECTIONS:
            value = getattr(self, section)
            out[section] = (
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
            )
        return out

    def dumps(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _suggest(name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid: {', '.join(valid)}"


def _check_type(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{key} must be {expected.__name__}, got {value!r}")
    if key in _POSITIVE and value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    return value


def check_run_name(name: str, key: str = "run.name") -> str:
    """A run name is a relative path inside ``run.out_dir``: not empty, not absolute, no ``.``/``..`` part.

    ``""`` (or ``"."``) would write into ``out_dir`` itself, beside other runs; ``"../x"`` or
    ``"/x"`` would write outside it. Raises ConfigError naming ``key`` and the value.
    """
    if not name.strip():
        raise ConfigError(f"{key} must not be empty (the run would write into run.out_dir itself), got {name!r}")
    parts = name.split("/")
    if name.startswith("/"):
        raise ConfigError(f"{key} must be a relative name inside run.out_dir, got the absolute path {name!r}")
    if any(p in (".", "..") or not p.strip() for p in parts):
        raise ConfigError(f"{key} must name a folder inside run.out_dir (no empty, '.' or '..' parts), got {name!r}")
    return name


def _fixed_section(section: str, raw: Mapping[str, Any]) -> Any:
    cls = FIXED_SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {section}.{key}{_suggest(key, fields)}")
        values[key] = _check_type(f"{section}.{key}", value, _TYPES[fields[key].type])
    return cls(**values)


# Arguments the runner supplies, never the config: the worker axis comes from [workers].
RUNNER_OWNED = ("self", "rngs", "axis_name")


def signature_params(fn: Callable) -> dict[str, inspect.Parameter]:
    """Keyword parameters a config may set for ``fn`` (no *args, **kwargs or rngs)."""
    params = inspect.signature(fn).parameters
    return {
        n: p
        for n, p in params.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in RUNNER_OWNED
    }


def _expects_number(param: inspect.Parameter) -> bool:
    """Whether ``param`` takes a number: a numeric default, or no default and a float-ish annotation."""
    default = param.default
    if default is not param.empty and default is not None:
        return isinstance(default, (int, float)) and not isinstance(default, bool)
    annotation = param.annotation if isinstance(param.annotation, str) else repr(param.annotation)
    return ("float" in annotation or "Scalar" in annotation) and "str" not in annotation


def check_kwargs(section: str, fn: Callable, kwargs: Mapping[str, Any], extra: Iterable[str] = ()) -> None:
    """Raise ConfigError for a key of ``kwargs`` that ``fn`` does not take, a string or bool where it
    takes a number, or a non-finite number."""
    params = signature_params(fn)
    valid = set(params) | set(extra)
    unknown = tuple(f"{section}.{k}" for k in kwargs if k not in valid)
    for key, value in kwargs.items():
        if key not in valid:
            raise UnknownKeyError(
                f"unknown config key {section}.{key} for "
                f"{getattr(fn, '__qualname__', getattr(fn, '__name__', fn)).removesuffix('.__init__')}"
                f"{_suggest(key, valid)}",
                key=f"{section}.{key}",
                keys=unknown,
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{key} must be finite, got {value!r}")
        if key in params and isinstance(value, (str, bool)) and _expects_number(params[key]):
            raise ConfigError(f"{section}.{key} must be a number, got {value!r}")


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested dict (as read from TOML) into an ExperimentConfig.

    Checks sections, keys and types. The free sections are checked against
    their callables by :func:`jaxopt_lab.experiment.build.resolve` (which the
    trainer calls before any compute).
    """
    for section in raw:
        if section == "variants":
            raise ConfigError("a config with [variants.NAME] tables is run with `jaxopt-lab run` (load_variants)")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section [{section}]{_suggest(section, SECTIONS + ('variants', 'federated'))}")
    values: dict[str, Any] = {}
    for section in FIXED_SECTIONS:
        body = raw.get(section, {})
        if not isinstance(body, Mapping):
            raise ConfigError(f"[{section}] must be a table, got {body!r}")
        values[section] = _fixed_section(section, body)
    for section in FREE_SECTIONS:
        body = raw.get(section)
        if not isinstance(body, Mapping):
            raise ConfigError(f"config needs a [{section}] table with a name")
        if not isinstance(body.get("name"), str):
            raise ConfigError(f"{section}.name must be a string, got {body.get('name')!r}")
        values[section] = copy.deepcopy(dict(body))
    cfg = ExperimentConfig(**values)
    check_run_name(cfg.run.name)
    if not cfg.run.out_dir.strip():
        raise ConfigError(f"run.out_dir must not be empty, got {cfg.run.out_dir!r}")
    if cfg.workers.mode not in ("vmap", "shard_map"):
        raise ConfigError(f"workers.mode must be 'vmap' or 'shard_map', got {cfg.workers.mode!r}")
    if cfg.workers.devices_per_worker > 1 and cfg.workers.mode != "shard_map":
        raise ConfigError(f"workers.devices_per_worker = {cfg.workers.devices_per_worker} needs workers.mode = "
                          f"'shard_map' (vmap runs every worker on one device)")
    if cfg.train.loss not in LOSSES:
        raise ConfigError(f"train.loss must be one of {LOSSES}, got {cfg.train.loss!r}")
    if cfg.train.sharpness_every and cfg.workers.count > 1:
        raise ConfigError("train.sharpness_every is for single-worker runs (workers.count = 1)")
    if cfg.train.instability_every and cfg.workers.count > 1:
        raise ConfigError("train.instability_every is for single-worker runs (workers.count = 1)")
    if cfg.train.norm_test_eta < 0:
        raise ConfigError(f"train.norm_test_eta must be >= 0, got {cfg.train.norm_test_eta!r}")
    if cfg.train.norm_test_eta > 0 and (cfg.workers.count > 1 or cfg.train.grad_accum > 1):
        raise ConfigError("train.norm_test_eta (adaptive batch size) is for one worker without grad_accum")
    if cfg.train.norm_test_eta > 0 and cfg.train.max_batch_size < cfg.train.batch_size:
        raise ConfigError(
            f"train.max_batch_size ({cfg.train.max_batch_size}) is below train.batch_size ({cfg.train.batch_size})"
        )
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
            f"train.grad_accum ({cfg.train.grad_accum})"
        )
    return cfg


def parse_value(text: str) -> Any:
    """Parse a command-line value as TOML (``3e-4``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


UNSET = "-"  # an override ``-section.key`` removes the key (``--unset section.key``)


def unset(key: str) -> str:
    """The override that removes ``key`` from a config (what ``--unset KEY`` passes on)."""
    return UNSET + key


def _override_path(item: str) -> str:
    return item.removeprefix(UNSET) if item.startswith(UNSET) else item.split("=", 1)[0].strip()


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``section.key.sub=value``) overrides to a raw config, in order;
    an item ``-section.key`` (:func:`unset`, the CLI's ``--unset``) removes that key, and is an
    error if the config does not have it."""
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        if item.startswith(UNSET):
            path = item[len(UNSET):].strip()
            keys = path.split(".")
            if len(keys) < 2 or not all(keys):
                raise ConfigError(f"--unset {path!r}: the key must look like section.key")
            node = out
            for key in keys[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict) or keys[-1] not in node:
                raise ConfigError(f"--unset {path}: the config has no key {path}")
            del node[keys[-1]]
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override key {path!r} must look like section.key")
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {path!r}: {key} is not a table")
        node[keys[-1]] = parse_value(text.strip())
    return out


def unset_hint(error: ConfigError, edits: Iterable[str]) -> str:
    """For an unknown key left over after ``--set TABLE.name=...`` switched what its table builds:
    the ``--unset`` that drops it; "" otherwise. ``edits``: the ``--set``/``--grid`` items."""
    if not isinstance(error, UnknownKeyError) or "." not in error.key:
        return ""
    table, arg = error.key.rsplit(".", 1)

    def switches(edit: str) -> bool:
        path = _override_path(edit)
        if path.startswith("variants.") and path.count(".") >= 2:  # variants.NAME.method.name=...
            path = path.split(".", 2)[2]
        return not edit.startswith(UNSET) and path == f"{table}.name"

    switch = next((e for e in edits if switches(e)), None)
    if switch is None:
        return ""
    keys = [k for k in error.keys if k.rsplit(".", 1)[0] == table]
    args = ", ".join(k.rsplit(".", 1)[1] for k in keys)
    return (f"; {switch!r} switched {table}.name and the new one does not take {args} (the config sets "
            f"{'it' if len(keys) == 1 else 'them'} for the old one): "
            f"`{' '.join('--unset ' + k for k in keys)}` drops {'it' if len(keys) == 1 else 'them'}")


def read_toml(path: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def load(path: str, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a TOML config file, apply overrides, validate."""
    raw = read_toml(path)
    return from_dict(apply_overrides(raw, overrides))


def merge_variant(base: Mapping[str, Any], variant: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``variant`` merged in, key by key; a table that has a ``name``
    (a model, data set or method) replaces the base's table whole, since its
    arguments belong to that name."""
    out = copy.deepcopy(dict(base))
    for key, value in variant.items():
        if isinstance(value, Mapping) and "name" not in value and isinstance(out.get(key), Mapping):
            out[key] = merge_variant(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_variants(path: str, overrides: Iterable[str] = ()) -> dict[str, ExperimentConfig]:
    """The configs of a file with ``[variants.NAME]`` tables, one per variant.

    Each variant is the file's base config with the variant's tables merged in
    (see :func:`merge_variant`), run under ``run.name/NAME``. ``overrides``
    apply to every variant, on top of its own tables (``run.name=X`` renames the
    base: the variants run under ``X/NAME``); a ``variants.NAME.…`` override
    changes that variant's table. A file without variants gives ``{"": config}``.
    """
    overrides = list(overrides)
    per_variant = [o for o in overrides if _override_path(o).startswith("variants.")]
    common = [o for o in overrides if o not in per_variant]
    raw = read_toml(path)
    names = list(raw["variants"]) if isinstance(raw.get("variants"), Mapping) else []
    for o in per_variant:  # a typo in a variant's name must not make a new variant
        parts = _override_path(o).split(".")
        if len(parts) < 3 or parts[1] not in names:
            if not names:
                raise ConfigError(f"override {o!r}: {path} has no [variants.NAME] tables")
            if len(parts) < 3:
                raise ConfigError(f"override {o!r} must look like variants.NAME.section.key=value")
            raise ConfigError(f"override {o!r}: {path} has no variant {parts[1]!r}{_suggest(parts[1], names)}")
    raw = apply_overrides(raw, per_variant)
    variants = raw.pop("variants", None)
    if variants is None:
        return {"": from_dict(apply_overrides(raw, common))}
    if not isinstance(variants, Mapping) or not variants or not all(isinstance(v, Mapping) for v in variants.values()):
        raise ConfigError("[variants] must hold one or more tables [variants.NAME]")
    out = {}
    for name, variant in variants.items():
        try:
            merged = apply_overrides(merge_variant(raw, variant), common)
            run = merged.setdefault("run", {})
            base_name = run.get("name", RunConfig.name)
            if isinstance(base_name, str):
                check_run_name(base_name)
            run["name"] = f"{base_name}/{name}"
            out[name] = from_dict(merged)
        except ConfigError as e:
            raise with_prefix(e, f"variant {name!r}: ") from None
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# Keys added to resolved configs after runs were made: a config written before holds none of them,
# which means the value here (the behaviour of its time), so resuming such a run is not refused.
ADDED_KEYS: dict[str, Any] = {"workers.devices_per_worker": 1, "model.tie_embeddings": False}


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two nested configs (``ignore``: key prefixes).

    A key of :data:`ADDED_KEYS` absent from one side counts as its value there."""
    fa, fb = flatten(a), flatten(b)
    ignore = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignore)

    def value(flat: dict[str, Any], key: str) -> Any:
        return flat.get(key, ADDED_KEYS.get(key, "<absent>"))

    return sorted(k for k in set(fa) | set(fb) if not ignored(k) and value(fa, k) != value(fb, k))
