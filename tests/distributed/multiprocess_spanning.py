"""One process of the multi-process spanning-worker check: python multiprocess_spanning.py PORT PID OUT.

Two such processes, each with 4 CPU devices (gloo collectives), form one 8-device mesh with
jax.distributed and run DiLoCo (through ``map_sync``, donated state, as the trainer runs it)
in two layouts of 4 workers x 2 devices:

* ``inside``: the default device order, so each worker's 2 devices are in one process
  (process 0 holds workers 0, 1; process 1 workers 2, 3);
* ``spanning``: devices interleaved across the processes, so every worker spans both.

Each process puts only its own workers' batches (``runner.put_local`` of the rows
``runner.local_workers`` names) and writes OUT.PID.npz: the parameters after the run
(gathered from both processes) and its local workers.
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxopt_lab.distributed import WorkerRunner  # noqa: E402
from tests.distributed.test_spanning_workers import STEPS, init_params, loss, make_tx, worker_data  # noqa: E402

W, D = 4, 2


def layouts():
    devices = jax.devices()
    assert len(devices) == 8 and jax.process_count() == 2 and len(jax.local_devices()) == 4
    by_process = [[d for d in devices if d.process_index == p] for p in range(2)]
    interleaved = [d for pair in zip(*by_process) for d in pair]
    return {"inside": WorkerRunner(W, "shard_map", devices_per_worker=D),
            "spanning": WorkerRunner(W, "shard_map", devices=interleaved, devices_per_worker=D)}


def run(runner, steps=STEPS + 1):  # two synchronizations (3, 6) and a step past the second
    tx = make_tx("diloco", runner)

    def step(params, state, x, y, **decisions):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params, **decisions)
        return optax.apply_updates(params, updates), state

    state = runner.put(runner.replicate((init_params(), jax.tree.map(np.asarray, tx.init(init_params())))))
    local = runner.local_workers
    x, y = worker_data(W)  # generated from a seed; this process keeps only its workers' rows
    batch = runner.put_local((x[local], y[local]), batch_axis=1)
    train = runner.map_sync(step, donate_argnums=(0, 1))
    for _ in range(steps):
        state = train(*state, *batch)
    return runner.get(state[0])


saved = {}
for name, runner in layouts().items():
    saved[f"{name}/local_workers"] = np.asarray(runner.local_workers)
    for k, v in run(runner).items():
        saved[f"{name}/{k}"] = v
np.savez(f"{out}.{pid}.npz", **saved)
jax.distributed.shutdown()
