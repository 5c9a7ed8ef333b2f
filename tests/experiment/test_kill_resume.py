"""A run killed with SIGKILL and resumed writes the metrics of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.metrics import read_metrics, without_timing

STEPS = 600


def config(out_dir):
    return config_lib.from_dict(
        {
            "run": {"name": "killed", "seed": 7, "out_dir": out_dir},
            "data": {"name": "text", "context": 16},
            "model": {"name": "gpt", "preset": "micro"},
            "method": {"name": "adamw", "learning_rate": 3e-3},
            "train": {"steps": STEPS, "batch_size": 8, "eval_every": 50, "eval_batches": 2},
            "checkpoint": {"every": 50, "keep": 2},
            "logging": {"progress": False},
        }
    )


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    cfg = config(str(tmp_path / "runs"))
    cfg_path = tmp_path / "killed.toml"
    cfg_path.write_text(cfg.dumps())
    run_dir = str(tmp_path / "runs" / "killed")
    log = tmp_path / "killed.log"  # a file, not a pipe nobody drains (the progress bar could fill it)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxopt_lab.experiment.cli", "run", str(cfg_path)],
            stdout=subprocess.DEVNULL, stderr=err,
        )
    ckpts = os.path.join(run_dir, "checkpoints")
    deadline = time.monotonic() + 120
    # kill once a checkpoint exists and training has gone past it
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
        if done and len(read_metrics(run_dir)) > max(done) + 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_metrics(run_dir)[-1]["step"]
    assert killed_at < STEPS

    trainer.resume(run_dir)
    reference = trainer.run(cfg, run_dir=str(tmp_path / "reference"))
    resumed = list(without_timing(read_metrics(run_dir)))
    assert [r["step"] for r in resumed] == list(range(STEPS + 1))
    assert resumed == list(without_timing(read_metrics(reference.run_dir)))
