"""When the server steps, and when it dispatches clients: the trigger policies.

A trigger is a small frozen dataclass handed to
:class:`~jaxopt_lab.distributed.federated.FederatedSimulator`. It decides

- which arrivals one server step consumes (at most ``capacity`` of them: the
  leading size of the pseudo-gradient stack the server rule receives), and
- when freed clients are replaced: at once on arrival (``Buffer``), or at the
  start of the next server step (every other trigger), from the then-current
  model.

=======================  ==========================================  =====================
trigger                  server step happens                         replacement dispatch
=======================  ==========================================  =====================
``SyncRound(m)``         all m clients of the round have returned    next round: m new ones
``Buffer(K)``            K client updates have arrived               on each arrival
``every_arrival()``      each arrival (``Buffer(1)``; FedAsync)      on each arrival
``TimeWindow(dt)``       every ``dt`` simulated seconds              at the window's end
``Compass(qmin,qmax)``   the last member of a group has arrived      after the step, with
                                                                     new step counts
=======================  ==========================================  =====================
"""

from __future__ import annotations

import dataclasses

from jaxopt_lab.distributed.federated._checks import check_int, check_positive


@dataclasses.dataclass(frozen=True)
class SyncRound:
    """Synchronous rounds (FedAvg/FedProx): sample ``clients_per_round`` (m of N) clients, wait for all.

    Dropped clients are waited for until their result would have arrived (a
    deadline), then the round closes without them.
    """

    clients_per_round: int

    def __post_init__(self):
        check_int("clients_per_round", self.clients_per_round, 1)


@dataclasses.dataclass(frozen=True)
class Buffer:
    """Buffered asynchronous aggregation (FedBuff): a server step per ``size`` (K) arrived updates.

    The server keeps ``concurrency`` clients in flight, replacing each arrival
    (or dropped client) at once from the current model.
    """

    size: int

    def __post_init__(self):
        check_int("buffer size K", self.size, 1)


def every_arrival() -> Buffer:
    """One server step per arrival (FedAsync, async Local-SGD): ``Buffer(1)``."""
    return Buffer(1)


@dataclasses.dataclass(frozen=True)
class TimeWindow:
    """Fixed wall-clock windows (FedFix): every ``period`` simulated seconds, aggregate what arrived.

    Clients that arrived during a window are re-dispatched when it closes, with
    the new model; a window with no arrival leaves the model unchanged.
    """

    period: float

    def __post_init__(self):
        check_positive("window period", self.period)


@dataclasses.dataclass(frozen=True)
class Compass:
    """FedCompass's scheduler: local step counts in ``[q_min, q_max]`` chosen from each
    client's estimated speed so that clients arrive in groups; a server step when a
    group's last member arrives (see :mod:`.fedcompass`)."""

    q_min: int
    q_max: int

    def __post_init__(self):
        check_int("q_min", self.q_min, 1)
        check_int("q_max", self.q_max, 1)
        if self.q_max < self.q_min:
            raise ValueError(f"q_max ({self.q_max}) must be >= q_min ({self.q_min})")


Trigger = SyncRound | Buffer | TimeWindow | Compass
