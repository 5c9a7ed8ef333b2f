"""Checkpoints of a run: orbax, atomic, the last few kept, config stored beside the state.

Each checkpoint holds the whole :class:`TrainState` (step, params, optimizer
state, RNG key) and the resolved config it was trained with, so a resume can
refuse a config that would not reproduce the run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Save and restore ``(state, config)`` pairs under ``run_dir/checkpoints/<step>``.

    orbax writes each checkpoint to a temporary directory and renames it when
    complete, so a process killed mid-save leaves the previous checkpoints
    intact and no half-written one is ever restored.

    Args:
      run_dir: the run's directory.
      keep: how many of the most recent checkpoints to keep.
    """

    def __init__(self, run_dir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, config: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the state at ``step`` into the structure of ``like`` and its config."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()),
        )
        return out.state, out.config

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config stored with the checkpoint at ``step`` (its state is not read)."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
