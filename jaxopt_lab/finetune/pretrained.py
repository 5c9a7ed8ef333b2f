"""Start a run from a pretrained one: ``model.init_from`` of an experiment config.

``init_from`` names either a run directory (``runs/pretrain_gpt_docs``) whose last
checkpoint holds the parameters, or the config file of that run
(``experiments/pretrain_gpt_docs.toml``): then the run it describes is used, and when it has
not been run yet (or stopped early) it is run (or resumed) first. The pretrained run's model
must be the one this config builds (same name and sizes); its parameters replace the freshly
initialised ones path by path, before any adapter is added.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_lab.finetune.lora import flatten_with_paths, path_str

# model keys that are not the architecture: a pretrained run may differ in them
NOT_ARCHITECTURE = ("init_from", "lora")


class PretrainedError(ValueError):
    """``model.init_from`` cannot be used (missing, unfinished, another model); the message says how to fix it."""


def _run_dir_and_config(init_from: str) -> tuple[str, str | None]:
    """(run directory, config file or None) that ``init_from`` names."""
    if init_from.endswith(".toml"):
        from jaxopt_lab.experiment import config as config_lib
        from jaxopt_lab.experiment.trainer import run_dir_of

        if not os.path.isfile(init_from):
            raise PretrainedError(f"model.init_from = {init_from!r}: no such config file")
        return run_dir_of(config_lib.load(init_from)), init_from
    return init_from, None


def pretrained_status(init_from: str) -> tuple[str, int | None, int]:
    """(run directory, its last checkpoint step or None, its train.steps) for ``init_from``."""
    from jaxopt_lab.experiment import config as config_lib
    from jaxopt_lab.experiment.trainer import CONFIG_FILE, latest_checkpoint_step

    run_dir, config_file = _run_dir_and_config(init_from)
    path = config_file or os.path.join(run_dir, CONFIG_FILE)
    steps = config_lib.load(path).train.steps if os.path.isfile(path) else 0
    return run_dir, latest_checkpoint_step(run_dir), steps


def ensure_pretrained(init_from: str) -> str:
    """The run directory ``init_from`` names, with its pretraining finished.

    A config file whose run has no checkpoint is run (``jaxopt-lab run``), one whose run
    stopped before its last step is resumed; a run directory that is missing or unfinished
    is a PretrainedError that says which command makes it.
    """
    from jaxopt_lab.experiment import trainer

    run_dir, config_file = _run_dir_and_config(init_from)
    _, step, steps = pretrained_status(init_from)
    if step is not None and step >= steps:
        return run_dir
    if config_file is None:
        if step is None:
            raise PretrainedError(
                f"model.init_from = {init_from!r} holds no checkpoint: run its pretraining first "
                f"(`jaxopt-lab run experiments/pretrain_gpt_docs.toml` writes runs/pretrain_gpt_docs), or set "
                f"model.init_from to that config file, which runs it when its output is missing")
        raise PretrainedError(f"model.init_from = {init_from!r} stopped at step {step} of {steps}: "
                              f"`jaxopt-lab resume {run_dir}` finishes it")
    print(f"model.init_from: {'running' if step is None else 'resuming'} the pretraining {config_file} -> {run_dir}",
          flush=True)
    if step is None:
        trainer.run(config_file)
    else:
        trainer.resume(run_dir)
    return run_dir


def check_same_model(init_from: str, run_dir: str, model_cfg: dict[str, Any]) -> None:
    """PretrainedError naming the keys where the pretrained run's resolved ``[model]`` differs
    from ``model_cfg`` (this config's, resolved), architecture keys only."""
    from jaxopt_lab.experiment import config as config_lib
    from jaxopt_lab.experiment.trainer import CONFIG_FILE

    theirs = config_lib.read_toml(os.path.join(run_dir, CONFIG_FILE)).get("model", {})
    ours = {k: v for k, v in model_cfg.items() if k not in NOT_ARCHITECTURE}
    theirs = {k: v for k, v in theirs.items() if k not in NOT_ARCHITECTURE}
    differ = config_lib.differing_keys(theirs, ours)
    if differ:
        detail = "; ".join(f"{k}: pretrained {theirs.get(k, '<absent>')!r} vs here {ours.get(k, '<absent>')!r}"
                           for k in differ)
        raise PretrainedError(f"model.init_from = {init_from!r} trained another model ({detail})")


def restore_params(run_dir: str, step: int | None = None) -> dict[str, jax.Array]:
    """The parameters of a run's checkpoint (default: the last), by path (``"blocks/0/qkv/kernel"``)."""
    import orbax.checkpoint as ocp

    from jaxopt_lab.experiment.checkpoint import CHECKPOINT_DIR
    from jaxopt_lab.experiment.trainer import latest_checkpoint_step

    step = latest_checkpoint_step(run_dir) if step is None else step
    if step is None:
        raise PretrainedError(f"{run_dir} holds no checkpoint")
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR)))
    try:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    finally:
        manager.close()
    paths, leaves, _ = flatten_with_paths(state["params"])
    return dict(zip(paths, leaves))


def load_params(model: nnx.Module, params: dict[str, jax.Array], source: str = "the checkpoint") -> None:
    """Set every ``nnx.Param`` of ``model`` from ``params`` (by path), in place; a missing,
    extra or differently shaped parameter is a PretrainedError naming it."""
    mine = {path_str(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    missing = sorted(set(mine) - set(params))
    extra = sorted(set(params) - set(mine))
    if missing or extra:
        raise PretrainedError(f"{source} does not fit the model: "
                              + (f"missing {', '.join(missing)}" if missing else "")
                              + ("; " if missing and extra else "")
                              + (f"unexpected {', '.join(extra)}" if extra else ""))
    for path, var in mine.items():
        value = params[path]
        if tuple(value.shape) != tuple(var.shape):
            raise PretrainedError(f"{source}: {path} has shape {tuple(value.shape)}, the model {tuple(var.shape)}")
        var[...] = jnp.asarray(value, var.dtype)
