"""The worker runner: one per-worker step, run over W workers in any of three modes.

Methods are written for ONE worker with collectives over a named axis; the
runner decides how the W workers are laid out:

* ``"vmap"``: all workers on one device, ``jax.vmap(step, axis_name="workers")``
  (laptop, CI, notebooks, research sweeps);
* ``"shard_map"``: workers spread over a device ``Mesh`` with ``shard_map``;
  k = W / n_devices workers per device run as a vmap inside each device. The
  same mode spans several processes after ``jax.distributed.initialize()``,
  since the mesh is built from the global device list.

* ``"shard_map"`` with ``devices_per_worker = d > 1``: one worker spans d
  devices. The mesh is 2-D, ``("workers", "model")`` of shape (n/d, d); W must
  be a multiple of n/d (k = W·d/n workers per group of d devices). Every
  leaf of a worker's parameters and optimizer state is sharded over the d
  devices of its group (FSDP-style: along its largest axis that d divides, see
  :func:`fsdp_spec`; a model's flax nnx partitioning annotations instead where
  given, see :func:`nnx_partition_specs` and ``param_specs``), batches along
  their batch axis (:meth:`WorkerRunner.put` with ``batch_axis``). See
  "Workers that span devices" below.

Several processes (``jax.distributed.initialize()``, e.g. ``jaxopt-lab run
--coordinator ...``): every process builds the same runner over the global
devices and runs the same steps; :attr:`WorkerRunner.local_workers` lists the
workers whose devices this process addresses (a worker spanning devices of
several processes is listed by each), and :meth:`WorkerRunner.put_local` puts
those workers' host data (only theirs) onto the global worker-stacked array.
Tested with 2 processes x 4 CPU devices over gloo, workers inside one process
and workers spanning both (tests/distributed/test_multiprocess_workers.py).

Every argument and result of the mapped step carries a leading worker axis of
size W. Methods that synchronize every few steps run through :meth:`WorkerRunner.map_sync`,
which decides on the host whether a step synchronizes and calls one of two
compiled programs (see :mod:`jaxopt_lab.distributed.sync`). With k > 1 workers per device the collectives run over two names,
``("devices", "workers")``; build the methods with ``axis_name=runner.axis_name``.

Workers that span devices (``devices_per_worker > 1``)
------------------------------------------------------
The step runs as ``jax.jit(jax.vmap(step, axis_name="workers",
spmd_axis_name="workers"))`` over arrays placed with ``NamedSharding`` on the
2-D mesh, its results constrained to the same layout: the vmapped worker
dimension is partitioned over the mesh's ``"workers"`` axis, and everything
inside one worker (the FSDP all-gathers of the parameters, the reduction of
their gradients) is left to XLA's SPMD partitioner over ``"model"``. The
methods' collectives (``pmean``, ``psum``, ``ppermute``, ``all_gather``,
``axis_index`` over ``"workers"``) are vmap's batched collectives, which the
partitioner lowers to collectives across the worker groups only: the methods
run unchanged, and :attr:`WorkerRunner.axis_name` is ``"workers"`` for any k.
This is how DrJAX (github:google-research/drjax, used by MaxText's DiLoCo)
maps its per-worker functions. The other way the design allows, a
partial-manual ``shard_map`` over ``"workers"`` with ``"model"`` left automatic,
needs a vmap inside it and a ``("devices", "workers")`` pair of names when
k > 1; the vmap form keeps one name. A step that
does not synchronize (``map_sync``'s ``sync=-1`` program) has no collective
over ``"workers"``: its only collectives are inside each group (tested on
the compiled HLO's replica groups).

Bounded dispatch on CPU (why the mapped step sometimes waits)
-------------------------------------------------------------
On the CPU backend, with several local devices in a process, a loop that
dispatches many collective steps without reading anything back deadlocks
(JAX/jaxlib 0.10.2, 2 cores). Observed: 2 processes x 4 CPU devices (gloo), 60
or 200 queued DiLoCo steps hang at 0% CPU with no error, 30 finish; one process
with 4 or 8 CPU devices and 300 queued psum steps hangs the same way (XLA logs
"waiting for all reduce RendezvousKey ... may be stuck" after 20 s; the process
fails about a minute later); one device per process finishes 200. The cause, from gdb stack traces of both hung processes
and XLA's ``pjrt/cpu/cpu_client.cc``:

* the XLA CPU client runs a program on several local devices by scheduling one
  dispatch task per device on its client thread pool, of ``max(#cores, #local
  devices)`` threads (``PJRT_NPROC`` overrides #cores) -- 4 on a 2-core machine
  with 4 devices -- and runs the executions on the same pool;
* a dispatch task takes a slot of the device's in-flight semaphore (32 slots),
  *blocking its pool thread* while the device has 32 computations queued;
* a program with a collective needs all its local participants running at once
  (each waits in the all-reduce until every rank has joined).

So once a device has 32 steps queued, the next dispatch task holds one pool
thread waiting for a slot, the queued collective gets only 3 of the 4 threads it
needs, and no slot is ever freed. In the traces: process 0 has 3 pool threads in
``gloo::allreduce`` and the 4th in ``xla::Semaphore::Acquire`` under
``CpuPjRtRawLoadedExecutable::Execute``; process 1 has 4 threads in
``gloo::allreduce`` waiting for the missing rank; both main threads wait in
``PjitFunction::Call``. With one local device the dispatch runs on the caller's
thread, which is why that case does not hang. Checks: with ``PJRT_NPROC=8`` (8
pool threads) the 200 steps finish, and so they do when the loop waits on every
8th step; a queue bound of 16 finishes, of 40 hangs. (The hung processes ignore
SIGTERM because ``jax.distributed``'s preemption notifier catches it: kill them
with SIGKILL.)

So in that setting (``shard_map`` mode, CPU, more than one device of the mesh in
this process) the mapped step bounds its own queue: before dispatching a step it
waits until at most ``max_in_flight - 1`` earlier steps are unfinished (default
:data:`CPU_MAX_IN_FLIGHT`). It waits on a one-byte-per-device token the step
returns beside its results (the runner keeps it; the caller never sees it), so
the bound holds even when the caller donates or deletes the results. Other
programs the caller dispatches between steps take slots too: leave room (32
slots per device, shared by everything queued on it). ``max_in_flight`` may be
given explicitly in any mode (1: each step finishes before the next starts).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_lab._compat import shard_map
from jaxopt_lab.distributed.collectives import lax_collectives
from jaxopt_lab.distributed.sync import refresh_counters, static_decisions, sync_flags

MODES = ("vmap", "shard_map")
WORKER_AXIS = "workers"
MODEL_AXIS = "model"  # the mesh axis inside one worker (devices_per_worker > 1)

# Steps a mapped step lets run ahead on CPU with several local devices (see the module
# docstring): far below XLA's 32 in-flight computations per device, while still letting
# the host prepare the next step while one runs.
CPU_MAX_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class WorkerRunner:
    """Runs a step written for ONE worker over ``num_workers`` workers (see the module docstring).

    **The one rule: build every multi-worker method with** ``axis_name=runner.axis_name``.
    The runner names its worker axis ``"workers"`` under ``"vmap"`` and under
    ``"shard_map"`` with one worker per device, but ``("devices", "workers")``
    when several workers share a device. A method left at its default
    ``axis_name="workers"`` then still runs, but its collectives reduce over the
    workers of one device only: ``data_parallel`` averages gradients in pairs
    instead of over all W workers, with no error.

    Example (16 workers on 8 devices: 2 per device)::

        runner = WorkerRunner(16, "shard_map")
        tx = jaxopt_lab.diloco(optax.adamw(1e-3), optax.sgd(0.7, momentum=0.9, nesterov=True),
                               sync_every=10, axis_name=runner.axis_name)

        def step(params, opt_state, x, y):  # ONE worker's step, as without the runner
            grads = jax.grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        train_step = runner.map(step)  # jitted; every argument and result gains a leading axis of W
        params, opt_state = runner.put(runner.replicate((params, tx.init(params))))
        params, opt_state = train_step(params, opt_state, *runner.put((xs, ys)))  # xs: (W, batch, ...)

    Args:
      num_workers: W.
      mode: ``"vmap"`` or ``"shard_map"``.
      devices: devices for ``shard_map`` (default: all global devices, or the
        first W of them when W is smaller and there is one process).
      max_in_flight: most mapped steps queued or running at once (a step's
        dispatch first waits for the oldest). None: :data:`CPU_MAX_IN_FLIGHT` in
        ``shard_map`` mode on CPU with several of the mesh's devices in this
        process (where an unbounded queue deadlocks, see the module docstring),
        unbounded otherwise.
      devices_per_worker: d, the devices one worker spans (``shard_map`` mode
        only). d > 1: a 2-D mesh ``("workers", "model")`` of shape (n/d, d) over
        the n devices, each worker's state sharded over its d devices (see the
        module docstring); d must divide n and W must be a multiple of n/d (in
        one process W·d may also divide n: the first W·d devices are used).
      param_specs: with d > 1, one worker's parameters as a tree of
        ``PartitionSpec`` over ``"model"`` (e.g. :func:`nnx_partition_specs` of
        an annotated model). Every subtree of a placed or returned tree that has
        the parameters' tree structure (the parameters themselves, Adam's
        moments, DiLoCo's anchor, ...) is laid out by it; every other leaf by
        :func:`fsdp_spec`. None: :func:`fsdp_spec` everywhere.

    Example (8 devices, 4 workers of 2 devices each; DiLoCo across the workers,
    FSDP inside each)::

        runner = WorkerRunner(4, "shard_map", devices_per_worker=2)
        tx = jaxopt_lab.diloco(optax.adamw(1e-3), sync_every=10, axis_name=runner.axis_name)
        state = runner.put(runner.replicate((params, tx.init(params))))  # sharded (workers, model)
        xs, ys = runner.put((xs, ys), batch_axis=1)  # (W, batch, ...): each worker's batch over its devices
    """

    num_workers: int
    mode: str = "vmap"
    devices: Sequence[Any] | None = None
    max_in_flight: int | None = None
    devices_per_worker: int = 1
    param_specs: Any = None

    def __post_init__(self):
        w = self.num_workers
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {w!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        m = self.max_in_flight
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"max_in_flight must be None or an int >= 1, got {m!r}")
        d = self.devices_per_worker
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"devices_per_worker must be an int >= 1, got {d!r}")
        if d > 1 and self.mode != "shard_map":
            raise ValueError(f"devices_per_worker={d} needs mode='shard_map' (mode {self.mode!r} runs every "
                             f"worker on one device)")
        if self.param_specs is not None and d == 1:
            raise ValueError("param_specs lay a worker's parameters out over its devices: they need "
                             "devices_per_worker > 1")
        if d > 1:
            devices = list(self.devices) if self.devices is not None else jax.devices()
            n = len(devices)
            if n % d:
                raise ValueError(f"devices_per_worker={d} does not divide the {n} devices: a worker spans d "
                                 f"devices, so d must divide the device count")
            if self.devices is None and jax.process_count() == 1 and w * d < n and n % (w * d) == 0:
                devices = devices[: w * d]
            groups = len(devices) // d
            if w % groups:
                raise ValueError(
                    f"num_workers={w} does not fit {n} devices as groups of devices_per_worker={d}: "
                    f"it must be a multiple of the {groups} groups (or, in one process, W x d must divide "
                    f"the device count)"
                )
            object.__setattr__(self, "devices", tuple(devices))
        elif self.mode == "shard_map":
            devices = list(self.devices) if self.devices is not None else jax.devices()
            if w < len(devices) and self.devices is None and jax.process_count() == 1 and len(devices) % w == 0:
                devices = devices[:w]
            if w % len(devices):
                raise ValueError(
                    f"num_workers={w} does not fit {len(devices)} devices: in shard_map mode it must be "
                    f"a multiple of the device count (or divide it, in one process)"
                )
            object.__setattr__(self, "devices", tuple(devices))

    @property
    def spans_devices(self) -> bool:
        """Whether one worker spans several devices (``devices_per_worker > 1``)."""
        return self.devices_per_worker > 1

    @property
    def worker_groups(self) -> int:
        """Groups of ``devices_per_worker`` devices the workers are spread over (1 under vmap)."""
        return 1 if self.mode == "vmap" else len(self.devices) // self.devices_per_worker

    @property
    def workers_per_device(self) -> int:
        """Workers per device (d = 1), or per group of d devices (d > 1)."""
        return 1 if self.mode == "vmap" else self.num_workers // self.worker_groups

    @property
    def local_workers(self) -> list[int]:
        """The global indices (sorted) of the workers whose data this process must load.

        A worker is local when any device it runs on is addressable by this
        process: under ``vmap`` every worker (all run on this process's default
        device); in ``shard_map`` mode worker ``i`` runs on device group
        ``i // workers_per_device`` (devices ``g·d .. g·d + d - 1`` of
        :attr:`devices`), so with several processes each process holds only some
        workers, and a worker spanning devices of several processes is local to
        each of them (each loads its whole batch; :meth:`put_local` takes the
        slices its own devices hold). Pass the workers' host data, stacked in
        this order, to :meth:`put_local`.
        """
        if self.mode == "vmap":
            return list(range(self.num_workers))
        me, d, k = jax.process_index(), self.devices_per_worker, self.workers_per_device
        return [i for i in range(self.num_workers)
                if any(dev.process_index == me for dev in self.devices[(i // k) * d:(i // k + 1) * d])]

    @property
    def axis_name(self) -> str | tuple[str, str]:
        """The axis name(s) the methods' collectives must use under this runner."""
        if self.mode == "shard_map" and not self.spans_devices and self.workers_per_device > 1:
            return ("devices", "workers")
        return WORKER_AXIS

    @property
    def mesh(self) -> Mesh | None:
        if self.mode == "vmap":
            return None
        if self.spans_devices:
            grid = np.asarray(self.devices, dtype=object).reshape(self.worker_groups, self.devices_per_worker)
            return Mesh(grid, (WORKER_AXIS, MODEL_AXIS))
        name = "devices" if self.workers_per_device > 1 else "workers"
        return Mesh(np.asarray(self.devices), (name,))

    def specs(self, tree: Any, batch_axis: int | None = None) -> Any:
        """The ``PartitionSpec`` of each leaf of a worker-stacked ``tree`` (leading axis W) on :attr:`mesh`.

        d = 1: the worker axis only. d > 1: also one axis of each leaf over
        ``"model"``: ``batch_axis`` where given (and d divides it), else the
        parameters' layout for subtrees shaped like them (``param_specs``), else
        :func:`fsdp_spec`. Leaves are anything with a ``shape``.
        """
        if self.mode == "vmap":
            raise ValueError("specs: a vmap runner has no mesh")
        name = self.mesh.axis_names[0]
        d = self.devices_per_worker

        def default(x):
            shape = tuple(np.shape(x))
            if not self.spans_devices:
                return PartitionSpec(name)
            if batch_axis is not None:
                if not 1 <= batch_axis < len(shape):
                    raise ValueError(f"batch_axis={batch_axis} is not an axis after the worker axis of shape {shape}")
                inner = [None] * (len(shape) - 1)
                if shape[batch_axis] % d == 0:
                    inner[batch_axis - 1] = MODEL_AXIS
                return PartitionSpec(name, *inner)
            return PartitionSpec(name, *fsdp_spec(shape[1:], d))

        if self.param_specs is None or batch_axis is not None or not self.spans_devices:
            return jax.tree.map(default, tree)
        is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
        param_def = jax.tree.structure(self.param_specs, is_leaf=is_spec)
        param_leaves = jax.tree.leaves(self.param_specs, is_leaf=is_spec)

        def like_params(node):
            try:
                return jax.tree.structure(node) == param_def
            except Exception:  # noqa: BLE001 - not a pytree we can compare
                return False

        def place(node):
            if not like_params(node):
                return default(node)
            specs = []
            for x, spec in zip(jax.tree.leaves(node), param_leaves):
                shape = tuple(np.shape(x))
                specs.append(PartitionSpec(name, *_checked_spec(spec, shape[1:], d)))
            return jax.tree.unflatten(param_def, specs)

        return jax.tree.map(place, tree, is_leaf=like_params)

    def shardings(self, tree: Any, batch_axis: int | None = None) -> Any:
        """``NamedSharding`` of each leaf of a worker-stacked ``tree`` (see :meth:`specs`)."""
        mesh = self.mesh
        return jax.tree.map(lambda spec: NamedSharding(mesh, spec), self.specs(tree, batch_axis),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    @property
    def in_flight_bound(self) -> int | None:
        """The bound the mapped steps keep on their queue (None: unbounded); see ``max_in_flight``."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        if self.mode == "shard_map":
            local = [d for d in self.devices if d.process_index == jax.process_index()]
            if len(local) > 1 and any(d.platform == "cpu" for d in local):
                return CPU_MAX_IN_FLIGHT
        return None

    def map(self, step: Callable[..., Any], donate_argnums: int | Sequence[int] = ()) -> Callable[..., Any]:
        """Jit ``step`` (written for one worker) over the worker axis of its arguments.

        The result is called like ``step`` with worker-stacked arguments. Where
        :attr:`in_flight_bound` is set, calling it may first wait for the oldest
        queued step (see the module docstring). ``donate_argnums`` (as in
        ``jax.jit``) lets outputs reuse the buffers of those arguments, which the
        caller must not use again: state that a step passes through unchanged
        (DiLoCo's anchor and outer momentum between synchronizations) then costs
        no copy.

        With ``devices_per_worker > 1`` the arguments should be placed by
        :meth:`put` (the program takes their shardings); every result is laid
        out by :meth:`specs` (so the state stays sharded step after step).
        """
        bound = self.in_flight_bound
        if self.spans_devices:
            return self._map_spanning(step, donate_argnums, bound)
        if self.mode == "vmap":
            mapped = jax.vmap(step, axis_name="workers")
            if bound is None:
                return jax.jit(mapped, donate_argnums=donate_argnums)
            return _BoundedSteps(
                jax.jit(lambda *args: (mapped(*args), jnp.zeros((1,), jnp.int8)), donate_argnums=donate_argnums), bound
            )
        mesh = self.mesh
        spec = PartitionSpec(mesh.axis_names[0])
        if self.workers_per_device == 1:

            def per_device(*args):
                out = step(*jax.tree.map(lambda a: a[0], args))
                return jax.tree.map(lambda o: o[None], out)

        else:
            per_device = jax.vmap(step, axis_name="workers")
        if bound is None:
            return jax.jit(shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec), donate_argnums=donate_argnums)

        def with_token(*args):  # one byte per device, ready when this device's step is done
            return per_device(*args), jnp.zeros((1,), jnp.int8)

        jitted = jax.jit(shard_map(with_token, mesh=mesh, in_specs=spec, out_specs=spec), donate_argnums=donate_argnums)
        return _BoundedSteps(jitted, bound)

    def _map_spanning(self, step, donate_argnums, bound):
        """d > 1: vmap over the workers, partitioned over the mesh's worker axis; see the module docstring."""
        mesh = self.mesh
        mapped = jax.vmap(step, axis_name=WORKER_AXIS, spmd_axis_name=WORKER_AXIS)

        def program(*args):
            with lax_collectives():  # the worker axis is split over devices: one all-reduce, not slices
                out = mapped(*args)
            return jax.lax.with_sharding_constraint(out, self.shardings(out))

        if bound is None:
            return jax.jit(program, donate_argnums=donate_argnums)
        token_sharding = NamedSharding(mesh, PartitionSpec(WORKER_AXIS, MODEL_AXIS))

        def with_token(*args):  # one byte per device, ready when the step is done everywhere
            token = jnp.zeros((self.worker_groups, self.devices_per_worker), jnp.int8)
            return program(*args), jax.lax.with_sharding_constraint(token, token_sharding)

        return _BoundedSteps(jax.jit(with_token, donate_argnums=donate_argnums), bound)

    def map_sync(self, step: Callable[..., Any], donate_argnums: int | Sequence[int] = ()) -> "SyncedStep":
        """Like :meth:`map` for a ``step(*args, sync=...)`` that passes ``sync`` to a periodic transform.

        The result, called with the worker-stacked ``args``, reads the
        ``next_sync`` flags of the states among them on the host and runs the
        program compiled for that value (one per value: two for DiLoCo and
        local SGD, P + 1 for Streaming DiLoCo), so a step that does not
        synchronize has no collective across workers and no outer step. Pass
        ``sync=`` to the call to choose yourself. Arguments without flags: the
        in-graph decision (``sync=None``).

        Reading the flags waits for the previous step to finish. A loop that
        reads its metrics every step (the trainer) loses nothing by it; one
        that otherwise never waits keeps its dispatch asynchronous by passing
        ``sync=`` itself, from its own step counter. ``donate_argnums``: as in
        :meth:`map`.
        """
        return SyncedStep(self, step, donate_argnums)

    def put(self, tree: Any, batch_axis: int | None = None) -> Any:
        """Place a host tree whose leaves have a leading worker axis of size W.

        vmap: on the default device. shard_map: split over the mesh; in several
        processes each process passes the same full tree (e.g. generated from a
        seed) and contributes its own devices' slices. With ``devices_per_worker
        > 1`` each worker's slice is also sharded over its devices (see
        :meth:`specs`): parameters and optimizer state by their layout, or, for
        a batch, along ``batch_axis`` (an axis of the stacked array, after the
        worker axis), so each device computes on its part of its worker's batch.
        """
        if self.mode == "vmap":
            return jax.device_put(tree)
        for x in jax.tree.leaves(tree):
            if np.shape(x)[:1] != (self.num_workers,):
                raise ValueError(f"leading axis must be the {self.num_workers} workers, got shape {np.shape(x)}")

        def place(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(place, tree, self.shardings(tree, batch_axis))

    def put_local(self, tree: Any, batch_axis: int | None = None) -> Any:
        """Like :meth:`put`, from this process's workers' data only (see :attr:`local_workers`).

        Every leaf has a leading axis of ``len(local_workers)``: the host data of
        the workers :attr:`local_workers` lists, in that order. The result is the
        global worker-stacked array (leading axis W) that :meth:`put` of the full
        tree would give; each process contributes the slices its own devices hold
        (``jax.make_array_from_callback`` asks only for those), so no process
        needs, or loads, the data of another process's workers. In one process,
        or under ``vmap``, ``local_workers`` is every worker and this is :meth:`put`.
        """
        local = self.local_workers
        for x in jax.tree.leaves(tree):
            if np.shape(x)[:1] != (len(local),):
                raise ValueError(f"put_local: leading axis must be this process's {len(local)} local workers "
                                 f"({local}), got shape {np.shape(x)}")
        if self.mode == "vmap":
            return jax.device_put(tree)
        w = self.num_workers
        position = {worker: i for i, worker in enumerate(local)}
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((w,) + np.shape(x)[1:], np.asarray(x).dtype), tree)

        def place(x, sharding):
            x = np.asarray(x)

            def shard(index):
                rows = [position[i] for i in range(*index[0].indices(w))]  # local workers only, by construction
                block = x[rows[0]:rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1)) else x[rows]
                return block[(slice(None),) + tuple(index[1:])]

            return jax.make_array_from_callback((w,) + x.shape[1:], sharding, shard)

        return jax.tree.map(place, tree, self.shardings(shapes, batch_axis))

    def get(self, tree: Any) -> Any:
        """Bring a worker-stacked tree back to host numpy arrays (all processes get all of it)."""
        if self.mode == "vmap" or jax.process_count() == 1:
            return jax.tree.map(np.asarray, tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def replicate(self, tree: Any) -> Any:
        """Stack W copies of a single-worker tree (host side) along a new leading axis."""
        return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.num_workers,) + np.shape(x)).copy(), tree)


class SyncedStep:
    """A per-worker step compiled once per set of static decisions; see :meth:`WorkerRunner.map_sync`.

    ``step(*args, **decisions)`` receives ``sync`` (what a periodic method
    synchronizes) and ``refresh=False`` (no low-rank projector due) when the
    states in ``args`` call for them, and passes them on to ``tx.update``.
    """

    def __init__(self, runner: WorkerRunner, step: Callable[..., Any], donate_argnums: int | Sequence[int] = ()):
        self.runner, self.step, self.donate_argnums = runner, step, donate_argnums
        self._compiled: dict[tuple, Callable[..., Any]] = {}

    def program(self, **decisions: Any) -> Callable[..., Any]:
        """The jitted, mapped program for one set of static decisions (e.g. ``sync=-1``)."""
        key = tuple(sorted(decisions.items()))
        if key not in self._compiled:
            self._compiled[key] = self.runner.map(functools.partial(self.step, **decisions), self.donate_argnums)
        return self._compiled[key]

    def decisions(self, *args: Any) -> dict[str, Any]:
        """The static decisions of the next step, from the states in ``args`` (read on the host)."""
        flags, counters = sync_flags(args), refresh_counters(args)
        if not flags and not counters:
            return {}
        return static_decisions(*self.runner.get((flags, counters)))

    def __call__(self, *args: Any, **decisions: Any) -> Any:
        """Run the step; ``decisions`` given here replace those read from the states."""
        return self.program(**{**self.decisions(*args), **decisions})(*args)


class _BoundedSteps:
    """A jitted step returning ``(results, token)``, called so that at most ``bound`` calls are unfinished.

    Before each dispatch it blocks on the tokens of the oldest calls until fewer
    than ``bound`` remain; it returns the results only. Other attributes
    (``lower``, ...) are the jitted function's, whose outputs include the token.
    """

    def __init__(self, jitted: Callable[..., Any], bound: int):
        self._jitted = jitted
        self._bound = bound
        self._pending: collections.deque = collections.deque()

    def __call__(self, *args):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            return self._jitted(*args)[0]  # traced into a caller's program: nothing is dispatched here
        while len(self._pending) >= self._bound:
            self._pending.popleft().block_until_ready()
        results, token = self._jitted(*args)
        self._pending.append(token)
        return results

    def __getattr__(self, name):
        return getattr(self._jitted, name)


def fsdp_spec(shape: Sequence[int], d: int, axis: str = MODEL_AXIS) -> tuple[Any, ...]:
    """FSDP layout of one worker's leaf of ``shape`` over ``d`` devices: its largest axis that d divides.

    Ties go to the first such axis (an embedding (vocab, width) and a kernel
    (in, out) of equal sides shard their rows). Scalars, and leaves with no axis
    d divides, stay replicated over the worker's devices (they are small: biases,
    norms, counters; a large one is a sign to pick another d).
    """
    spec: list[Any] = [None] * len(shape)
    best = None
    for i, n in enumerate(shape):
        if n % d == 0 and n >= d and (best is None or n > shape[best]):
            best = i
    if best is not None and d > 1:
        spec[best] = axis
    return tuple(spec)


def _checked_spec(spec: Any, shape: Sequence[int], d: int) -> tuple[Any, ...]:
    """An annotated per-worker spec, padded to ``shape``'s rank, checked against d."""
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    if len(spec) != len(shape):
        raise ValueError(f"param_specs: spec {PartitionSpec(*spec)} has more axes than the leaf's shape {tuple(shape)}")
    for n, name in zip(shape, spec):
        names = name if isinstance(name, tuple) else (name,)
        if any(x not in (None, MODEL_AXIS) for x in names):
            raise ValueError(f"param_specs: spec {PartitionSpec(*spec)} names {name!r}; inside a worker the "
                             f"only mesh axis is {MODEL_AXIS!r} (map other names with nnx_partition_specs(rules=))")
        if MODEL_AXIS in names and n % d:
            raise ValueError(f"param_specs: axis of size {n} (shape {tuple(shape)}, spec {PartitionSpec(*spec)}) "
                             f"is not divisible by devices_per_worker={d}")
    return spec


def nnx_partition_specs(params: Any, rules: dict[str, Any] | None = None) -> Any:
    """One worker's ``PartitionSpec`` tree from a flax nnx model's partitioning annotations.

    ``params``: an ``nnx.State`` of the parameters (``nnx.split(model, nnx.Param, ...)[1]``)
    or the model. Each ``nnx.with_partitioning`` annotation names a mesh axis per
    array axis; ``"model"`` (the axis inside a worker) is kept, ``rules`` maps
    any other name (a logical name such as ``"embed"``, or another mesh's axis)
    to ``"model"`` or None. A name neither ``"model"`` nor in ``rules`` is an
    error naming it. Unannotated parameters get ``PartitionSpec()`` (replicated
    over the worker's devices), as flax reads them; leave ``param_specs`` unset
    for FSDP everywhere.

    Create an annotated model with ``nnx.use_eager_sharding(False)`` (or under a
    mesh) when it is built outside one.
    """
    from flax import nnx

    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    rules = dict(rules or {})
    specs = nnx.get_partition_spec(params)

    def translate(spec):
        out = []
        for name in tuple(spec):
            if name is None or name == MODEL_AXIS:
                out.append(name)
            elif isinstance(name, str) and name in rules:
                out.append(rules[name])
            else:
                raise ValueError(f"nnx_partition_specs: annotation axis {name!r} is neither {MODEL_AXIS!r} nor "
                                 f"in rules ({sorted(rules)}): say which mesh axis it is (rules={{{name!r}: "
                                 f"{MODEL_AXIS!r}}} or None)")
        return PartitionSpec(*out)

    return jax.tree.map(translate, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
