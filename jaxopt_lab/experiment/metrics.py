"""Run metrics: one JSON object per line (``metrics.jsonl``) and TensorBoard events.

Each record carries ``step`` (optimizer steps completed). On resume the log is
cut back to the checkpoint's step, so a resumed run's log equals, step for
step, the log of a run that was never interrupted. The TensorBoard events are
on disk by every checkpoint (:meth:`MetricsLog.flush`), and a resumed run
tells TensorBoard to drop what the killed one logged after its checkpoint, so
TensorBoard too shows every step once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Fields that measure the machine, not the optimization: they differ between two
# runs of the same config.
# what the machine decides, not the run's numbers: timings, and the compiled step's peak memory (XLA's
# buffer assignment, which changes with the jax version and platform)
TIMING_KEYS = ("wall_time", "steps_per_sec", "time_to_first_step", "peak_memory_bytes")


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


class TensorBoardEvents:
    """One TensorBoard event file, written synchronously: a scalar is in the file's buffer as soon
    as it is added, and on disk after :meth:`flush`.

    (tensorboardX's ``SummaryWriter`` hands events to a background thread that writes them
    every two minutes; its ``flush`` does not wait for that queue, so a process killed after a
    flush could still lose the steps before it.)

    Args:
      logdir: the directory of the event files (created if missing).
      purge_step: if set, TensorBoard drops the events earlier files logged at this step or
        later (a run resumed from the checkpoint of step ``purge_step - 1``).
    """

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import RecordWriter

        os.makedirs(logdir, exist_ok=True)
        # the name TensorBoard expects; a suffix if another writer took it in the same second
        base = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        path, n = base, 0
        while os.path.exists(path):
            n += 1
            path = f"{base}.{n}"
        self.path = path
        self._writer = RecordWriter(path)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:  # what SummaryWriter(purge_step=...) writes
            self._write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """One event holding every scalar of ``values`` at ``step``."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._write(Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        """Write the buffered events to disk (fsync)."""
        self._writer.flush()

    def close(self) -> None:
        self.flush()
        self._writer.close()


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and, optionally, TensorBoard event files.

    Every record is in ``metrics.jsonl`` once written (line-buffered); the
    TensorBoard events reach the disk at :meth:`flush`, which the trainer calls
    before every checkpoint, and at :meth:`close`.

    Args:
      run_dir: the run's directory.
      start_step: records after this step are dropped first (resume); 0 starts fresh.
      tensorboard: also write TensorBoard scalars under ``run_dir/tb``.
      write: False: write nothing, only keep :attr:`last` (the processes of a multi-process
        run other than process 0, which writes the run's log).
    """

    def __init__(self, run_dir: str, start_step: int = 0, tensorboard: bool = True, write: bool = True):
        self.path = os.path.join(run_dir, METRICS_FILE)
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        self.last = kept[-1] if kept else None
        self._file = self._tb = None
        if not write:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new log, never half
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            # purge_step hides the events a killed run wrote after its last checkpoint.
            self._tb = TensorBoardEvents(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(dict(record), allow_nan=False) + "\n")  # strict JSON: no NaN/Infinity
        if self._tb is not None:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self._tb.add_scalars(scalars, record["step"])
        self.last = dict(record)

    def flush(self) -> None:
        """Put every record written so far on disk, TensorBoard events included (before a checkpoint:
        a run killed after checkpoint k and resumed then shows every step in TensorBoard)."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def without_timing(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Records minus the machine-dependent fields (timings, peak memory; for comparing runs)."""
    for r in records:
        yield {k: v for k, v in r.items() if k not in TIMING_KEYS}
