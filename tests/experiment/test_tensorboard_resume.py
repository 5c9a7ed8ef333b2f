"""TensorBoard keeps every scalar of a run killed with SIGKILL after a checkpoint and resumed."""

import glob
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.metrics import read_metrics

STEPS = 100


def read_scalars(tb_dir):
    """``{tag: {step: value}}`` as TensorBoard shows it: event files in name order, and a
    ``SessionLog.START`` at step s drops what earlier events logged at steps >= s (a restart)."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "*tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            if pos + 12 + length + 4 > len(data):
                break  # a record the kill cut short
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for by_step in scalars.values():
                    for step in [s for s in by_step if s >= event.step]:
                        del by_step[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


# The run kills itself with SIGKILL: right after checkpoint KILL is on disk ("checkpoint"), or
# right after the metrics of step KILL, steps past the last checkpoint ("record").
_KILLED_RUN = """
import os, signal, sys
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.checkpoint import Checkpointer
from jaxopt_lab.experiment.metrics import MetricsLog

when, kill_at = sys.argv[2], int(sys.argv[3])
save, write = Checkpointer.save, MetricsLog.write

def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if when == "checkpoint" and step == kill_at:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)

def write_then_die(self, record):
    write(self, record)
    if when == "record" and record["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

Checkpointer.save, MetricsLog.write = save_then_die, write_then_die
trainer.run(sys.argv[1])
"""


@pytest.mark.parametrize("when, kill_at", [("checkpoint", 40), ("record", 75)])
def test_scalars_survive_sigkill_and_resume(tmp_path, when, kill_at):
    cfg = config_lib.from_dict(
        {
            "run": {"name": "killed", "seed": 1, "out_dir": str(tmp_path)},
            "data": {"name": "least_squares"},
            "model": {"name": "mlp", "hidden": [4]},
            "method": {"name": "sgd", "learning_rate": 0.01},
            "train": {"steps": STEPS, "batch_size": 8, "eval_every": 20, "eval_batches": 1},
            "checkpoint": {"every": 20, "keep": 1},
            "logging": {"progress": False},
        }
    )
    cfg_path = tmp_path / "killed.toml"
    cfg_path.write_text(cfg.dumps())
    run_dir = str(tmp_path / "killed")
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(cfg_path), when, str(kill_at)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert read_metrics(run_dir)[-1]["step"] == kill_at

    trainer.resume(run_dir)
    records = read_metrics(run_dir)
    scalars = read_scalars(os.path.join(run_dir, "tb"))
    assert sorted(scalars["loss"]) == list(range(1, STEPS + 1))
    # every scalar of every step, with the value metrics.jsonl holds: wall_time differs between the
    # killed and the resumed run, so it also shows that the killed run's steps past its checkpoint
    # were dropped, not shown beside the resumed ones
    for tag in ("loss", "grad_norm", "learning_rate", "eval_loss", "wall_time"):
        logged = {r["step"]: np.float32(r[tag]) for r in records if tag in r}
        assert scalars[tag] == logged, tag
