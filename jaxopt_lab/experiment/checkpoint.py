"""Checkpoints of a run: orbax, atomic, the last few kept, config stored beside the state.

Each checkpoint holds the whole :class:`TrainState` (step, params, optimizer
state, RNG key), the resolved config it was trained with, and, for data read
through an iterator (token files, grain), the iterator's position, so a resume can
refuse a config that would not reproduce the run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
DATA_ITEM = "data"  # the data iterator's position, for data read through one (token files)


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

    def save(self, step: int, state: Any, config: dict[str, Any], data: Any = None) -> None:
        """Save ``state`` and ``config`` at ``step``; ``data``: a grain ``DatasetIterator`` whose
        position is saved too (item ``data``: one JSON file per process, grain's orbax handler,
        written before this returns)."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data is not None:
            import grain

            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data)
        self._manager.save(step, args=ocp.args.Composite(**items))

    def has_data(self, step: int) -> bool:
        """Whether the checkpoint at ``step`` holds a data iterator's position."""
        return os.path.isdir(os.path.join(self.path(step), DATA_ITEM))

    def restore(self, step: int, like: Any, data: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restore the state at ``step`` into the structure of ``like`` and its config; ``data``: a
        grain ``DatasetIterator`` set to the position the checkpoint holds (an error if it holds none)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        items = {"state": ocp.args.StandardRestore(abstract), "config": ocp.args.JsonRestore()}
        if data is not None:
            if not self.has_data(step):
                raise ValueError(f"checkpoint {self.path(step)} holds no data iterator position")
            import grain

            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out.state, out.config

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config stored with the checkpoint at ``step`` (its state is not read)."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
