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


VARIANTS = """
[run]
name = "cmp"
seed = 1
out_dir = "{out}"
[data]
name = "digits"
[model]
name = "mlp"
hidden = [8]
[method]
name = "sgd"
learning_rate = 0.1
[train]
batch_size = 8
eval_every = 100
eval_batches = 1
[checkpoint]
every = 50
keep = 2
[logging]
progress = false
tensorboard = false
[variants.a]
train = {{ steps = 30 }}
[variants.b]
train = {{ steps = 1500 }}
[variants.c]
train = {{ steps = 20 }}
method = {{ name = "adam", learning_rate = 1e-3 }}
"""


def test_variants_killed_in_the_second_resume_as_a_whole(tmp_path, capsys):
    """kill -9 during variant b of a, b, c: `run` again is refused (pointing to resume); resuming b
    alone leaves the comparison for later (c never started); `resume` of the folder skips a and b,
    runs c and writes compare.md/png; every variant's metrics equal an uninterrupted run's."""
    from jaxopt_lab.experiment.cli import main

    cfg_path = tmp_path / "cmp.toml"
    cfg_path.write_text(VARIANTS.format(out=tmp_path / "runs"))
    base = tmp_path / "runs" / "cmp"
    log = tmp_path / "killed.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "jaxopt_lab.experiment.cli", "run", str(cfg_path)],
                                stdout=subprocess.DEVNULL, stderr=err)
    ckpts = base / "b" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
        if done and len(read_metrics(str(base / "b"))) > max(done) + 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be killed: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_metrics(str(base / "b"))[-1]["step"] < 1500 and not (base / "c").exists()
    a_metrics = (base / "a" / "metrics.jsonl").read_bytes()

    assert main(["run", str(cfg_path)]) == 2
    assert f"already holds checkpoints: `jaxopt-lab resume {base}`" in capsys.readouterr().err
    assert main(["resume", str(base / "b")]) == 0
    assert "other variants are unfinished" in capsys.readouterr().out and not (base / "compare.md").exists()
    assert main(["resume", str(base)]) == 0
    out = capsys.readouterr().out
    assert "a: finished, skipped" in out and "b: finished, skipped" in out and "c: not started, running" in out
    assert (base / "a" / "metrics.jsonl").read_bytes() == a_metrics
    rows = [line.split(" | ")[0] for line in (base / "compare.md").read_text().splitlines()[2:]]
    assert rows == ["| a", "| b", "| c"] and (base / "compare.png").read_bytes()[:4] == b"\x89PNG"
    configs = config_lib.load_variants(str(cfg_path))
    for name in ("b", "c"):
        reference = trainer.run(configs[name], run_dir=str(tmp_path / "reference" / name))
        assert list(without_timing(read_metrics(str(base / name)))) == list(without_timing(read_metrics(reference.run_dir)))
    assert [r["step"] for r in read_metrics(str(base / "b"))] == list(range(1501))
