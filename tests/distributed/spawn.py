"""Start several local JAX processes that form one multi-process run (jax.distributed over gloo).

Each process gets ``--xla_force_host_platform_device_count=devices`` CPU devices and the
repository on its ``PYTHONPATH``; :func:`free_port` picks the coordinator's port. A run that
does not finish in time is killed with SIGKILL (jax.distributed's preemption notifier catches
SIGTERM, so a hung process ignores it) and reported with the tail of each process's output,
so a test using these helpers cannot hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int = 4, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra_env or {})
    return env


def start(commands: list[list[str]], devices: int = 4, extra_env: dict[str, str] | None = None,
          cwd: str | None = None) -> list[subprocess.Popen]:
    """Start one process per command (each a full argv), its output (stdout and stderr) to a
    temporary file (a pipe nobody reads while another process is waited for could fill and block)."""
    env = process_env(devices, extra_env)
    procs = []
    for cmd in commands:
        log = tempfile.TemporaryFile()
        p = subprocess.Popen(cmd, env=env, cwd=cwd or ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.log = log
        procs.append(p)
    return procs


def output(p: subprocess.Popen) -> str:
    """What a process of :func:`start` has written so far."""
    p.log.seek(0)
    return p.log.read().decode(errors="replace")


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # each process leads its own session (start_new_session)


def wait(procs: list[subprocess.Popen], timeout: float) -> tuple[list[int | None], list[str]]:
    """Wait up to ``timeout`` seconds for all of ``procs``; kill whatever is left.

    Returns each process's return code (None: it was killed here) and output.
    """
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    logs = []
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            kill([p])
            p.wait()
            codes.append(None)
        logs.append(output(p))
    return codes, logs


def run(commands: list[list[str]], timeout: float, devices: int = 4, extra_env: dict[str, str] | None = None,
        cwd: str | None = None) -> list[str]:
    """Run the processes to the end; their outputs. A timeout or a failure fails the calling test
    with the tail of every process's output."""
    import pytest

    codes, logs = wait(start(commands, devices, extra_env, cwd), timeout)
    if any(c != 0 for c in codes):
        what = "did not finish in %d s (killed)" % timeout if None in codes else f"failed (exit codes {codes})"
        pytest.fail(f"{len(commands)} processes {what}:\n"
                    + "\n".join(f"--- process {i} ---\n{log[-3000:]}" for i, log in enumerate(logs)))
    return logs


def python(script: str, *args: str) -> list[str]:
    """The argv running ``script`` (a path relative to tests/distributed, or absolute) with this Python."""
    return [sys.executable, os.path.join(os.path.dirname(__file__), script), *map(str, args)]
