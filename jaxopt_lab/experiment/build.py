"""Turn a validated config into data, a model, an optimizer and a loss.

Everything a config names is built here, before the first training step, so a
bad key or value fails fast. The *resolved* config (every default filled in,
the model's data-derived sizes included) is what a run writes beside its
metrics and what a resume is compared against.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_lab.data import DATASETS
from jaxopt_lab.losses import stable_max_cross_entropy
from jaxopt_lab.experiment.config import (
    ConfigError,
    ExperimentConfig,
    _suggest,
    check_kwargs,
    signature_params,
)
from jaxopt_lab.distributed.workers import WorkerRunner, nnx_partition_specs
from jaxopt_lab.experiment import finetune_routes
from jaxopt_lab.experiment.methods import _is_method_table, build_method, resolve_method, takes_axis_name
from jaxopt_lab.models import MODELS

# What each model needs to know about the data, filled in unless the config sets it.
_DATA_DERIVED: dict[str, Callable[[Any], dict[str, Any]]] = {
    "mlp": lambda d: {
        "in_features": math.prod(d.input_shape),
        "out_features": d.num_classes if d.task == "classification" else 1,
    },
    "cnn": lambda d: {"num_classes": d.num_classes, "in_channels": d.input_shape[-1]},
    "gpt": lambda d: {"vocab_size": d.num_classes, "context": d.context},
    "modular_transformer": lambda d: {"p": d.num_classes},
    "kat": lambda d: {"num_classes": d.num_classes, "image_size": d.input_shape[0], "in_channels": d.input_shape[-1]},
}
_MODEL_TASKS = {
    "mlp": ("classification", "regression"),
    "cnn": ("classification",),
    "gpt": ("lm",),
    "modular_transformer": ("classification",),
    "kat": ("classification",),
}


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built from a resolved config."""

    config: ExperimentConfig
    data: Any
    model: nnx.Module
    tx: optax.GradientTransformation
    runner: WorkerRunner | None = None  # set for multi-worker methods
    lora: Any = None  # the LoRAConfig of a fine-tuning run (model.lora): only the adapters train
    # a fine-tuning run (model.lora, svfit, welore, snella): params -> "trainable"/"frozen" per leaf
    trainable: Callable[[Any], Any] | None = None

    @property
    def task(self) -> str:
        return self.data.task


def _tomlable(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_tomlable(v) for v in value)
    return False


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _with_defaults(fn: Callable, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` plus every TOML-representable default of ``fn`` it does not set."""
    out = {}
    for name, param in signature_params(fn).items():
        if name in given:
            out[name] = _plain(given[name])
        elif param.default is not param.empty and _tomlable(param.default):
            out[name] = _plain(param.default)
    out.update({k: _plain(v) for k, v in given.items() if k not in out})
    return out


def _build_data(data: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    kwargs = dict(data)
    name = kwargs.pop("name")
    if name not in DATASETS:
        raise ConfigError(f"unknown data.name {name!r}{_suggest(name, DATASETS)}")
    loader = DATASETS[name]
    check_kwargs("data", loader, kwargs)
    try:
        dataset = loader(**kwargs)
    except (TypeError, ValueError, OSError) as e:
        path = kwargs.get("path")
        where = f"data.path = {path!r}" if isinstance(path, str) and path in str(e) else f"data ({name})"
        raise ConfigError(f"{where}: {e}") from None
    return dataset, {"name": name, **_with_defaults(loader, kwargs)}


# Compiled model inits, one per (class, arguments), the seed an argument: every run of a process
# (the variants of a config, the points of a sweep) that builds the same model reuses one.
_MODEL_INITS: collections.OrderedDict = collections.OrderedDict()
_MODEL_INITS_KEPT = 8


def model_init(cls: type, kwargs: Mapping[str, Any]) -> Callable[[jax.Array], nnx.Module]:
    """A jitted ``key -> cls(**kwargs, rngs=nnx.Rngs(params=key))``, shared by every caller that
    asks for the same class and arguments (the last few kept), so it compiles once per process.

    One compiled init instead of an eager op-by-op one is seconds faster on CPU.
    """
    frozen = dict(kwargs)

    def init_model(key):
        return cls(**frozen, rngs=nnx.Rngs(params=key))

    try:
        cache_key = (cls, json.dumps(frozen, sort_keys=True))
    except TypeError:  # arguments that are not plain data: not shared
        return nnx.jit(init_model)
    if cache_key in _MODEL_INITS:
        _MODEL_INITS.move_to_end(cache_key)
        return _MODEL_INITS[cache_key]
    init = _MODEL_INITS[cache_key] = nnx.jit(init_model)
    while len(_MODEL_INITS) > _MODEL_INITS_KEPT:
        _MODEL_INITS.popitem(last=False)
    return init


def _build_model(model: Mapping[str, Any], dataset: Any, seed: int,
                 abstract: bool = False) -> tuple[nnx.Module, dict[str, Any]]:
    kwargs = dict(model)
    name = kwargs.pop("name")
    if name not in MODELS:
        raise ConfigError(f"unknown model.name {name!r}{_suggest(name, MODELS)}")
    if dataset.task not in _MODEL_TASKS[name]:
        raise ConfigError(
            f"model {name!r} does not fit data task {dataset.task!r} (it takes {', '.join(_MODEL_TASKS[name])})"
        )
    cls = MODELS[name]
    init_from = kwargs.pop("init_from", None)
    routes = finetune_routes.pop_tables(kwargs, seed)  # model.svfit, welore, snella, eva (checked)
    lora_table = kwargs.pop("lora", None)
    if isinstance(lora_table, Mapping) and "seed" not in lora_table:  # the adapters' draw follows run.seed
        lora_table = {**lora_table, "seed": seed}
    lora = _lora_config(lora_table)
    if init_from is not None and (not isinstance(init_from, str) or not init_from.strip()):
        raise ConfigError(f"model.init_from must be a run directory or a config file, got {init_from!r}")
    preset = kwargs.pop("preset", None)
    presets = getattr(cls, "PRESETS", None)
    if preset is not None and presets is None:
        raise ConfigError(f"model.preset is not a key of model {name!r} (it has no presets)")
    check_kwargs("model", cls.__init__, kwargs)
    if preset is not None and preset not in presets:
        raise ConfigError(f"unknown model.preset {preset!r}{_suggest(preset, presets)}")
    base = dict(presets[preset]) if preset is not None else {}
    derived = _DATA_DERIVED[name](dataset)
    for key, value in kwargs.items():  # sizes the data fixes: inputs exactly, outputs/context not smaller
        exact = key in ("in_features", "in_channels", "image_size")
        if key in derived and isinstance(value, int) and (value != derived[key] if exact else value < derived[key]):
            raise ConfigError(f"model.{key} = {value!r} does not fit the data, which needs "
                              f"{'' if exact else 'at least '}{derived[key]!r}")
    kwargs = {**base, **derived, **kwargs}
    resolved = {"name": name, **({"preset": preset} if preset is not None else {})}
    resolved.update(_with_defaults(cls.__init__, kwargs))
    try:
        if abstract:  # shapes and dtypes only: the arguments are checked, nothing is computed
            def init():
                m = cls(**kwargs, rngs=nnx.Rngs(params=seed))
                if lora is not None:
                    _apply_lora(m, lora)
                finetune_routes.apply_shape_only(m, routes)  # SVFit, WeLore, EVA need the pretrained values
                return m

            module = nnx.eval_shape(init)
        else:
            module = model_init(cls, kwargs)(jax.random.key(seed))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model ({name}): {e}") from None
    if init_from is not None:
        _init_from(module, init_from, resolved, abstract)
        resolved["init_from"] = init_from
    if lora is not None:
        if not abstract:
            _apply_lora(module, lora)
        resolved["lora"] = {k: v for k, v in dataclasses.asdict(lora).items()}
        resolved["lora"]["alpha"] = float(lora.rank if lora.alpha is None else lora.alpha)
    if routes:
        if not abstract:
            finetune_routes.apply(module, routes)
        resolved.update(routes)
    return module, resolved


def _lora_config(table: Any) -> Any:
    """The ``[model.lora]`` table as a LoRAConfig (None without one)."""
    if table is None:
        return None
    from jaxopt_lab.finetune.lora import LoRAConfig

    if not isinstance(table, Mapping):
        raise ConfigError(f"model.lora must be a table (rank, alpha, targets, dropout, train_also, seed), got {table!r}")
    fields = [f.name for f in dataclasses.fields(LoRAConfig)]
    for key in table:
        if key not in fields:
            raise ConfigError(f"unknown config key model.lora.{key}{_suggest(key, fields)}")
    try:
        return LoRAConfig(**table)
    except ValueError as e:
        raise ConfigError(f"model.lora: {e}") from None


def _apply_lora(module: nnx.Module, lora: Any) -> None:
    from jaxopt_lab.finetune.lora import apply_lora

    try:
        apply_lora(module, lora.targets, lora.rank, lora.alpha, lora.dropout, rngs=nnx.Rngs(params=lora.seed))
    except ValueError as e:
        raise ConfigError(f"model.lora: {e}") from None


def _init_from(module: nnx.Module, init_from: str, resolved: dict[str, Any], abstract: bool) -> None:
    """Load ``model.init_from``'s pretrained parameters into ``module`` (running the pretraining
    first when ``init_from`` is its config file and its output is missing); ``abstract``: only
    check that it can be found."""
    from jaxopt_lab.finetune import pretrained

    try:
        if abstract:
            run_dir, step, _ = pretrained.pretrained_status(init_from)
            if step is None and not init_from.endswith(".toml"):
                pretrained.ensure_pretrained(init_from)  # raises, saying how to make it
            return
        run_dir = pretrained.ensure_pretrained(init_from)
        pretrained.check_same_model(init_from, run_dir, resolved)
        pretrained.load_params(module, pretrained.restore_params(run_dir), source=f"model.init_from = {init_from!r}")
    except pretrained.PretrainedError as e:
        raise ConfigError(str(e)) from None


def _resolve_method_table(method: Mapping[str, Any]) -> dict[str, Any]:
    """The method table with every default filled in, nested transformation tables included."""
    fn = resolve_method(method["name"])
    kwargs = {k: v for k, v in method.items() if k != "name"}
    kwargs = {k: _resolve_method_table(v) if _is_method_table(v) else v for k, v in kwargs.items()}
    return {"name": method["name"], **_with_defaults(fn, kwargs)}


def _param_specs(model: nnx.Module | None) -> Any:
    """The model's nnx partitioning annotations as per-worker specs, or None (unannotated: FSDP)."""
    if model is None:
        return None
    annotated = any(
        (v.get_metadata() or {}).get("out_sharding") or (v.get_metadata() or {}).get("sharding_names")
        for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)
    )
    return nnx_partition_specs(model) if annotated else None


def _build_method(config: ExperimentConfig, model: nnx.Module | None = None
                  ) -> tuple[optax.GradientTransformation, dict, WorkerRunner | None]:
    method, workers = config.method, config.workers
    multi_worker = takes_axis_name(resolve_method(method["name"]))
    if workers.count > 1 and not multi_worker:
        raise ConfigError(
            f"method {method['name']!r} is a single-worker transformation but workers.count = {workers.count}: "
            f"use a multi-worker method (data_parallel with inner = {{name = {method['name']!r}, ...}}, diloco, ...)"
        )
    sync_every = method.get("sync_every")
    if isinstance(sync_every, int) and sync_every > config.train.steps:
        raise ConfigError(f"method.sync_every = {sync_every} > train.steps = {config.train.steps}: "
                          "the workers would never synchronize")
    runner = None
    if multi_worker:
        try:
            d = workers.devices_per_worker
            runner = WorkerRunner(workers.count, workers.mode, devices_per_worker=d,
                                  param_specs=_param_specs(model) if d > 1 else None)
        except ValueError as e:
            raise ConfigError(f"workers: {e}") from None
    route = finetune_routes.labels_and_freeze(config.model)
    if route is not None:  # fine-tuning: the method trains the adapters (and train_also); the rest is frozen
        _, freeze = route
        fn = resolve_method(method["name"])
        # a method that needs the whole tree (the frozen kernels: lora_ggpo; the loss of the whole model:
        # ist) is not frozen itself: its inner method is
        if getattr(fn, "perturbs_frozen_base", False):
            tx = build_method(method, axis_name=runner.axis_name if runner else None, wrap_inner=freeze)
        else:
            tx = freeze(build_method(method, axis_name=runner.axis_name if runner else None))
        tx = finetune_routes.wrap_method(config.model, tx, config.train.steps)  # SNELLA's allocation
    else:
        tx = build_method(method, axis_name=runner.axis_name if runner else None)
    if config.train.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.train.grad_accum)
    return tx, _resolve_method_table(method), runner


def _tree_bytes(tree: Any) -> int:
    from jaxopt_lab.lowrank.memory import optimizer_state_bytes  # PRNG keys (IST's state) counted as key data

    return optimizer_state_bytes(tree)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def device_memory_bytes(devices: list[Any]) -> tuple[int | None, str]:
    """Memory the run's devices can hold, and what that is, in words.

    An accelerator reports its own limit (``memory_stats()["bytes_limit"]``); CPU devices share
    the host's physical memory (forced host devices split it, they do not add to it).
    """
    if devices and devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits):
            return int(sum(limits)), f"{len(devices)} {devices[0].device_kind} device(s)"
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
    return int(host), "this host's physical memory"


def check_memory(exp: Experiment, limit: int | None = None) -> int:
    """Refuse a config whose arrays cannot fit the device, before anything is allocated.

    A lower bound, from shapes alone (``jax.eval_shape``): per worker the parameters, their
    gradients and updates, and the optimizer state; per step the batch (held on the host, then
    on the device) and the model's outputs for it. Returns the estimate in bytes.
    """
    cfg = exp.config
    workers = cfg.workers.count if exp.runner is not None else 1
    params = nnx.state(exp.model, nnx.Param)
    p_bytes = _tree_bytes(params)
    s_bytes = _tree_bytes(jax.eval_shape(exp.tx.init, params))
    batch = max(cfg.train.batch_size, cfg.train.max_batch_size if cfg.train.norm_test_eta > 0 else 0)
    x, y = exp.data.batch(0, 1, cfg.run.seed)
    example = x.nbytes + y.nbytes
    try:
        graphdef, state = nnx.split(exp.model)
        out = jax.eval_shape(lambda st, xs: nnx.merge(graphdef, st)(xs), state,
                             jax.ShapeDtypeStruct(x.shape, x.dtype))
        example_out = _tree_bytes(out)
    except Exception:  # a model that cannot be traced abstractly: count its inputs only
        example_out = 0
    per_worker = 3 * p_bytes + s_bytes
    per_batch = batch * (2 * example + example_out)
    total = workers * (per_worker + per_batch)
    if limit is None:
        devices = jax.devices()
        if exp.runner is not None and cfg.workers.mode == "shard_map":
            devices = list(exp.runner.devices)
        else:
            devices = devices[:1]
        limit, what = device_memory_bytes(devices)
    else:
        what = "the given limit"
    if limit is not None and total > limit:
        raise ConfigError(
            f"this run needs at least {_fmt_bytes(total)} of memory, more than {what} ({_fmt_bytes(limit)}): "
            + (f"workers.count = {workers} x (" if workers > 1 else "")
            + f"{_fmt_bytes(per_worker)} of parameters, gradients, updates and optimizer state + "
            f"{_fmt_bytes(per_batch)} for a batch of train.batch_size = {batch} examples of "
            f"{_fmt_bytes(2 * example + example_out)} each (inputs and outputs)" + (")" if workers > 1 else "")
        )
    return total


def build(config: ExperimentConfig, abstract: bool = False, check_fit: bool = True) -> Experiment:
    """Build data, model and optimizer; return them with the resolved config.

    A config whose arrays cannot fit the device is refused here (:func:`check_memory`).
    ``abstract=True``: the model's parameters are shapes and dtypes only
    (``nnx.eval_shape``), nothing is initialized, allocated or compiled; every other
    check still runs (see :func:`validate`). ``check_fit=False`` leaves the memory
    check to the caller, who may pass the memory of the machine the config is meant
    for: how a config written for a GPU or a pod is checked on a laptop.
    """
    dataset, data = _build_data(config.data)
    model, model_cfg = _build_model(config.model, dataset, config.run.seed, abstract=abstract)
    if "eva" in model_cfg and not abstract:  # EVA's adapters from the run's first training batches
        finetune_routes.apply_eva(model, model_cfg["eva"], dataset, config.train.batch_size, config.run.seed)
    tx, method, runner = _build_method(dataclasses.replace(config, model=model_cfg), model)
    resolved = dataclasses.replace(config, data=data, model=model_cfg, method=method)
    lora = _lora_config({k: v for k, v in model_cfg["lora"].items()}) if "lora" in model_cfg else None
    route = finetune_routes.labels_and_freeze(model_cfg)
    experiment = Experiment(config=resolved, data=dataset, model=model, tx=tx, runner=runner, lora=lora,
                            trainable=route[0] if route is not None else None)
    if check_fit:
        check_memory(experiment)
    return experiment


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Every check :func:`build` makes (data, model, method, memory), without initializing or
    compiling the model; returns the resolved config. For configs about to be run later (the
    variants of a config, the points of a sweep), each of which :func:`build` builds then.
    """
    return build(config, abstract=True).config


# ---- losses and metrics per task -------------------------------------------------


def per_example(task: str, outputs: jax.Array, targets: jax.Array, loss: str = "cross_entropy") -> dict[str, jax.Array]:
    """Per-example loss (and accuracy where it means something) for a task.

    classification: cross-entropy on integer labels (softmax, or StableMax with
    ``loss="stable_max"``, Prieto et al. 2025), and accuracy;
    lm: the same per token, averaged over the sequence;
    regression: squared error of the scalar output.
    """
    if task == "regression":
        pred = outputs.reshape(targets.shape).astype(jnp.float32)
        return {"loss": jnp.square(pred - targets)}
    logits = outputs.astype(jnp.float32)
    if loss == "stable_max":
        per = stable_max_cross_entropy(logits, targets)
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    if task == "lm":
        per, correct = per.mean(axis=-1), correct.mean(axis=-1)
    return {"loss": per, "accuracy": correct}
