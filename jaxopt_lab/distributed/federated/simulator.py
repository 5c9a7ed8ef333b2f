r"""A seeded, event-driven simulator of synchronous and asynchronous federated training.

Everything (the event queue, the RNG, the server and client versions, the
model each in-flight client was sent) lives in JAX arrays of
:class:`SimulatorState`, and many server steps run inside one compiled
``lax.scan``; so a run is a pure, jittable function of its state, checkpoints
with orbax and resumes bit-identically.

The model of time
-----------------
Client k has speed :math:`v_k` (:func:`~jaxopt_lab.distributed.federated.client_speeds`).
A client dispatched at time :math:`t` with :math:`Q` local steps returns at

.. math:: t + \text{latency} + Q \cdot \frac{\text{step\_time}}{v_k} \cdot e^{\sigma_j \xi}, \quad \xi \sim N(0, 1)

(``time_jitter`` :math:`= \sigma_j`, 0 by default). With probability
``dropout[k]`` a dispatch never returns: the server keeps its slot until the
result was due, then frees it and applies nothing.

The event queue
---------------
``concurrency`` fixed *slots* hold the in-flight clients (client id, dispatch
version and time, arrival time, local steps, dropped flag). A server step pops
arrivals in time order (ties: lowest slot) until its trigger fires
(:mod:`.triggers`): all of a round back (``SyncRound``), K updates
(``Buffer``), the end of a time window (``TimeWindow``), a group complete
(``Compass``). The *staleness* of an arrival is the number of server updates
applied since its dispatch. Clients are sampled uniformly among the idle ones.

Local training
--------------
``local_update(params, client_id, num_steps, key) -> params`` is the user's
pure function. Its result depends only on the model the client was sent, its
id, its step count and its key (a uint32 PRNG key derived from the seed and
the dispatch's id), and arrival times do not depend on it; so the simulator
trains a client when its result is *consumed*, which equals training it at
dispatch. All arrivals of one server step are trained as ONE ``vmap``-ed batch
of ``capacity`` lanes (``m``, ``K`` or ``concurrency``), each lane starting
from the model its client was sent (the server keeps one copy per in-flight
slot): in a ``SyncRound`` that is exactly the m clients dispatched from one
version, under ``Buffer(K)`` the K arrivals, whatever versions they started
from. No Python loop runs per client or per step, and a dropped client's lane
runs zero local steps.

The training lanes are sorted by local step count and vmapped in a few groups
(``lane_groups``), so that a client with one step does not pay for the
three-step client's loop (one local epoch of a Dirichlet split has a long tail
of step counts).

Randomness
----------
Client choice, compute-time jitter and dropout are counter-based hashes of
``(seed, stream, counter)`` (the dispatch id, the server step), not
``jax.random`` calls: nothing random is carried, a restored state continues
the same streams, and threefry's XLA compile cost stays out of the scan.

The server step
---------------
The pseudo-gradients of the arrivals, stacked along a leading axis of size
``capacity`` (masked), go to the server rule, an
``optax.GradientTransformationExtraArgs`` called as

.. code-block:: python

   update, rule_state = rule.update(
       stacked_pseudo_gradients, rule_state, params,
       mask=..., num_examples=..., staleness=..., elapsed_time=..., client_ids=..., local_steps=...)
   params = optax.apply_updates(params, update)

with ``pseudo_gradient="dispatch"``: :math:`\theta_{\text{sent}} - \theta_\text{client}`
(FedAvg, FedBuff, DiLoCo-style outer steps) or ``"current"``:
:math:`\theta_\text{server} - \theta_\text{client}` (FedAsync's mixing). A step
with no arrival leaves params, rule state and version unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.distributed.federated._checks import (
    check_int,
    check_per_client,
    check_positive,
    check_real,
)
from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated.speeds import client_speeds
from jaxopt_lab.distributed.federated.triggers import Buffer, Compass, SyncRound, TimeWindow

PSEUDO_GRADIENTS = ("dispatch", "current")
_INF = float("inf")

# tags of the independent random streams (see _rng)
_TAG_TRAIN, _TAG_DISPATCH, _TAG_SELECT_STEP, _TAG_SELECT_EVENT = 0, 1, 2, 3


class SlotTable(NamedTuple):
    """The in-flight clients, one row per concurrency slot (the event queue)."""

    client: jax.Array  # int32 (C,); -1: empty
    version: jax.Array  # int32 (C,): server version the client was sent
    dispatch_id: jax.Array  # int32 (C,): global dispatch counter (keys its randomness)
    dispatch_time: jax.Array  # float32 (C,)
    arrival_time: jax.Array  # float32 (C,); +inf: empty
    steps: jax.Array  # int32 (C,): local steps assigned
    dropped: jax.Array  # bool (C,): never returns
    group: jax.Array  # int32 (C,): FedCompass group, -1 none


class SimulatorState(NamedTuple):
    """Everything a simulation carries; a pytree of arrays (orbax-checkpointable)."""

    params: Any  # server model
    rule_state: Any  # server rule (optax) state
    version: jax.Array  # int32: server updates applied
    step: jax.Array  # int32: server steps taken (including ones with no arrival)
    time: jax.Array  # float32: simulated wall-clock (seconds; float32, ~7 significant digits)
    key: jax.Array  # uint32 (2,): root of every random stream (streams are keyed by counters)
    dispatched: jax.Array  # int32: dispatches so far (the next dispatch id)
    applied: jax.Array  # int32: client updates applied so far
    dropped: jax.Array  # int32: dropped dispatches timed out so far
    slots: SlotTable
    slot_params: Any  # params with leading axis C: the model each in-flight client was sent; () for SyncRound
    busy: jax.Array  # bool (N,): client in flight
    step_time_est: jax.Array  # float32 (N,): FedCompass's observed time per local step (NaN: unknown)
    group_deadline: jax.Array  # float32 (C,): FedCompass group deadlines
    slot_context: Any = ()  # client_context(rule_state) each in-flight client was sent (leading axis C); ()
    # without client_context or under SyncRound


class StepRecord(NamedTuple):
    """What one server step did; ``run`` returns these stacked over steps.

    Per-arrival fields have the trigger's capacity as last axis, in arrival
    order, padded (``mask`` False, ``client`` -1).
    """

    version: jax.Array  # int32: server version after the step
    time: jax.Array  # float32: simulated clock at the step
    num_arrivals: jax.Array  # int32: client updates consumed
    num_dropped: jax.Array  # int32: dropped clients timed out during the step
    num_events: jax.Array  # int32: arrivals + timeouts processed
    applied: jax.Array  # bool: the server model changed
    client: jax.Array  # int32 (L,)
    staleness: jax.Array  # int32 (L,): server updates between dispatch and this step
    dispatch_time: jax.Array  # float32 (L,)
    arrival_time: jax.Array  # float32 (L,)
    local_steps: jax.Array  # int32 (L,)
    dispatch_id: jax.Array  # int32 (L,)
    mask: jax.Array  # bool (L,)
    metrics: dict  # eval_fn's scalars after the step (NaN where not evaluated)


class _Lanes(NamedTuple):
    """The arrivals one server step consumes (the training lanes)."""

    client: jax.Array
    version: jax.Array
    dispatch_id: jax.Array
    dispatch_time: jax.Array
    arrival_time: jax.Array
    steps: jax.Array
    slot: jax.Array  # slot it occupied
    current: jax.Array  # dispatched during this step (was sent the current params)
    mask: jax.Array


def _tree_where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def _rows_where(mask, rows, tree):
    """Per leaf: ``where(mask[i], rows[i], tree[i])`` along the leading axis."""
    return jax.tree.map(lambda r, t: jnp.where(mask.reshape((-1,) + (1,) * (t.ndim - 1)), r, t), rows, tree)


def _as_key(seed) -> jax.Array:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seed = check_int("seed", int(seed), 0)  # the key data of jax.random.PRNGKey(seed), without a compile
        return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)
    key = jnp.asarray(seed)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"seed must be a non-negative int or a PRNG key, got {seed!r}")
    return key


def _lane_groups(capacity: int, spec) -> tuple:
    if spec is None:
        if capacity < 8:  # each group is one more copy of the training loop to compile
            return (capacity,)
        # sizes ~20/30/50%: on one local epoch of a Dirichlet(0.3) digits split this computes
        # ~14.8 lane-steps per 10-client round instead of 22.5 (13.5 are useful)
        a, b = max(1, round(0.2 * capacity)), max(1, round(0.3 * capacity))
        return (a, b, capacity - a - b)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        k = check_int("lane_groups", int(spec), 1)
        if k > capacity:
            raise ValueError(f"lane_groups ({k}) must be <= the number of lanes ({capacity})")
        return tuple(len(g) for g in np.array_split(np.arange(capacity), k))
    sizes = tuple(check_int("lane_groups size", g, 1) for g in spec)
    if not sizes or min(sizes) < 1 or sum(sizes) != capacity:
        raise ValueError(f"lane_groups sizes must be >= 1 and sum to the number of lanes ({capacity}), got {sizes}")
    return sizes


@dataclasses.dataclass(frozen=True)
class _Config:
    num_clients: int
    concurrency: int  # slots C
    capacity: int  # lanes L
    mode: str  # "sync" | "buffer" | "window" | "compass"
    buffer_size: int
    period: float
    q_min: int
    q_max: int
    pseudo_gradient: str
    lane_groups: tuple
    max_events: int
    time_jitter: float
    latency: float
    step_time: float


class FederatedSimulator:
    """Event-driven federated simulation: clients of different speeds, a server rule, a trigger.

    Args:
      local_update: ``(params, client_id, num_steps, key) -> params``, pure and
        vmappable (e.g. :func:`~jaxopt_lab.distributed.federated.make_local_update`).
      rule: the server rule, an optax transform over stacked pseudo-gradients
        (``fedavg()``, ``fedbuff()``, ``optax.chain(scale_by_fedavg(), optax.adam(1e-2))``, ...).
      trigger: ``SyncRound(m)``, ``Buffer(K)``, ``every_arrival()``, ``TimeWindow(dt)`` or
        ``Compass(q_min, q_max)``.
      num_clients: N.
      concurrency: clients in flight at once (asynchronous triggers; default N;
        ``>= K`` for ``Buffer(K)``). ``SyncRound(m)`` has m.
      num_examples: per-client example counts (scalar or length N; default 1),
        passed to the rule for weighting.
      local_steps: local steps per dispatch, one int or one per client (e.g.
        :func:`~jaxopt_lab.distributed.federated.epoch_steps`); ``Compass`` sets them itself.
      speeds: ``"homogeneous"``, ``"lognormal"`` or N positive speeds.
      speed_sigma, max_speed_spread, speed_seed: the log-normal draw (see ``client_speeds``).
      step_time: simulated seconds per local step at speed 1.
      latency: simulated seconds added to every round trip.
      time_jitter: log-normal sigma of a per-dispatch factor on the compute time (0: none).
      dropout: probability that a dispatch never returns (scalar or per client, in [0, 1]).
      pseudo_gradient: ``"dispatch"`` (:math:`\\theta_\\text{sent} - \\theta_\\text{client}`) or
        ``"current"`` (:math:`\\theta_\\text{server} - \\theta_\\text{client}`, FedAsync).
      max_events_per_step: a server step stops after this many arrivals/timeouts
        even if its trigger has not fired (guards against all clients dropping);
        default ``100 * (concurrency + capacity)``.
      lane_groups: how the ``capacity`` training lanes of a server step are split
        into separately vmapped groups, after sorting them by local step count
        (most first): a vmapped loop runs to the largest step count of its
        group, so grouping spares the short clients the long ones' steps. An
        int (that many near-equal groups; 1: no split) or explicit sizes summing
        to ``capacity``; default: one group below 8 lanes, else three of about
        20/30/50% of the lanes. Results do not depend on it (up to float
        rounding of the batched matmuls).
      client_context: optional ``rule_state -> pytree``: server-side state sent to each client
        together with the model (e.g. a control variate, :func:`~jaxopt_lab.distributed.federated.fedamd_context`).
        With it, ``local_update(params, client_id, num_steps, key, context) -> (params, aux)``:
        ``context`` is the value at the client's dispatch (the server keeps one copy per in-flight
        slot under asynchronous triggers) and ``aux`` (any pytree) reaches the rule stacked over the
        lanes, in arrival order, as the extra argument ``client_aux``. Rules that do not read
        ``client_aux`` ignore it.
      compiler_options: XLA options for the compiled ``run`` and ``init``
        (``jax.jit(..., compiler_options=...)``); e.g.
        ``{"xla_backend_optimization_level": 0}`` compiles about a third faster
        on CPU, for short runs and tests.

    Example: see the package docstring (:mod:`jaxopt_lab.distributed.federated`).
    """

    def __init__(
        self,
        local_update: Callable,
        rule: optax.GradientTransformation,
        trigger,
        *,
        num_clients: int,
        concurrency: int | None = None,
        num_examples: float | Sequence[float] | None = None,
        local_steps: int | Sequence[int] = 1,
        speeds: str | Sequence[float] = "homogeneous",
        speed_sigma: float = 1.0,
        max_speed_spread: float = 10.0,
        speed_seed: int = 0,
        step_time: float = 1.0,
        latency: float = 0.0,
        time_jitter: float = 0.0,
        dropout: float | Sequence[float] = 0.0,
        pseudo_gradient: str = "dispatch",
        max_events_per_step: int | None = None,
        lane_groups: int | Sequence[int] | None = None,
        compiler_options: dict[str, Any] | None = None,
        client_context: Callable | None = None,
    ):
        if not callable(local_update):
            raise ValueError(f"local_update must be a function (params, client_id, num_steps, key) -> params, got {local_update!r}")
        if not (hasattr(rule, "init") and hasattr(rule, "update")):
            raise ValueError(f"rule must be an optax GradientTransformation, got {rule!r}")
        n = check_int("num_clients", num_clients, 1)
        if isinstance(trigger, SyncRound):
            m = trigger.clients_per_round
            if m > n:
                raise ValueError(f"clients_per_round ({m}) must be <= num_clients ({n})")
            if concurrency is not None and concurrency != m:
                raise ValueError(f"SyncRound({m}) keeps m = {m} clients in flight; concurrency={concurrency!r} conflicts")
            mode, c, cap = "sync", m, m
        elif isinstance(trigger, (Buffer, TimeWindow, Compass)):
            c = n if concurrency is None else check_int("concurrency", concurrency, 1)
            if c > n:
                raise ValueError(f"concurrency ({c}) must be <= num_clients ({n})")
            if isinstance(trigger, Buffer):
                if c < trigger.size:
                    raise ValueError(f"concurrency ({c}) must be >= the buffer size K ({trigger.size})")
                mode, cap = "buffer", trigger.size
            else:
                mode, cap = ("window" if isinstance(trigger, TimeWindow) else "compass"), c
        else:
            raise ValueError(f"trigger must be SyncRound, Buffer, TimeWindow or Compass, got {trigger!r}")
        if isinstance(trigger, Compass) and not (isinstance(local_steps, int) and local_steps == 1):
            raise ValueError("Compass sets the local step counts itself; do not pass local_steps")
        if pseudo_gradient not in PSEUDO_GRADIENTS:
            raise ValueError(f"pseudo_gradient must be one of {PSEUDO_GRADIENTS}, got {pseudo_gradient!r}")
        self.num_examples = check_per_client("num_examples", 1.0 if num_examples is None else num_examples, n, minimum=0)
        self.local_steps = check_per_client("local_steps", local_steps, n, integer=True, minimum=0)
        self.dropout = check_per_client("dropout probability", dropout, n, minimum=0, maximum=1)
        self.speeds = client_speeds(n, speeds, sigma=speed_sigma, max_spread=max_speed_spread, seed=speed_seed)
        step_time = check_positive("step_time", step_time)
        latency = check_real("latency", latency)
        if latency < 0:
            raise ValueError(f"latency must be >= 0, got {latency}")
        time_jitter = check_real("time_jitter", time_jitter)
        if time_jitter < 0:
            raise ValueError(f"time_jitter must be >= 0, got {time_jitter}")
        max_events = 100 * (c + cap) if max_events_per_step is None else check_int("max_events_per_step", max_events_per_step, 1)
        groups = _lane_groups(cap, lane_groups)
        self.trigger = trigger
        self.rule = optax.with_extra_args_support(rule)
        self.local_update = local_update
        self.cfg = _Config(
            num_clients=n, concurrency=c, capacity=cap, mode=mode,
            buffer_size=getattr(trigger, "size", 0), period=float(getattr(trigger, "period", 0.0)),
            q_min=getattr(trigger, "q_min", 0), q_max=getattr(trigger, "q_max", 0),
            pseudo_gradient=pseudo_gradient, lane_groups=groups, max_events=max_events, time_jitter=time_jitter,
            latency=latency, step_time=step_time,
        )
        if client_context is not None and not callable(client_context):
            raise ValueError(f"client_context must be a function rule_state -> pytree, or None, got {client_context!r}")
        self.client_context = client_context
        if compiler_options is not None and not isinstance(compiler_options, dict):
            raise ValueError(f"compiler_options must be a dict or None, got {compiler_options!r}")
        self._run = jax.jit(self._run_impl, static_argnums=(1, 2, 3), compiler_options=compiler_options)
        self._init = jax.jit(self._init_impl, compiler_options=compiler_options)

    # ------------------------------------------------------------------ public

    @property
    def capacity(self) -> int:
        """Arrivals one server step can consume: the leading size of the rule's input."""
        return self.cfg.capacity

    def init(self, params, seed: int | jax.Array = 0) -> SimulatorState:
        """The state at time 0: server ``params`` (version 0), nothing in flight yet.

        Args:
          params: the initial server model (any pytree of float arrays).
          seed: non-negative int or PRNG key; the whole run's randomness derives from it.
        """
        return self._init(params, _as_key(seed))

    def _init_impl(self, params, key):
        cfg = self.cfg
        c, n = cfg.concurrency, cfg.num_clients
        i32 = lambda v, shape=(): jnp.full(shape, v, jnp.int32)  # noqa: E731
        slots = SlotTable(
            client=i32(-1, (c,)), version=i32(0, (c,)), dispatch_id=i32(0, (c,)),
            dispatch_time=jnp.zeros((c,), jnp.float32), arrival_time=jnp.full((c,), _INF, jnp.float32),
            steps=i32(0, (c,)), dropped=jnp.zeros((c,), bool), group=i32(-1, (c,)),
        )
        slot_params = () if cfg.mode == "sync" else jax.tree.map(lambda p: jnp.broadcast_to(p, (c,) + p.shape), params)
        rule_state = self.rule.init(params)
        slot_context = ()
        if self.client_context is not None and cfg.mode != "sync":
            slot_context = jax.tree.map(lambda x: jnp.broadcast_to(x, (c,) + jnp.shape(x)),
                                        self.client_context(rule_state))
        return SimulatorState(
            params=params, rule_state=rule_state, version=i32(0), step=i32(0),
            time=jnp.zeros((), jnp.float32), key=key, dispatched=i32(0), applied=i32(0),
            dropped=i32(0), slots=slots, slot_params=slot_params, busy=jnp.zeros((n,), bool),
            step_time_est=jnp.full((n,), jnp.nan, jnp.float32), group_deadline=jnp.full((c,), _INF, jnp.float32),
            slot_context=slot_context,
        )

    def run(self, state: SimulatorState, num_steps: int, eval_fn: Callable | None = None,
            eval_every: int = 1) -> tuple[SimulatorState, StepRecord]:
        """Runs ``num_steps`` server steps in one compiled ``lax.scan``.

        Args:
          state: from :meth:`init` or a previous ``run`` (or a restored checkpoint).
          num_steps: server steps (static: each distinct value compiles once).
          eval_fn: optional ``params -> dict of scalars``, evaluated after every
            ``eval_every``-th server step (counted by ``state.step``, so a run
            continued from a returned state keeps the same period) inside the scan.
          eval_every: evaluation period in server steps.

        Returns:
          ``(state, records)``: the state after the last step, and a
          :class:`StepRecord` whose every field has a leading axis of
          ``num_steps`` (one entry per server step: ``records.time[i]`` is the
          simulated clock after step i, ``records.staleness[i]`` its arrivals'
          staleness). The evaluations are in ``records.metrics``: a dict with
          ``eval_fn``'s keys, each a float32 array of shape ``(num_steps,)``
          holding the value after the steps that were evaluated and **NaN at
          every other step**; select the evaluated steps with ``~np.isnan``.
          Without ``eval_fn``, ``records.metrics`` is ``{}``.

        Example::

            state, records = sim.run(sim.init(params, seed=0), num_steps=100,
                                     eval_fn=lambda p: {"accuracy": accuracy(p)}, eval_every=10)
            acc = np.asarray(records.metrics["accuracy"])
            evaluated = ~np.isnan(acc)                    # steps 10, 20, ..., 100
            curve = np.asarray(records.time)[evaluated], acc[evaluated]  # accuracy vs sim clock
        """
        num_steps = check_int("num_steps", num_steps, 1)
        eval_every = check_int("eval_every", eval_every, 1)
        return self._run(state, num_steps, eval_fn, eval_every)

    # ------------------------------------------------------------- internals

    def _run_impl(self, state, num_steps, eval_fn, eval_every):
        if eval_fn is None:
            template = {}
        else:
            template = jax.eval_shape(eval_fn, state.params)
            if not isinstance(template, dict):
                raise ValueError(f"eval_fn must return a dict of scalars, got {type(template).__name__}")

        def body(s, _):
            s, rec = self._step(s)
            if eval_fn is None:
                metrics = {}
            else:
                nan = jax.tree.map(lambda t: jnp.full(t.shape, jnp.nan, jnp.float32), template)
                metrics = jax.lax.cond(
                    s.step % eval_every == 0,
                    lambda p: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), eval_fn(p)),
                    lambda p: nan,
                    s.params,
                )
            return s, rec._replace(metrics=metrics)

        return jax.lax.scan(body, state, None, length=num_steps)

    def _constants(self):
        cfg = self.cfg
        return dict(
            steps=jnp.asarray(self.local_steps, jnp.int32),
            step_time=jnp.asarray(cfg.step_time / self.speeds, jnp.float32),
            dropout=jnp.asarray(self.dropout, jnp.float32),
            examples=jnp.asarray(self.num_examples, jnp.float32),
        )

    def _dispatch_draws(self, key, dispatch_id, client, steps, k):
        """Arrival delay and dropped flag of one dispatch (randomness keyed by its dispatch id)."""
        cfg = self.cfg
        delay = steps.astype(jnp.float32) * k["step_time"][client]
        if cfg.time_jitter > 0:
            delay = delay * jnp.exp(cfg.time_jitter * _rng.normal(key, _TAG_DISPATCH, dispatch_id, 0))
        delay = delay + jnp.float32(cfg.latency)
        dropped = _rng.uniform(key, _TAG_DISPATCH, dispatch_id, 1) < k["dropout"][client]
        return delay, dropped

    def _select_scores(self, key, tag, counter, busy):
        """Random scores, idle clients below busy ones: the argsort/argmin picks idle clients uniformly."""
        return _rng.uniform(key, tag, counter, size=self.cfg.num_clients) + 2.0 * busy

    # -- synchronous rounds

    def _step(self, state: SimulatorState):
        if self.cfg.mode == "sync":
            return self._sync_step(state)
        return self._async_step(state)

    def _sync_step(self, state):
        cfg, k = self.cfg, self._constants()
        m = cfg.concurrency
        client = jax.lax.top_k(-self._select_scores(state.key, _TAG_SELECT_STEP, state.step, state.busy), m)[1]
        client = client.astype(jnp.int32)
        did = state.dispatched + jnp.arange(m, dtype=jnp.int32)
        steps = k["steps"][client]
        delay, dropped = jax.vmap(lambda d, c, q: self._dispatch_draws(state.key, d, c, q, k))(did, client, steps)
        arrival = state.time + delay
        by_time = jnp.argsort(arrival, stable=True)  # records in arrival order
        lanes = _Lanes(
            client=client[by_time], version=jnp.full((m,), state.version), dispatch_id=did[by_time],
            dispatch_time=jnp.full((m,), state.time), arrival_time=arrival[by_time], steps=steps[by_time],
            slot=jnp.arange(m, dtype=jnp.int32), current=jnp.ones((m,), bool), mask=~dropped[by_time],
        )
        n_arr = lanes.mask.sum().astype(jnp.int32)
        n_drop = (m - n_arr).astype(jnp.int32)
        new_time = jnp.max(arrival)
        params, rule_state, version, applied = self._server_update(state, lanes, new_time, shared_base=True, k=k)
        state = state._replace(
            params=params, rule_state=rule_state, version=version, step=state.step + 1, time=new_time,
            dispatched=state.dispatched + m, applied=state.applied + n_arr, dropped=state.dropped + n_drop,
        )
        return state, self._record(state, lanes, n_arr, n_drop, jnp.int32(m), applied)

    # -- asynchronous triggers

    def _refill(self, parts, mask, t, version, tag, counter, key, k):
        """Dispatch idle clients, sampled uniformly, into the slots in ``mask`` at time ``t``.

        ``parts = (slots, busy, dispatched, fresh)``; returns the same, updated.
        """
        cfg = self.cfg
        slots, busy, dispatched, fresh = parts
        rank = (jnp.cumsum(mask) - 1).astype(jnp.int32)
        c = cfg.concurrency  # at most C slots to fill, and at least C idle clients exist
        order = jax.lax.top_k(-self._select_scores(key, tag, counter, busy), c)[1].astype(jnp.int32)
        client = jnp.where(mask, order[jnp.clip(rank, 0, c - 1)], slots.client)
        did = jnp.where(mask, dispatched + rank, slots.dispatch_id)
        steps = k["steps"][client]
        delay, dropped = jax.vmap(lambda d, c, q: self._dispatch_draws(key, d, c, q, k))(did, client, steps)
        slots = SlotTable(
            client=client,
            version=jnp.where(mask, version, slots.version),
            dispatch_id=did,
            dispatch_time=jnp.where(mask, t, slots.dispatch_time),
            arrival_time=jnp.where(mask, t + delay, slots.arrival_time),
            steps=jnp.where(mask, steps, slots.steps),
            dropped=jnp.where(mask, dropped, slots.dropped),
            group=slots.group,
        )
        busy = busy.at[jnp.where(mask, client, cfg.num_clients)].set(True, mode="drop")
        return slots, busy, dispatched + mask.sum().astype(jnp.int32), fresh | mask

    def _refill_all(self, state, k):
        """Dispatch into every free slot at the current time and version (start of a server step)."""
        free = state.slots.client < 0
        fresh = jnp.zeros_like(free)
        if self.cfg.mode == "compass":
            n_free = free.sum().astype(jnp.int32)
            rank = (jnp.cumsum(free) - 1).astype(jnp.int32)
            c = self.cfg.concurrency
            order = jax.lax.top_k(-self._select_scores(state.key, _TAG_SELECT_STEP, state.step, state.busy), c)[1]
            client = jnp.where(free, order[jnp.clip(rank, 0, c - 1)].astype(jnp.int32), -1)
            did = state.dispatched + rank
            busy = state.busy.at[jnp.where(free, client, self.cfg.num_clients)].set(True, mode="drop")
            state = state._replace(busy=busy, dispatched=state.dispatched + n_free)
            return self._compass_refill(state, free, client, did, k)
        slots, busy, dispatched, fresh = self._refill(
            (state.slots, state.busy, state.dispatched, fresh), free, state.time, state.version,
            _TAG_SELECT_STEP, state.step, state.key, k)
        return state._replace(slots=slots, busy=busy, dispatched=dispatched), fresh

    def _compass_refill(self, state, free, client, did, k):
        """FedCompass: assign each newly dispatched client (fastest estimate first, as the official
        scheduler does: a fast client opening a group leaves the slow ones room to join it) a group and step count."""
        cfg = self.cfg
        c = cfg.concurrency
        nominal = jnp.float32(cfg.step_time)
        est_all = jnp.where(jnp.isnan(state.step_time_est), nominal, state.step_time_est)
        est = est_all[client]
        order = jnp.argsort(jnp.where(free, est, jnp.inf)).astype(jnp.int32)  # free slots, fastest first
        t = state.time

        def assign(i, carry):
            slots, deadline = carry
            s = order[i]  # i < number of free slots, so s is a free slot
            e = est[s]
            in_flight = slots.client >= 0
            active = jnp.any((slots.group[None, :] == jnp.arange(c)[:, None]) & in_flight[None, :], axis=1)
            q = jnp.floor((deadline - t) / e)
            valid = active & (deadline > t) & (q >= cfg.q_min) & (q <= cfg.q_max)
            best = jnp.argmax(jnp.where(valid, q, -1.0)).astype(jnp.int32)
            join = jnp.any(valid)
            new_group = jnp.argmin(active).astype(jnp.int32)  # an unused group id (C ids suffice)
            group = jnp.where(join, best, new_group)
            steps = jnp.where(join, q[best], cfg.q_max).astype(jnp.int32)
            deadline = jnp.where(join, deadline, deadline.at[new_group].set(t + cfg.q_max * e))
            delay, dropped = self._dispatch_draws(state.key, did[s], client[s], steps, k)
            slots = slots._replace(
                client=slots.client.at[s].set(client[s]),
                version=slots.version.at[s].set(state.version),
                dispatch_id=slots.dispatch_id.at[s].set(did[s]),
                dispatch_time=slots.dispatch_time.at[s].set(t),
                arrival_time=slots.arrival_time.at[s].set(t + delay),
                steps=slots.steps.at[s].set(steps),
                dropped=slots.dropped.at[s].set(dropped),
                group=slots.group.at[s].set(group),
            )
            return slots, deadline

        slots, deadline = jax.lax.fori_loop(0, free.sum(), assign, (state.slots, state.group_deadline))
        return state._replace(slots=slots, group_deadline=deadline), free

    def _refill_single(self, parts, s, t, version, key, k):
        """``_refill`` of the one slot ``s`` (the common case): same client choice, fewer ops."""
        slots, busy, dispatched, fresh = parts
        client = jnp.argmin(self._select_scores(key, _TAG_SELECT_EVENT, dispatched, busy)).astype(jnp.int32)
        steps = k["steps"][client]
        delay, dropped = self._dispatch_draws(key, dispatched, client, steps, k)
        slots = slots._replace(
            client=slots.client.at[s].set(client), version=slots.version.at[s].set(version),
            dispatch_id=slots.dispatch_id.at[s].set(dispatched), dispatch_time=slots.dispatch_time.at[s].set(t),
            arrival_time=slots.arrival_time.at[s].set(t + delay), steps=slots.steps.at[s].set(steps),
            dropped=slots.dropped.at[s].set(dropped),
        )
        return slots, busy.at[client].set(True), dispatched + 1, fresh.at[s].set(True)

    def _async_step(self, state):
        cfg, k = self.cfg, self._constants()
        cap, mode = cfg.capacity, cfg.mode
        state, fresh = self._refill_all(state, k)  # slots dispatched this step (at this version)
        # window n ends at n * period, computed, not accumulated (float32 sums drift: 100,000 windows of
        # 0.1 s added up end at 9998.56)
        t_end = jnp.float32(cfg.period) * (state.step + 1).astype(jnp.float32)
        # the arrivals consumed, in order, packed: ints [client, version, dispatch_id, steps, slot,
        # current] and floats [dispatch_time, arrival_time]; lane j is filled iff j < n_arrivals
        lane_i0 = jnp.zeros((cap, 6), jnp.int32).at[:, 0].set(-1)
        lane_f0 = jnp.zeros((cap, 2), jnp.float32)
        # carry: slots, busy, dispatched, fresh, time, lane_i, lane_f, n_arrivals, n_dropped, n_events,
        # est, pending (freed slots awaiting an on-arrival refill), done
        carry0 = (state.slots, state.busy, state.dispatched, fresh, state.time, lane_i0, lane_f0, jnp.int32(0),
                  jnp.int32(0), jnp.int32(0), state.step_time_est, jnp.zeros_like(fresh), jnp.bool_(False))

        def cond(c):
            return ~c[-1]

        def body(c):
            slots, busy, dispatched, fresh, t, lane_i, lane_f, n_arr, n_drop, n_ev, est, pending, _ = c
            s = jnp.argmin(slots.arrival_time).astype(jnp.int32)
            ta = slots.arrival_time[s]
            pop = jnp.isfinite(ta)
            if mode == "window":
                pop = pop & (ta <= t_end)
            real = pop & ~slots.dropped[s]
            cl = slots.client[s]
            at = jnp.where(real, n_arr, cap)  # lane index; cap: not a lane (dropped writes)
            row_i = jnp.stack([cl, slots.version[s], slots.dispatch_id[s], slots.steps[s], s,
                               fresh[s].astype(jnp.int32)])
            lane_i = lane_i.at[at].set(row_i, mode="drop")
            lane_f = lane_f.at[at].set(jnp.stack([slots.dispatch_time[s], ta]), mode="drop")
            if mode == "compass":
                seen = (ta - slots.dispatch_time[s]) / jnp.maximum(slots.steps[s], 1).astype(jnp.float32)
                est = jnp.where(real, est.at[cl].set(seen), est)
            group = slots.group[s]
            free_at = jnp.where(pop, s, cfg.concurrency)  # out of range: no write
            slots = slots._replace(
                client=slots.client.at[free_at].set(-1, mode="drop"),
                arrival_time=slots.arrival_time.at[free_at].set(_INF, mode="drop"),
                group=slots.group.at[free_at].set(-1, mode="drop"),
            )
            busy = busy.at[jnp.where(pop, cl, cfg.num_clients)].set(False, mode="drop")
            fresh = fresh.at[free_at].set(False, mode="drop")
            t = jnp.where(pop, ta, t)
            n_arr = n_arr + real
            n_drop = n_drop + (pop & ~real)
            n_ev = n_ev + pop
            if mode == "buffer":
                done = n_arr >= cfg.buffer_size
            elif mode == "window":
                done = ~pop
            else:  # compass: the popped client's group has no one left in flight
                group_left = jnp.any((slots.group == group) & (slots.client >= 0))
                done = (pop & ~group_left) | ~jnp.any(slots.client >= 0)
            done = done | ~jnp.isfinite(ta) | (n_ev >= cfg.max_events)
            if mode == "buffer":
                # Replace arrivals from the current model, once the clock moves past this instant: the
                # arrivals of one instant are all consumed before anyone is re-sent, and those
                # pending when the buffer fills are re-sent after the server step (next version).
                pending = pending.at[free_at].set(~done, mode="drop")
                flush = ~done & (jnp.min(slots.arrival_time) > t)
                n_pending = pending.sum()
                branch = jnp.where(flush & (n_pending > 0), jnp.where(n_pending == 1, 1, 2), 0)
                slots, busy, dispatched, fresh = jax.lax.switch(branch, [
                    lambda parts: parts,
                    lambda parts: self._refill_single(parts, jnp.argmax(pending).astype(jnp.int32), t,
                                                      state.version, state.key, k),
                    lambda parts: self._refill(parts, pending, t, state.version, _TAG_SELECT_EVENT,
                                               parts[2], state.key, k),
                ], (slots, busy, dispatched, fresh))
                pending = pending & ~flush
            return (slots, busy, dispatched, fresh, t, lane_i, lane_f, n_arr, n_drop, n_ev, est, pending, done)

        out = jax.lax.while_loop(cond, body, carry0)
        slots, busy, dispatched, fresh, t, lane_i, lane_f, n_arr, n_drop, n_ev, est, _, _ = out
        if mode == "window":
            t = t_end
        lanes = _Lanes(
            client=lane_i[:, 0], version=lane_i[:, 1], dispatch_id=lane_i[:, 2], steps=lane_i[:, 3],
            slot=lane_i[:, 4], current=lane_i[:, 5].astype(bool), dispatch_time=lane_f[:, 0],
            arrival_time=lane_f[:, 1], mask=jnp.arange(cap) < n_arr,
        )
        params_v = state.params
        # the model each in-flight client was sent: this version's for those dispatched during the step
        slot_params = _rows_where(fresh, jax.tree.map(lambda p: p[None], params_v), state.slot_params)
        slot_context = state.slot_context
        if self.client_context is not None:
            ctx = self.client_context(state.rule_state)
            slot_context = _rows_where(fresh, jax.tree.map(lambda x: jnp.asarray(x)[None], ctx), slot_context)
        params, rule_state, version, applied = self._server_update(state, lanes, t, shared_base=False, k=k)
        new_state = state._replace(slot_context=slot_context,
            params=params, rule_state=rule_state, version=version, step=state.step + 1, time=t,
            dispatched=dispatched, applied=state.applied + n_arr, dropped=state.dropped + n_drop,
            slots=slots, slot_params=slot_params, busy=busy, step_time_est=est,
        )
        return new_state, self._record(new_state, lanes, n_arr, n_drop, n_ev, applied)

    # -- training and the server rule

    def _server_update(self, state, lanes: _Lanes, now, shared_base: bool, k):
        cfg = self.cfg
        params = state.params
        client = jnp.maximum(lanes.client, 0)
        steps = jnp.where(lanes.mask, lanes.steps, 0)
        keys = jax.vmap(lambda d: _rng.key_data(state.key, _TAG_TRAIN, d))(lanes.dispatch_id)
        # train the lanes sorted by step count, in groups, then put them back in arrival order
        if len(cfg.lane_groups) > 1:
            order = jnp.argsort(-steps, stable=True)
            inv = jnp.argsort(order)
        else:
            order = inv = jnp.arange(steps.shape[0])
        base_sorted = None
        if not shared_base:
            sent = jax.tree.map(lambda sp: sp[lanes.slot[order]], state.slot_params)
            cur = jax.tree.map(lambda p: p[None], params)
            base_sorted = _rows_where(lanes.current[order], cur, sent)  # the model each client was sent
        ctx_sorted = None
        if self.client_context is not None:
            ctx = self.client_context(state.rule_state)
            if not shared_base:  # the context each client was sent
                sent_ctx = jax.tree.map(lambda sc: sc[lanes.slot[order]], state.slot_context)
                ctx_sorted = _rows_where(lanes.current[order], jax.tree.map(lambda x: jnp.asarray(x)[None], ctx),
                                         sent_ctx)
        outs, start = [], 0
        for size in cfg.lane_groups:
            sl = slice(start, start + size)
            start += size
            b = None if shared_base else jax.tree.map(lambda x, sl=sl: x[sl], base_sorted)
            args = (params if shared_base else b, client[order][sl], steps[order][sl], keys[order][sl])
            axes = (None if shared_base else 0, 0, 0, 0)
            if self.client_context is not None:
                args += (ctx if shared_base else jax.tree.map(lambda x, sl=sl: x[sl], ctx_sorted),)
                axes += (None if shared_base else 0,)
            outs.append(jax.vmap(self.local_update, in_axes=axes)(*args))
        outs_cat = outs[0] if len(outs) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
        extra = {}
        if self.client_context is not None:
            trained_sorted, aux_sorted = outs_cat
            extra["client_aux"] = jax.tree.map(lambda a: a[inv], aux_sorted) if len(cfg.lane_groups) > 1 else aux_sorted
        else:
            trained_sorted = outs_cat
        if cfg.pseudo_gradient == "current" or shared_base:
            ref = jax.tree.map(lambda p: p[None], params)
        else:
            ref = base_sorted
        if len(cfg.lane_groups) > 1:
            pg = jax.tree.map(lambda r, x: (r - x)[inv], ref, trained_sorted)
        else:
            pg = jax.tree.map(lambda r, x: r - x, ref, trained_sorted)
        updates, rule_state = self.rule.update(
            pg, state.rule_state, params,
            mask=lanes.mask, num_examples=jnp.where(lanes.mask, k["examples"][client], 0.0),
            staleness=jnp.where(lanes.mask, state.version - lanes.version, 0),
            elapsed_time=jnp.where(lanes.mask, now - lanes.dispatch_time, 0.0),
            client_ids=lanes.client, local_steps=steps, **extra,
        )
        applied = jnp.any(lanes.mask)
        new_params = _tree_where(applied, optax.apply_updates(params, updates), params)
        rule_state = _tree_where(applied, rule_state, state.rule_state)
        return new_params, rule_state, state.version + applied.astype(jnp.int32), applied

    def _record(self, state, lanes: _Lanes, n_arr, n_drop, n_ev, applied) -> StepRecord:
        staleness = jnp.where(lanes.mask, state.version - applied.astype(jnp.int32) - lanes.version, 0)
        return StepRecord(
            version=state.version, time=state.time, num_arrivals=n_arr, num_dropped=n_drop,
            num_events=n_ev, applied=applied,
            client=jnp.where(lanes.mask, lanes.client, -1), staleness=staleness,
            dispatch_time=lanes.dispatch_time, arrival_time=lanes.arrival_time,
            local_steps=jnp.where(lanes.mask, lanes.steps, 0), dispatch_id=lanes.dispatch_id,
            mask=lanes.mask, metrics={},
        )

