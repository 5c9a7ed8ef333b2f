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


def test_multiprocess_matches_vmap(vmap_params, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "params.npz")
    script = os.path.join(os.path.dirname(__file__), "multiprocess_diloco.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, script, str(port), str(pid), out], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for pid in range(2)
    ]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    with np.load(out) as saved:
        assert_same(dict(saved), vmap_params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_workers=3, mode="shard_map"), r"num_workers=3 does not fit 8 devices"),
        (dict(num_workers=12, mode="shard_map"), r"num_workers=12 does not fit 8 devices"),
        (dict(num_workers=0), r"num_workers must be an int >= 1, got 0"),
        (dict(num_workers=4, mode="pmap"), r"mode must be one of .* got 'pmap'"),
    ],
)
def test_bad_worker_layouts_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorkerRunner(**kwargs)
