"""Workers across 2 processes x 4 CPU devices (jax.distributed, gloo): the vmap run's numbers.

Spawns multiprocess_spanning.py twice (see tests/distributed/spawn.py): DiLoCo with 4 workers
of 2 devices each, once with every worker inside one process and once with every worker
spanning both processes; each process puts only its own workers' batches
(``WorkerRunner.local_workers`` / ``put_local``). The parameters after the run (two
synchronizations and a step past the second) must equal the single-process vmap run's.
"""

import types

import jax
import numpy as np
import pytest

from jaxopt_lab.distributed import WorkerRunner
from tests.distributed import spawn
from tests.distributed.test_spanning_workers import STEPS, init_params, run, worker_data


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("spanning") / "out")
    port = spawn.free_port()
    spawn.run([spawn.python("multiprocess_spanning.py", port, pid, out) for pid in range(2)], timeout=240)
    saved = []
    for pid in range(2):
        with np.load(f"{out}.{pid}.npz") as f:
            saved.append(dict(f))
    return saved


@pytest.fixture(scope="module")
def vmap_params():
    return run(WorkerRunner(4, "vmap"), "diloco", steps=STEPS + 1)[0][0]  # as multiprocess_spanning.py


@pytest.mark.parametrize("layout", ["inside", "spanning"])
def test_two_processes_match_vmap(two_processes, vmap_params, layout):
    for saved in two_processes:  # both processes gathered the same parameters
        for k, expected in vmap_params.items():
            np.testing.assert_allclose(saved[f"{layout}/{k}"], expected, rtol=2e-5, atol=2e-6)
    assert np.abs(vmap_params["w2"] - init_params()["w2"]).max() > 1e-2  # training moved them
    assert np.ptp(vmap_params["w1"], axis=0).max() > 1e-4  # and the workers differ (one step past a sync)


def test_each_process_holds_only_its_workers(two_processes):
    # inside: process p's devices are 4p .. 4p+3, so workers 2p, 2p+1; spanning: every worker in both
    assert [list(s["inside/local_workers"]) for s in two_processes] == [[0, 1], [2, 3]]
    assert [list(s["spanning/local_workers"]) for s in two_processes] == [[0, 1, 2, 3]] * 2


def fake_devices(processes):
    return [types.SimpleNamespace(process_index=p, platform="cpu") for p in processes]


@pytest.mark.parametrize(
    "w, d, processes, expected",
    [
        (8, 1, [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3]),  # a worker per device
        (16, 1, [0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 4, 5, 8, 9, 12, 13]),  # 2 workers per device
        (4, 2, [0, 0, 1, 1, 1, 1, 0, 0], [0, 3]),  # each worker inside one process
        (2, 4, [1, 1, 0, 1, 1, 1, 1, 1], [0]),  # worker 0 spans both processes, worker 1 only process 1
        (4, 2, [1] * 8, []),  # a process with no device of the mesh loads nothing
    ],
)
def test_local_workers_follow_the_devices(w, d, processes, expected):
    # this process is process 0; the devices' owners are made up (the runner reads only process_index)
    runner = WorkerRunner(w, "shard_map", devices=fake_devices(processes), devices_per_worker=d)
    assert runner.local_workers == expected


def test_put_local_in_one_process_is_put():
    x, y = worker_data(4)
    for runner, batch_axis in [(WorkerRunner(4, "shard_map", devices_per_worker=2), 1),
                               (WorkerRunner(8, "shard_map", devices=jax.devices()[:4]), None),
                               (WorkerRunner(4, "vmap"), None)]:
        assert runner.local_workers == list(range(runner.num_workers))
        xs = np.concatenate([x, x])[: runner.num_workers]
        a, b = runner.put_local(xs, batch_axis=batch_axis), runner.put(xs, batch_axis=batch_axis)
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), xs)
    with pytest.raises(ValueError, match=r"put_local: leading axis must be this process's 4 local workers"):
        WorkerRunner(4, "shard_map", devices_per_worker=2).put_local(x[:2])
