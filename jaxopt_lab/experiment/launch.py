"""Start this process as one of several of a run: ``jax.distributed.initialize`` from flags or the cluster.

``jaxopt-lab run`` and ``resume`` call :func:`initialize` before anything touches a JAX
backend. Two ways to say that this process is one of several:

* explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` (all three; the
  coordinator is process 0's address, any free port);
* ``--distributed``: let JAX find them, from the cluster's environment (SLURM's ``srun``,
  Open MPI's ``mpirun``, a Cloud TPU pod slice's metadata, Kubernetes; see
  ``jax.distributed.initialize``), or from ``JAX_COORDINATOR_ADDRESS`` with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

Neither: a single-process run, nothing is initialized. Every process then builds the same
global mesh (``jax.devices()`` lists every process's devices), each loads only its own
workers' data (``WorkerRunner.local_workers``), all of them take part in each orbax
checkpoint, and only process 0 (:func:`is_primary`) writes the run's logs, summary and plots.

On CPU the processes' collectives go over gloo (``jax_cpu_collectives_implementation``).
``heartbeat_timeout``: seconds after which the coordination service declares a silent process
dead; the other processes then stop with an error naming it instead of waiting forever in a
collective (JAX's default: 100 s).
"""

from __future__ import annotations

import os
from typing import Any

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class LaunchError(ValueError):
    """Flags or environment that do not describe one process of a multi-process run."""


def add_flags(parser: Any) -> None:
    """The launch flags of ``jaxopt-lab run`` / ``resume``."""
    g = parser.add_argument_group("multi-process launch (one command per process; see README 'Multi-process / pod launch')")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="process 0's address and a free port: this process is one of --num-processes")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes of the run (with --coordinator)")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1 (with --coordinator)")
    g.add_argument("--distributed", action="store_true",
                   help="one of several processes, found from the environment: SLURM (srun), Open MPI, a Cloud TPU "
                        f"pod slice, or JAX_COORDINATOR_ADDRESS with {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}")
    g.add_argument("--heartbeat-timeout", type=int, default=None, metavar="SECONDS",
                   help="declare a process dead after this long without a heartbeat: the others stop with an error "
                        "(default: JAX's, 100 s)")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            distributed: bool = False) -> dict[str, Any] | None:
    """The arguments for ``jax.distributed.initialize`` (None: a single-process run); checked, no JAX call.

    Explicit values must come together (all three) unless ``distributed`` lets JAX detect the
    rest; ``num_processes`` 1 is a single-process run.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if not distributed and not any(v is not None for v in given.values()):
        return None
    if distributed:
        num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
        process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    else:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise LaunchError(f"{', '.join(missing)} missing: --coordinator, --num-processes and --process-id go "
                              "together (or --distributed to find them from the cluster's environment)")
    if coordinator is not None and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise LaunchError(f"--coordinator {coordinator!r} is not HOST:PORT")
    if num_processes is not None and num_processes < 1:
        raise LaunchError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise LaunchError(f"--process-id {process_id} is not in 0 .. {num_processes - 1} (--num-processes {num_processes})")
    if num_processes == 1 and not distributed:
        return None
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               distributed: bool = False, heartbeat_timeout: int | None = None) -> bool:
    """``jax.distributed.initialize`` if this process is one of several (see the module docstring).

    Must run before anything uses a JAX backend. Returns whether it initialized.
    """
    if heartbeat_timeout is not None and heartbeat_timeout < 1:
        raise LaunchError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_timeout}")
    kwargs = resolve(coordinator, num_processes, process_id, distributed)
    if kwargs is None:
        return False
    import jax

    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    if heartbeat_timeout is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise LaunchError(f"jax.distributed.initialize failed ({type(e).__name__}: {e}); pass --coordinator "
                          "HOST:PORT --num-processes N --process-id I, or run under SLURM/Open MPI/a TPU pod") from None
    return True


def from_args(args: Any) -> bool:
    """:func:`initialize` from parsed :func:`add_flags` flags."""
    return initialize(args.coordinator, args.num_processes, args.process_id, args.distributed, args.heartbeat_timeout)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; the only one in a single-process run)."""
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process got here (a no-op in a single-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
