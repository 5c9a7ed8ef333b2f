"""A run killed with SIGKILL and resumed writes the metrics of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxopt_lab.experiment import config as config_lib
from jaxopt_lab.experiment import trainer
from jaxopt_lab.experiment.metrics import read_metrics, without_timing

STEPS = 300  # the kill lands near step 100 here (checkpoint 50 and the metrics after it): 200 steps to spare


def kill_past_a_checkpoint(argv, run_dir, log, margin=10, poll=0.05, timeout=120):
    """Run the CLI with ``argv`` in a subprocess and SIGKILL it once ``run_dir`` has a checkpoint and
    its metrics are ``margin`` steps past it; the process's stderr goes to the file ``log``."""
    with open(log, "wb") as err:  # a file, not a pipe nobody drains (the progress bar could fill it)
        proc = subprocess.Popen([sys.executable, "-m", "jaxopt_lab.experiment.cli", *argv],
                                stdout=subprocess.DEVNULL, stderr=err)
    ckpts = os.path.join(run_dir, "checkpoints")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
        if done and len(read_metrics(run_dir)) > max(done) + margin:
            break
        time.sleep(poll)
    assert proc.poll() is None, f"run ended before it could be killed: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def token_folder(folder):
    """A small byte-level token folder (train.bin, val.bin, meta.json), as prepare_tokens writes."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 256, 20_000, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, 256, 2_000, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 256, "dtype": "uint16"}))
    return str(folder)


def config(out_dir, data):
    return config_lib.from_dict(
        {
            "run": {"name": "killed", "seed": 7, "out_dir": out_dir},
            "data": data,
            "model": {"name": "gpt", "preset": "micro"},
            "method": {"name": "adamw", "learning_rate": 3e-3},
            "train": {"steps": STEPS, "batch_size": 8, "eval_every": 50, "eval_batches": 2},
            "checkpoint": {"every": 50, "keep": 2},
            "logging": {"progress": False},
        }
    )


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, source):
    """text: batches drawn by (seed, step); tokens: read through a grain iterator whose position is in
    every checkpoint and restored by the resume."""
    if source == "text":
        data = {"name": "text", "context": 16}
    else:
        data = {"name": "tokens", "path": token_folder(tmp_path / "tok"), "seq_len": 16}
    cfg = config(str(tmp_path / "runs"), data)
    cfg_path = tmp_path / "killed.toml"
    cfg_path.write_text(cfg.dumps())
    run_dir = str(tmp_path / "runs" / "killed")
    kill_past_a_checkpoint(["run", str(cfg_path)], run_dir, tmp_path / "killed.log")
    killed_at = read_metrics(run_dir)[-1]["step"]
    assert killed_at < STEPS
    if source == "tokens":  # the kept checkpoints hold the iterator at their step
        for step in [int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit()]:
            saved = os.path.join(run_dir, "checkpoints", str(step), "data", "process_0-of-1.json")
            with open(saved) as f:
                assert json.load(f) == {"next_index": step}

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
    kill_past_a_checkpoint(["run", str(cfg_path)], str(base / "b"), tmp_path / "killed.log", poll=0.02)
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


FEDERATED = """
[run]
name = "fed"
seed = 0
[federated]
num_clients = 12
dirichlet_alpha = 1.0
partition_seed = 0
hidden = []
batch_size = 16
sim_time = 40.0
chunk_steps = 4
checkpoint_every = 4
num_seeds = 2
[methods.buffered]
rule = "fedbuff"
trigger = "buffer"
buffer_size = 2
concurrency = 4
eval_every = 2
[methods.sync]
rule = "fedavg"
trigger = "sync"
clients_per_round = 3
eval_every = 1
"""

# Runs the CLI with the federated runner's two writers wrapped to SIGKILL the process at a given point.
KILLER = """
import os, signal, sys
from jaxopt_lab.experiment import cli, federated_run as fr

point, argv = sys.argv[1], sys.argv[2:]
seen = {"appends": 0}
append, save = fr._append_records, fr._save_checkpoint

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def on_append(path, records):
    append(path, records)
    seed = records[0]["seed"] if records else None
    method = os.path.basename(os.path.dirname(path))
    if point == "mid" and method == "buffered" and seed == 1:  # after a checkpoint of seed 1 and a chunk more
        seen["appends"] += 1
        if seen["appends"] == 3:  # step 0; steps 2, 4 (then checkpoint 4); steps 6, 8: killed here
            die()
    if point == "between_methods" and method == "sync" and records and records[0]["step"] == 0:
        die()  # sync has started (its step-0 record is written) but has no checkpoint

def on_save(ckpt, step, state, meta):
    save(ckpt, step, state, meta)
    if point == "between_seeds" and "/sync/seed_0/" in ckpt.directory and meta["progress"]["done"]:
        die()

from jaxopt_lab.distributed.federated import FederatedSimulator

def logged_run(self, state, *args, **kwargs):
    print(f"chunk from server step {int(state.step)}", file=sys.stderr, flush=True)
    return run(self, state, *args, **kwargs)

run, FederatedSimulator.run = FederatedSimulator.run, logged_run
fr._append_records, fr._save_checkpoint = on_append, on_save
sys.exit(cli.main(argv))
"""


def test_federated_run_killed_at_three_points_resumes_bit_identically(tmp_path):
    """kill -9 in the middle of the first method's second seed, then between the methods, then
    between the second method's seeds: each resume continues from the checkpoints (the records a
    kill left after the last one are dropped) and the finished run's metrics and summary are those
    of an uninterrupted run, byte for byte."""
    from jaxopt_lab.experiment import federated_run

    path = tmp_path / "fed.toml"
    path.write_text(FEDERATED)
    run_dir = tmp_path / "killed"
    log = tmp_path / "killed.log"
    commands = [("mid", ["run", str(path), "--run-dir", str(run_dir)]),
                ("between_methods", ["resume", str(run_dir)]), ("between_seeds", ["resume", str(run_dir)])]
    seen = []
    for point, argv in commands:
        with open(log, "wb") as err:
            rc = subprocess.run([sys.executable, "-c", KILLER, point, *argv], stdout=subprocess.DEVNULL, stderr=err).returncode
        assert rc == -signal.SIGKILL, f"{point}: rc {rc}: {log.read_text()[-2000:]}"
        seen.append({m: [(r["seed"], r["step"]) for r in read_metrics(str(run_dir / m / "metrics.jsonl"))]
                     for m in ("buffered", "sync") if (run_dir / m / "metrics.jsonl").exists()})
        if point == "mid":
            assert sorted(os.listdir(run_dir / "buffered" / "seed_1" / "checkpoints")) == ["4"]
        chunks = [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines() if line.startswith("chunk from")]
        if point == "between_methods":  # buffered's seed 0 is skipped, its seed 1 continues from checkpoint 4
            assert chunks == [4, 8]  # (then sync is killed at its step-0 record, before its first chunk)
        if point == "between_seeds":  # buffered is skipped; sync's seed 0 had no checkpoint: from 0
            assert chunks == [0]
    # where the kills landed: buffered seed 1 checkpointed at server step 4 but logged up to 8 (dropped
    # and redone on resume); sync started, no checkpoint; sync seed 0 done, seed 1 not started
    assert seen[0]["buffered"][-3:] == [(1, 4), (1, 6), (1, 8)] and "sync" not in seen[0]
    assert seen[1]["sync"] == [(0, 0)] and seen[1]["buffered"] == seen[0]["buffered"]
    assert {s for s, _ in seen[2]["sync"]} == {0} and len(seen[2]["sync"]) > 1
    assert not (run_dir / "summary.md").exists()

    table, _ = federated_run.resume(str(run_dir))
    reference = tmp_path / "reference"
    federated_run.run(str(path), run_dir=str(reference))
    for method in ("buffered", "sync"):
        assert (run_dir / method / "metrics.jsonl").read_text() == (reference / method / "metrics.jsonl").read_text()
    without_wall = lambda text: [line.rsplit("|", 2)[0] for line in text.splitlines()]  # noqa: E731
    assert without_wall((run_dir / "summary.md").read_text()) == without_wall((reference / "summary.md").read_text())
    assert "| sync | fedavg / sync |" in table
