"""The worker runner: the same DiLoCo run in vmap, shard_map and multi-process modes."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from jaxopt_lab.distributed import WorkerRunner, diloco
from jaxopt_lab.distributed.workers import CPU_MAX_IN_FLIGHT
from tests.distributed.problem import run

NUM_WORKERS = 8
STEPS = 7


def diloco_tx(axis_name):
    return diloco(optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True), sync_every=3, axis_name=axis_name)


@pytest.fixture(scope="module")
def vmap_params():
    runner = WorkerRunner(NUM_WORKERS, mode="vmap")
    params, _ = run(runner, diloco_tx(runner.axis_name), STEPS, NUM_WORKERS)
    return params


def assert_same(a, b):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_devices", [8, 4, 2])  # 1, 2 and 4 workers per device
def test_shard_map_matches_vmap(vmap_params, num_devices):
    runner = WorkerRunner(NUM_WORKERS, mode="shard_map", devices=jax.devices()[:num_devices])
    assert runner.workers_per_device == NUM_WORKERS // num_devices
    params, _ = run(runner, diloco_tx(runner.axis_name), STEPS, NUM_WORKERS)
    assert_same(params, vmap_params)
    # workers differ between syncs (step 7 is one past the sync at 6), so the check is not vacuous
    assert np.ptp(vmap_params["w"], axis=0).max() > 1e-3


def run_two_processes(tmp_path, steps, timeout, extra_env=None):
    """Run multiprocess_diloco.py in 2 processes; their parameters, or a failure naming what went wrong.

    On timeout both processes are killed with SIGKILL (jax.distributed's preemption
    notifier catches SIGTERM, so a hung process ignores it), so the test cannot hang.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "params.npz")
    script = os.path.join(os.path.dirname(__file__), "multiprocess_diloco.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(extra_env or {})
    procs = [
        subprocess.Popen([sys.executable, script, str(port), str(pid), out, str(steps)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for pid in range(2)
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0].decode() for p in procs]
        pytest.fail(f"{steps} steps in 2 processes did not finish in {timeout} s (killed):\n"
                    + "\n".join(log[-2000:] for log in logs))
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    with np.load(out) as saved:
        return dict(saved)


def test_multiprocess_matches_vmap(vmap_params, tmp_path):
    assert_same(run_two_processes(tmp_path, STEPS, timeout=240), vmap_params)


def test_multiprocess_many_queued_steps_finish(tmp_path):
    # 200 steps dispatched without a host sync used to deadlock both processes once more than
    # XLA's 32 in-flight computations per device were queued (see workers.py). PJRT_NPROC=1
    # gives XLA's CPU client its smallest thread pool (one thread per local device), the
    # setting of a 2-core machine, so this reproduces the deadlock on any machine.
    steps = 200
    params = run_two_processes(tmp_path, steps, timeout=120, extra_env={"PJRT_NPROC": "1"})
    runner = WorkerRunner(NUM_WORKERS, mode="vmap")
    expected, _ = run(runner, diloco_tx(runner.axis_name), steps, NUM_WORKERS)
    assert_same(params, expected)


def test_queue_bound_where_cpu_collectives_need_it():
    # bounded by default: shard_map over several CPU devices of this process (see workers.py)
    assert WorkerRunner(NUM_WORKERS, mode="shard_map", devices=jax.devices()[:4]).in_flight_bound == CPU_MAX_IN_FLIGHT
    # not bounded: one device per process (the step runs on the caller's thread), or vmap
    assert WorkerRunner(NUM_WORKERS, mode="shard_map", devices=jax.devices()[:1]).in_flight_bound is None
    assert WorkerRunner(NUM_WORKERS, mode="vmap").in_flight_bound is None
    # traced into a caller's program (jit, scan, vmap) the bounded step is the plain step
    cpu4 = WorkerRunner(4, mode="shard_map", devices=jax.devices()[:4])
    step = cpu4.map(lambda a: a + jax.lax.psum(a, cpu4.axis_name))
    a = cpu4.put(np.arange(4.0, dtype=np.float32))
    scanned = jax.jit(lambda a: jax.lax.scan(lambda c, _: (step(c), None), a, None, length=2)[0])(a)
    np.testing.assert_array_equal(cpu4.get(scanned), cpu4.get(step(step(a))))
    # an explicit bound applies in any mode, and returns the step's results unchanged
    bounded = WorkerRunner(NUM_WORKERS, mode="vmap", max_in_flight=1)
    assert bounded.in_flight_bound == 1
    params, _ = run(bounded, diloco_tx(bounded.axis_name), STEPS, NUM_WORKERS)
    unbounded = WorkerRunner(NUM_WORKERS, mode="vmap")
    assert_same(params, run(unbounded, diloco_tx(unbounded.axis_name), STEPS, NUM_WORKERS)[0])


ONE_PROCESS_QUEUE = """
import jax, numpy as np
from jaxopt_lab.distributed import WorkerRunner
runner = WorkerRunner(4, mode="shard_map")
step = runner.map(lambda a: a + 1e-3 * jax.lax.psum(a, runner.axis_name))
a = runner.put(np.ones((4, 2), np.float32))
for _ in range(200):
    a = step(a)
print(runner.get(a)[0, 0])
"""


def test_one_process_many_queued_steps_finish():
    # the same deadlock in one process with 4 CPU devices (XLA's in-process rendezvous), PJRT_NPROC=1 as above
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PJRT_NPROC="1")
    proc = subprocess.Popen([sys.executable, "-c", ONE_PROCESS_QUEUE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out = proc.communicate(timeout=90)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("200 queued steps on 4 CPU devices did not finish in 90 s (killed):\n"
                    + proc.communicate()[0].decode()[-2000:])
    assert proc.returncode == 0, out[-3000:]
    np.testing.assert_allclose(float(out.split()[-1]), 1.004 ** 200, rtol=1e-4)  # each step: a <- a (1 + 4e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_workers=3, mode="shard_map"), r"num_workers=3 does not fit 8 devices"),
        (dict(num_workers=12, mode="shard_map"), r"num_workers=12 does not fit 8 devices"),
        (dict(num_workers=0), r"num_workers must be an int >= 1, got 0"),
        (dict(num_workers=4, mode="pmap"), r"mode must be one of .* got 'pmap'"),
        (dict(num_workers=4, max_in_flight=0), r"max_in_flight must be None or an int >= 1, got 0"),
    ],
)
def test_bad_worker_layouts_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorkerRunner(**kwargs)
