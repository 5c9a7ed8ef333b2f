"""``jaxopt-lab run`` as 2 processes x 4 CPU devices (the tested stand-in for a pod / multi-node launch).

experiments/two_process_cpu.toml (DiLoCo, 4 workers x 2 devices) run by the CLI in 2
subprocesses joined by ``--coordinator/--num-processes/--process-id`` must log, step for step,
the numbers of the same config run in one process under vmap; process 0 alone writes the log.
The slow test kills one process mid-run: the other stops with the coordination service's
error within the heartbeat timeout, and ``jaxopt-lab resume`` in 2 processes finishes the run
with the uninterrupted run's numbers.
"""

import os
import signal
import sys
import time

import pytest

from jaxopt_lab.experiment import launch, trainer
from jaxopt_lab.experiment.cli import main
from jaxopt_lab.experiment.metrics import read_metrics, without_timing
from tests.distributed import spawn

CONFIG = os.path.join(spawn.ROOT, "experiments", "two_process_cpu.toml")
VMAP = ["workers.mode=vmap", "workers.devices_per_worker=1"]  # the same run in one process
COMPARED = ("loss", "grad_norm", "accuracy", "eval_loss", "eval_accuracy", "bytes_communicated", "wire_bytes")


def cli(command, run_dir, port, pid, *extra, from_env=False):
    """One process's command line: explicit launch flags, or (``from_env``) ``--distributed`` with the
    coordinator, process count and id in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
    args = [sys.executable, "-m", "jaxopt_lab.experiment.cli", command]
    args += [CONFIG, "--run-dir", run_dir] if command == "run" else [run_dir]
    if from_env:
        env = [f"JAX_COORDINATOR_ADDRESS=127.0.0.1:{port}", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={pid}"]
        return ["env", *env, *args, "--distributed", *extra]
    return args + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid), *extra]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def assert_same_records(records, expected):
    assert [r["step"] for r in records] == [r["step"] for r in expected]  # each step once: one writer
    for r, e in zip(without_timing(records), without_timing(expected)):
        assert set(r) == set(e), r["step"]
        for k in COMPARED:
            if k in e:
                assert r[k] == pytest.approx(e[k], rel=2e-5, abs=1e-6), (r["step"], k)


def vmap_run(tmp_path, overrides=()):
    return read_metrics(trainer.run(CONFIG, VMAP + list(overrides), run_dir=str(tmp_path / "vmap")).run_dir)


@pytest.mark.parametrize("devices_per_worker", [2, pytest.param(8, marks=pytest.mark.slow)])
def test_two_process_cli_run_matches_one_process_vmap(tmp_path, devices_per_worker):
    # d = 2: each worker inside one process; d = 8: the 4 workers share one group of 8 devices, each
    # spanning both processes
    run_dir = str(tmp_path / "two")
    port = spawn.free_port()
    extra = sets([f"workers.devices_per_worker={devices_per_worker}"])
    # process 0 from explicit flags, process 1 from the environment (--distributed)
    logs = spawn.run([cli("run", run_dir, port, 0, *extra), cli("run", run_dir, port, 1, *extra, from_env=True)],
                     timeout=240)
    finals = [next(line for line in log.splitlines() if line.startswith(run_dir)).split(" (first step")[0]
              for log in logs]
    assert finals[0] == finals[1] and "step 10:" in finals[0], finals  # both processes end on the same numbers
    records = read_metrics(run_dir)
    expected = vmap_run(tmp_path)
    assert_same_records(records, expected)
    assert records[-1]["bytes_communicated"] > 0  # the workers synchronized (twice: steps 4 and 8)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["10", "8"]  # both processes' shards
    assert os.path.isfile(os.path.join(run_dir, trainer.SUMMARY_FILE))


# what the survivor's coordination-service client says before it aborts: process 1 killed, the
# service (in process 0) misses its heartbeats; process 0 killed, process 1 loses the service
SURVIVOR_ERROR = {1: ("stopped sending heartbeats", "another task died"),
                  0: ("Failed to send RPC to coordination service", "leader task was preempted/died")}


@pytest.mark.slow  # about 2.5 min here each: two 2-process starts, a kill, the heartbeat timeout
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_stops_the_other_and_resume_continues_both(tmp_path, victim):
    run_dir = str(tmp_path / "killed")
    overrides = ["train.steps=40", "checkpoint.every=4"]
    port = spawn.free_port()
    procs = spawn.start([cli("run", run_dir, port, pid, "--heartbeat-timeout", "5", *sets(overrides))
                         for pid in range(2)])
    try:
        t0 = time.monotonic()
        while not os.path.isdir(os.path.join(run_dir, "checkpoints", "8")):
            assert all(p.poll() is None for p in procs), "a process stopped before checkpoint 8"
            assert time.monotonic() - t0 < 300, "no checkpoint 8 after 300 s"
            time.sleep(0.2)
        os.killpg(procs[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        survivor = 1 - victim
        codes, logs = spawn.wait([procs[survivor]], timeout=60)  # heartbeat timeout 5 s: well within 60 s
        assert codes[0] is not None, f"process {survivor} still running 60 s after process {victim} was killed"
        assert codes[0] != 0 and time.monotonic() - killed < 60
        print(f"process {survivor} stopped {time.monotonic() - killed:.1f} s after process {victim} was killed")
        assert "Terminating process because the JAX distributed service detected fatal errors" in logs[0]
        assert all(m in logs[0] for m in SURVIVOR_ERROR[victim]), logs[0][-3000:]
    finally:
        spawn.kill(procs)
        for p in procs:
            p.wait()
    reached = trainer.latest_checkpoint_step(run_dir)
    assert 8 <= reached < 40
    port = spawn.free_port()
    spawn.run([cli("resume", run_dir, port, pid) for pid in range(2)], timeout=240)
    assert_same_records(read_metrics(run_dir), vmap_run(tmp_path, overrides))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coordinator="10.0.0.1:1234"), r"--num-processes, --process-id missing"),
        (dict(coordinator="10.0.0.1", num_processes=2, process_id=0), r"--coordinator '10.0.0.1' is not HOST:PORT"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), r"--process-id 2 is not in 0 .. 1"),
        (dict(coordinator="h:1", num_processes=0, process_id=0), r"--num-processes must be >= 1, got 0"),
    ],
)
def test_bad_launch_flags_are_clear_errors(kwargs, match):
    with pytest.raises(launch.LaunchError, match=match):
        launch.resolve(**kwargs)


def test_launch_resolution(monkeypatch):
    assert launch.resolve() is None  # no flag: one process, nothing initialized
    assert launch.resolve("h:1", 1, 0) is None  # one process of one
    assert launch.resolve("h:1", 2, 1) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    # --distributed: what is not given is left to JAX's cluster detection (JAX_COORDINATOR_ADDRESS, SLURM, ...)
    assert launch.resolve(distributed=True) == {"coordinator_address": None, "num_processes": 4, "process_id": 3}
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(launch.LaunchError, match=r"JAX_PROCESS_ID='x' is not an integer"):
        launch.resolve(distributed=True)


def test_cli_refuses_incomplete_launch_flags(capsys):
    assert main(["run", CONFIG, "--coordinator", "127.0.0.1:1"]) == 2
    assert "--num-processes, --process-id missing" in capsys.readouterr().err
