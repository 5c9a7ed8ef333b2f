"""Run metrics: one JSON object per line (``metrics.jsonl``) and TensorBoard events.

Each record carries ``step`` (optimizer steps completed). On resume the log is
cut back to the checkpoint's step, so a resumed run's log equals, step for
step, the log of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Fields that measure the machine, not the optimization: they differ between two
# runs of the same config.
TIMING_KEYS = ("wall_time", "steps_per_sec")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a metrics file (or of ``RUN_DIR/metrics.jsonl``).

    A trailing partial line (a run killed mid-write) is dropped; a corrupt line
    anywhere else is an error naming its line number.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # last, unterminated line of a killed run
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and, optionally, TensorBoard event files.

    Args:
      run_dir: the run's directory.
      start_step: records after this step are dropped first (resume); 0 starts fresh.
      tensorboard: also write TensorBoard scalars under ``run_dir/tb``.
    """

    def __init__(self, run_dir: str, start_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(run_dir, METRICS_FILE)
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new log, never half
        self.last = kept[-1] if kept else None
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step hides the events a killed run wrote after its last checkpoint.
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(dict(record), allow_nan=False) + "\n")  # strict JSON: no NaN/Infinity
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        self.last = dict(record)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def without_timing(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Records minus the machine-dependent timing fields (for comparing runs)."""
    for r in records:
        yield {k: v for k, v in r.items() if k not in TIMING_KEYS}
