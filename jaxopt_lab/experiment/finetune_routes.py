"""The fine-tuning routes of an experiment config besides ``model.lora``: which parameters of a
pretrained model train, and how the model is changed before they do.

Each is a table of ``[model]`` (with ``model.init_from`` the pretrained run); at most one of
``lora``, ``svfit``, ``welore``, ``snella`` is given, ``eva`` only beside ``lora``:

- ``model.eva = {rho, tau, whiten, adjust_scaling_factors, max_steps, batches, batch_size}``: EVA
  (:func:`jaxopt_lab.finetune.eva_init`) re-initializes the LoRA adapters of ``model.lora``
  (its rank is the per-layer budget) from the activations of ``batches`` training batches of
  ``batch_size`` (default ``train.batch_size``): the run's own first batches,
  ``data.batch(i, batch_size, run.seed)`` for ``i < batches``, so the same for a given seed.
- ``model.svfit = {targets, rank | energy, train_also}``: SVFit
  (:func:`jaxopt_lab.finetune.apply_svfit`); only the singular values (and ``train_also``) train.
- ``model.welore = {targets, compression_target | threshold, min_reduction, train_also}``:
  WeLore (:func:`jaxopt_lab.finetune.apply_welore`); only the low-rank components' factors
  (and ``train_also``) train.
- ``model.snella = {targets, rank, kernel, heads, ratio, scale, magnitude_weighted,
  train_also, seed, allocation, total_steps, target_ratio, init_warmup, final_warmup,
  mask_interval, beta1, beta2}``: SNELLA (:func:`jaxopt_lab.finetune.apply_snella`); its
  factors and the ``"mixk"`` kernel's scalars train, and (``allocation = true``, the default)
  :func:`jaxopt_lab.finetune.snella_allocation` wraps the method (as ``lora_ggpo`` wraps its
  inner), with ``init_ratio = ratio`` and ``total_steps`` defaulting to ``train.steps``.

An unknown key or a bad value is a ConfigError naming it, before anything is computed.
Built abstractly (:func:`jaxopt_lab.experiment.build.validate`), SVFit, WeLore and EVA are
checked but not applied: their shapes depend on the pretrained values.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax
from flax import nnx

from jaxopt_lab.experiment.config import ConfigError, _suggest

ROUTES = ("lora", "svfit", "welore", "snella")  # what trains: exactly one of these, or none
TABLES = ("eva", "svfit", "welore", "snella")  # the tables this module handles (model.lora: build.py)

_SVFIT = {"targets": ".*", "rank": None, "energy": None, "train_also": ""}
_WELORE = {"targets": ".*", "threshold": None, "compression_target": None, "min_reduction": 0.4999, "train_also": ""}
_SNELLA_ALLOC = {"allocation": True, "total_steps": None, "target_ratio": 0.8, "init_warmup": 0, "final_warmup": 0,
                 "mask_interval": 1, "beta1": 0.85, "beta2": 0.85}
_EVA = {"rho": 2.0, "tau": 0.99, "whiten": False, "adjust_scaling_factors": True, "max_steps": 1000, "batches": 8,
        "batch_size": None}


def _snella_module_defaults() -> dict[str, Any]:
    from jaxopt_lab.finetune.snella import SNELLALinear

    params = inspect.signature(SNELLALinear.__init__).parameters
    return {k: p.default for k, p in params.items()
            if k not in ("self", "in_features", "out_features", "rngs", "kwargs")}


def _snella_keys() -> dict[str, Any]:
    return {"targets": ".*", "train_also": "", "seed": None, **_snella_module_defaults(), **_SNELLA_ALLOC}


def _check_table(name: str, table: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"model.{name} must be a table ({', '.join(defaults)}), got {table!r}")
    for key in table:
        if key not in defaults:
            raise ConfigError(f"unknown config key model.{name}.{key}{_suggest(key, list(defaults))}")
    for key in ("targets", "train_also"):
        if key in table:
            value = table[key]
            try:
                re.compile(value)
            except (re.error, TypeError) as e:
                raise ConfigError(f"model.{name}.{key} = {value!r} is not a regular expression: {e}") from None
    # TOML cannot hold None: the resolved table keeps the defaults that are not None
    return {**{k: v for k, v in defaults.items() if v is not None}, **table}


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def pop_tables(kwargs: dict[str, Any], seed: int) -> dict[str, dict[str, Any]]:
    """Remove this module's tables from a ``[model]`` table (``kwargs``, in place) and return
    them checked, with their defaults filled in (``snella.seed``: ``seed``, the run's)."""
    from jaxopt_lab.finetune.eva import check_eva_args
    from jaxopt_lab.finetune.snella import check_snella_args
    from jaxopt_lab.finetune.svfit import check_rank, rank_for
    from jaxopt_lab.finetune.welore import _check_unit

    tables = {name: kwargs.pop(name) for name in TABLES if name in kwargs}
    chosen = [r for r in ROUTES if r in tables or (r == "lora" and kwargs.get("lora") is not None)]
    if len(chosen) > 1:
        raise ConfigError(f"model.{chosen[0]} and model.{chosen[1]} are both given: a fine-tuning run takes one of "
                          f"model.{', model.'.join(ROUTES)}")
    if "eva" in tables and kwargs.get("lora") is None:
        raise ConfigError("model.eva initializes LoRA adapters: it needs model.lora beside it (its rank is the budget)")
    out = {}
    try:
        if "svfit" in tables:
            t = out["svfit"] = _check_table("svfit", tables["svfit"], _SVFIT)
            if "rank" in t:
                check_rank(t["rank"], float("inf"), float("inf"))
            rank_for(np.ones(1), t.get("rank"), t.get("energy"))  # exactly one of them, energy in (0, 1]
        if "welore" in tables:
            t = out["welore"] = _check_table("welore", tables["welore"], _WELORE)
            if ("threshold" in t) == ("compression_target" in t):
                raise ValueError("welore needs exactly one of threshold and compression_target, got "
                                 f"threshold={t.get('threshold')!r}, compression_target={t.get('compression_target')!r}")
            for key in ("threshold", "compression_target", "min_reduction"):
                if key in t:
                    _check_unit(key, t[key])
        if "snella" in tables:
            t = out["snella"] = _check_table("snella", tables["snella"], _snella_keys())
            t.setdefault("seed", seed)
            check_snella_args(t["rank"], t["kernel"], t["heads"], t["ratio"], t["scale"])
            _int("model.snella.seed", t["seed"], 0)
            if not isinstance(t["allocation"], bool) or not isinstance(t["magnitude_weighted"], bool):
                bad = "allocation" if not isinstance(t["allocation"], bool) else "magnitude_weighted"
                raise ConfigError(f"model.snella.{bad} must be true or false, got {t[bad]!r}")
            if "total_steps" in t:
                _int("model.snella.total_steps", t["total_steps"], 1)
        if "eva" in tables:
            t = out["eva"] = _check_table("eva", tables["eva"], _EVA)
            check_eva_args(t["rho"], t["tau"], t["max_steps"])
            _int("model.eva.batches", t["batches"], 1)
            if "batch_size" in t:
                _int("model.eva.batch_size", t["batch_size"], 1)
            for flag in ("whiten", "adjust_scaling_factors"):
                if not isinstance(t[flag], bool):
                    raise ConfigError(f"model.eva.{flag} must be true or false, got {t[flag]!r}")
    except ValueError as e:  # the library's own checks name the value
        raise ConfigError(f"model.{next(iter(tables))}: {e}" if len(tables) == 1 else f"model: {e}") from None
    return out


def apply_shape_only(module: nnx.Module, tables: Mapping[str, Mapping[str, Any]]) -> None:
    """What can be applied to an abstract model (inside ``nnx.eval_shape``): SNELLA's modules."""
    if "snella" in tables:
        _apply_snella(module, tables["snella"])


def apply(module: nnx.Module, tables: Mapping[str, Mapping[str, Any]]) -> None:
    """Apply SVFit, WeLore or SNELLA to ``module`` (its pretrained values loaded), in place."""
    from jaxopt_lab.finetune.svfit import apply_svfit
    from jaxopt_lab.finetune.welore import apply_welore

    try:
        if "svfit" in tables:
            t = tables["svfit"]
            apply_svfit(module, t["targets"], rank=t.get("rank"), energy=t.get("energy"))
        if "welore" in tables:
            t = tables["welore"]
            apply_welore(module, t["targets"], threshold=t.get("threshold"),
                         compression_target=t.get("compression_target"), min_reduction=t.get("min_reduction"))
    except ValueError as e:
        raise ConfigError(f"model.{'svfit' if 'svfit' in tables else 'welore'}: {e}") from None
    if "snella" in tables:
        _apply_snella(module, tables["snella"])


def _apply_snella(module: nnx.Module, t: Mapping[str, Any]) -> None:
    from jaxopt_lab.finetune.snella import apply_snella

    kwargs = {k: t[k] for k in _snella_module_defaults()}
    try:
        apply_snella(module, t["targets"], rngs=nnx.Rngs(params=t["seed"]), **kwargs)
    except ValueError as e:
        raise ConfigError(f"model.snella: {e}") from None


def apply_eva(module: nnx.Module, table: Mapping[str, Any], dataset: Any, batch_size: int, seed: int) -> dict:
    """EVA on ``module``'s LoRA adapters from the run's first ``table["batches"]`` training batches
    (``data.batch(i, batch_size, seed)``); returns what it did (ranks, steps, converged)."""
    from jaxopt_lab.finetune.eva import eva_init

    if not hasattr(dataset, "batch"):
        raise ConfigError("model.eva draws its batches with data.batch(step, size, seed): this data set has none")
    size = table.get("batch_size", batch_size)
    batches = [dataset.batch(i, size, seed)[0] for i in range(table["batches"])]
    try:
        result = eva_init(module, batches, rho=table["rho"], tau=table["tau"], whiten=table["whiten"],
                          adjust_scaling_factors=table["adjust_scaling_factors"], max_steps=table["max_steps"])
    except ValueError as e:
        raise ConfigError(f"model.eva: {e}") from None
    return {"ranks": dict(result.ranks), "steps": result.steps, "converged": result.converged}


# ---- what trains -------------------------------------------------------------------------


def route_name(model: Mapping[str, Any]) -> str | None:
    """The fine-tuning route of a resolved ``[model]`` table (``"lora"``, ...), or None."""
    return next((r for r in ROUTES if model.get(r) is not None), None)


def labels_and_freeze(model: Mapping[str, Any]) -> tuple[Callable, Callable] | None:
    """``(labels, freeze)`` of a resolved ``[model]`` table's route: ``labels(params)`` marks each
    leaf ``"trainable"`` or ``"frozen"``; ``freeze(tx)`` runs ``tx`` on the trainable leaves and
    gives the frozen ones zero updates and no optimizer state. None without a route."""
    from jaxopt_lab.finetune import lora as lora_lib
    from jaxopt_lab.finetune import svfit, welore
    from jaxopt_lab.finetune.snella import SNELLA_TRAIN_ALSO

    name = route_name(model)
    if name is None:
        return None
    also = model[name].get("train_also", "")
    if name == "lora":
        return lora_lib.trainable_labels(also), functools.partial(lora_lib.freeze_base, train_also=also)
    if name == "snella":  # the factors sit at .../lora/lora_a|b; the "mixk" scalars train beside them
        also = f"{SNELLA_TRAIN_ALSO}|{also}" if also else SNELLA_TRAIN_ALSO
        return lora_lib.trainable_labels(also), functools.partial(lora_lib.freeze_base, train_also=also)
    if name == "svfit":
        return svfit.singular_value_labels(also), functools.partial(svfit.freeze_all_but_singular_values,
                                                                    train_also=also)
    return welore.low_rank_labels(also), functools.partial(welore.freeze_all_but_low_rank, train_also=also)


def wrap_method(model: Mapping[str, Any], tx: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """The transform a route puts around the (frozen) method: SNELLA's allocation; else ``tx``."""
    from jaxopt_lab.finetune.snella import snella_allocation

    t = model.get("snella")
    if t is None or not t.get("allocation", True):
        return tx
    try:
        return snella_allocation(tx, total_steps=t.get("total_steps", steps), target_ratio=t["target_ratio"],
                                 init_ratio=t["ratio"], init_warmup=t["init_warmup"], final_warmup=t["final_warmup"],
                                 mask_interval=t["mask_interval"], beta1=t["beta1"], beta2=t["beta2"])
    except ValueError as e:
        raise ConfigError(f"model.snella: {e}") from None
