"""One process of the multi-process DiLoCo check: python multiprocess_diloco.py PORT PID OUT [STEPS].

Two such processes, each with 4 CPU devices, form one 8-device mesh with
jax.distributed and run the shared DiLoCo problem in shard_map mode for STEPS
steps (default: test_workers.STEPS), dispatched without reading anything back
until the end, and process 0 saves the parameters to OUT.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.distributed.problem import run  # noqa: E402
from tests.distributed.test_workers import NUM_WORKERS, STEPS, diloco_tx  # noqa: E402

from jaxopt_lab.distributed import WorkerRunner  # noqa: E402

steps = int(sys.argv[4]) if len(sys.argv) > 4 else STEPS
runner = WorkerRunner(NUM_WORKERS, mode="shard_map")
assert len(runner.devices) == 8 and jax.process_count() == 2
params, _ = run(runner, diloco_tx(runner.axis_name), steps, NUM_WORKERS)
if pid == 0:
    np.savez(out, **params)
jax.distributed.shutdown()
