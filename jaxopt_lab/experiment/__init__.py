"""Experiments as data: TOML configs, one trainer for every method, a CLI."""

from jaxopt_lab.experiment.config import ConfigError, ExperimentConfig, load
from jaxopt_lab.experiment.trainer import NonFiniteLossError, RunDirError, RunResult, TrainState, resume, run

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "NonFiniteLossError",
    "RunDirError",
    "RunResult",
    "TrainState",
    "load",
    "resume",
    "run",
]
