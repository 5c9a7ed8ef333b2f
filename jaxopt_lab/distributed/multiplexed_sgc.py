r"""M-SGC: the paper's sequential gradient coding that multiplexes uncoded and coded tasks (Krishnan et al.).

Krishnan, Ebrahimi & Khisti, "Sequential Gradient Coding For Straggler
Mitigation" (ICLR 2023), https://arxiv.org/abs/2211.13802, the second scheme
("GC on a subset of the tasks, repetition for the rest, multiplexed across
workers and rounds"), as the authors' simulator implements it
(``MultiplexedSGC`` in https://github.com/mamaj/Sequential-Gradient-Coding-2,
``2_find_runtimes/analyze_delay_profiles/multiplexed_sgc.py``).

Designed for the :math:`(B, W, \lambda)`-bursty straggler model: in every
window of :math:`W` consecutive rounds at most :math:`\lambda` distinct
workers straggle, and a worker's straggling rounds in the window lie within
:math:`B` consecutive rounds (:func:`follows_bursty_model`). Delay
:math:`T = W - 2 + B`.

Layout. Job :math:`t`'s data is split into

* :math:`D_1`: :math:`n (W-1)` uncoded chunks, :math:`W-1` per worker;
* :math:`D_2`: :math:`B` groups, each cut into :math:`n` partitions and
  :math:`(n, \lambda)`-gradient coded (:mod:`~jaxopt_lab.distributed.gradient_coding`):
  a coded task is one worker's combination of :math:`\lambda + 1` partitions of a group.

Every task (a *mini-task*) costs the same, :math:`\ell`, so a chunk is
:math:`\ell` of the data and a partition :math:`\ell/(\lambda+1)`; the data
sums to one gradient when

.. math::
    \ell = \frac{\lambda + 1}{n\,(B + (W-1)(\lambda+1))}, \qquad
    \text{load per round} = (W - 1 + B)\,\ell
    = \frac{(\lambda+1)(W-1+B)}{n\,(B + (W-1)(\lambda+1))}

(the paper's normalized load; with :math:`\lambda = n` no group can be coded,
:math:`D_2` is empty and :math:`\ell = 1/(n (W-1))`).

Schedule (a diagonal per job): in round :math:`r` every worker runs
:math:`W - 1 + B` mini-tasks, mini-task :math:`m` for job :math:`r - m`. For
job :math:`t`, mini-tasks :math:`m < W-1` (rounds :math:`t, \dots, t+W-2`) are
the worker's :math:`D_1` chunks; mini-task :math:`W-1+b` (round
:math:`t+W-1+b`) is the coded task of group :math:`b` if the worker has
returned all its :math:`W-1` chunks of job :math:`t` by the previous rounds,
else the repetition of a missing chunk (the adaptive multiplexing "based on
past straggler patterns"). A straggler returns nothing that round. Job
:math:`t` decodes when every worker's chunks are in and each group has at least
:math:`n - \lambda` coded results; under any straggler pattern of the model this
happens by round :math:`t + T` (the paper's theorem; tested here on every such
pattern of small cases).

Rounds with times (``run(unit_time=...)``, :math:`u_{ri}` seconds per full
gradient): worker :math:`i` finishes at :math:`L_{ri} u_{ri}` with
:math:`L_{ri}` the load of its mini-tasks that round (fewer at the start and
the end of the sequence, where some diagonals have no job). Which workers are
stragglers is the master's choice; two rules:

* ``mu=None`` (default): the master stops at the earliest finish time at which
  the workers still running, declared stragglers, keep the pattern within the
  model: the fewest stragglers it must wait out, so decoding stays guaranteed.
* ``mu`` :math:`\ge 0`: the authors' simulator: the workers slower than
  :math:`(1 + \mu)` times the fastest are stragglers and the round lasts
  :math:`(1 + \mu)` times the fastest, if that pattern is within the model;
  otherwise the master waits for every worker (no straggler).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxopt_lab.distributed.gradient_coding import GradientCode, decoding_vector, gradient_code


def follows_bursty_model(history: np.ndarray, current: np.ndarray, B: int, W: int, lam: int) -> bool:
    r"""Whether straggling ``current`` (n,) bool after ``history`` (rounds so far, n) stays in the model.

    The authors' check, with :math:`r` the current round: (1) at most
    :math:`\lambda` distinct stragglers in rounds :math:`r-W+1, \dots, r`;
    (2) a worker straggling now did not straggle in rounds
    :math:`r-W+1, \dots, r-B` (its burst in the window is at most :math:`B` long).
    """
    r = history.shape[0]
    window = history[max(0, r + 1 - W):r]
    if int((window.any(axis=0) | current).sum()) > lam:
        return False
    early = history[max(0, r + 1 - W):max(0, r + 1 - B)]
    return not bool((early.any(axis=0) & current).any())


@dataclass
class MSGCResult:
    """A run of :class:`MultiplexedSGC`: per round its duration, stragglers and loads; per job the round it
    decoded in, which worker returned which of its chunks and which coded result of each group."""

    round_times: np.ndarray
    stragglers: np.ndarray  # (rounds, n) bool
    loads: np.ndarray  # (rounds, n), fractions of one full gradient
    decoded_round: np.ndarray  # (J,)
    chunks_done: np.ndarray  # (J, n, W - 1) bool
    coded_done: np.ndarray  # (J, B, n) bool: worker i's coded result of group b returned

    @property
    def total_time(self) -> float:
        return float(self.round_times.sum())


@dataclass
class MultiplexedSGC:
    """M-SGC for ``n`` workers designed for the ``(B, W, lam)``-bursty model (module docstring)."""

    n: int
    B: int
    W: int
    lam: int
    kind: str = "cyclic"  # the groups' (n, lam) gradient code
    seed: int = 0
    mu: float | None = None  # None: earliest in-model stop; a float: the authors' (1 + mu) x fastest rule
    code: GradientCode | None = field(init=False, default=None)

    def __post_init__(self):
        for name in ("n", "B", "W", "lam"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n!r}")
        if self.W < 2:
            raise ValueError(f"W must be >= 2 (W - 1 uncoded chunks per worker), got {self.W!r}")
        if not 1 <= self.B <= self.W - 1:
            raise ValueError(f"B must be in [1, W - 1] = [1, {self.W - 1}], got {self.B!r}")
        if not 0 <= self.lam <= self.n:
            raise ValueError(f"lam must be in [0, n] = [0, {self.n}], got {self.lam!r}")
        if self.mu is not None and (isinstance(self.mu, bool) or not isinstance(self.mu, (int, float))
                                    or not 0 <= self.mu < np.inf):
            raise ValueError(f"mu must be None or a finite number >= 0, got {self.mu!r}")
        if self.lam < self.n:
            self.code = gradient_code(self.kind, self.n, self.lam, self.seed)

    @property
    def delay(self) -> int:
        """T = W - 2 + B."""
        return self.W - 2 + self.B

    @property
    def minitasks(self) -> int:
        return self.W - 1 + self.B

    @property
    def task_load(self) -> float:
        r""":math:`\ell`, one mini-task's share of a full gradient."""
        n, B, W, lam = self.n, self.B, self.W, self.lam
        if lam == n:
            return 1.0 / (n * (W - 1))
        return (lam + 1) / (n * (B + (W - 1) * (lam + 1)))

    @property
    def load(self) -> float:
        """The paper's normalized load: a worker's share of a full gradient per round."""
        return self.minitasks * self.task_load

    def _decodable(self, chunks: np.ndarray, coded: np.ndarray) -> bool:
        """chunks (n, W-1) bool, coded (B, n) bool."""
        if not chunks.all():
            return False
        return self.lam == self.n or bool((coded.sum(axis=1) >= self.n - self.lam).all())

    def run(self, num_jobs: int, unit_time: np.ndarray | None = None, stragglers: np.ndarray | None = None
            ) -> MSGCResult:
        """Run ``num_jobs`` jobs over ``num_jobs + T`` rounds, from seconds per full gradient ``unit_time``
        (rounds, n) (the master's rule of the module docstring) or from a given ``stragglers`` (rounds, n)
        bool pattern (round time: the slowest returned load at 1 s per gradient). A job not decodable at
        its deadline raises ``RuntimeError`` (a given pattern outside the model can do that)."""
        n, Wm1, B, T = self.n, self.W - 1, self.B, self.delay
        if not isinstance(num_jobs, int) or isinstance(num_jobs, bool) or num_jobs < 1:
            raise ValueError(f"num_jobs must be an int >= 1, got {num_jobs!r}")
        if (unit_time is None) == (stragglers is None):
            raise ValueError("give exactly one of unit_time and stragglers")
        rounds = num_jobs + T
        given = np.asarray(unit_time if unit_time is not None else stragglers)
        if given.ndim != 2 or given.shape[1] != n or given.shape[0] < rounds:
            raise ValueError(f"need an array of shape (>= {rounds}, {n}) (rounds = jobs + T), got {given.shape}")
        chunks = np.zeros((num_jobs, n, Wm1), bool)
        coded = np.zeros((num_jobs, B, n), bool)
        decoded = np.full(num_jobs, -1)
        times, strag, loads = np.zeros(rounds), np.zeros((rounds, n), bool), np.zeros((rounds, n))
        for r in range(rounds):
            # assignment: mini-task m of worker i is for job r - m: ("chunk", k) or ("coded", b)
            tasks = [[] for _ in range(n)]
            for m in range(self.minitasks):
                j = r - m
                if not 0 <= j < num_jobs:
                    continue
                for i in range(n):
                    if m < Wm1:
                        tasks[i].append((j, "chunk", m))
                    elif chunks[j, i].all():
                        tasks[i].append((j, "coded", m - Wm1))
                    else:  # one mini-task per job and round: repeat the first chunk still missing
                        tasks[i].append((j, "chunk", int(np.flatnonzero(~chunks[j, i])[0])))
            load = np.array([len(t) * self.task_load for t in tasks])
            loads[r] = load
            if stragglers is not None:
                late = np.asarray(stragglers[r], bool).copy()
                returned = ~late
                times[r] = load[returned].max() if returned.any() else 0.0
            else:
                late, times[r] = self._master(strag[:r], load * given[r])
            strag[r] = late
            for i in np.flatnonzero(~late):
                for j, kind, k in tasks[i]:
                    if kind == "chunk":
                        chunks[j, i, k] = True
                    else:
                        coded[j, k, i] = True
            for j in range(max(0, r - T), min(r + 1, num_jobs)):
                if decoded[j] < 0 and self._decodable(chunks[j], coded[j]):
                    decoded[j] = r
            if 0 <= r - T < num_jobs and decoded[r - T] < 0:
                raise RuntimeError(f"job {r - T} missed its deadline (round {r}) under the straggler pattern")
        return MSGCResult(times, strag, loads, decoded, chunks, coded)

    def _master(self, history: np.ndarray, finish: np.ndarray) -> tuple[np.ndarray, float]:
        """(stragglers, round time) from the workers' finish times (module docstring's two rules)."""
        n = self.n
        if self.mu is not None:  # the authors' simulator
            wait = (1 + self.mu) * finish.min()
            late = finish > wait
            if follows_bursty_model(history, late, self.B, self.W, self.lam):
                return late, float(wait)
            return np.zeros(n, bool), float(finish.max())
        order = np.argsort(finish, kind="stable")
        for k in range(1, n + 1):  # the first k to finish return; fewer stragglers stay in the model (monotone)
            late = np.zeros(n, bool)
            late[order[k:]] = True
            if follows_bursty_model(history, late, self.B, self.W, self.lam):
                return late, float(finish[order[k - 1]])
        raise AssertionError("unreachable: no straggler is always within the model")

    def partitions(self) -> int:
        """Rows of ``decode``'s gradient array: n (W - 1) chunks, then B groups of n partitions."""
        return self.n * (self.W - 1) + (0 if self.lam == self.n else self.B * self.n)

    def decode(self, result: MSGCResult, job: int, partition_grads: np.ndarray) -> np.ndarray:
        r"""Job ``job``'s full gradient from what the master received: every worker's chunks plus, per group,
        :math:`\sum_i a_i (B_{\text{code}} g_{\text{group}})_i` over the returned coded results.

        ``partition_grads``: (:meth:`partitions`, ...) float64; row ``i (W-1) + k`` is worker i's chunk k,
        row ``n (W-1) + b n + p`` partition p of group b.
        """
        n, Wm1 = self.n, self.W - 1
        g = np.asarray(partition_grads, np.float64)
        if g.shape[0] != self.partitions():
            raise ValueError(f"partition_grads needs {self.partitions()} rows, got {g.shape[0]}")
        if result.decoded_round[job] < 0:
            raise ValueError(f"job {job} is not decodable")
        if not result.chunks_done[job].all():
            raise ValueError(f"job {job}: chunks missing")
        total = g[:n * Wm1].sum(axis=0)
        for b in range(0 if self.code is None else self.B):
            a = decoding_vector(self.code, result.coded_done[job, b])  # float64, zero on the missing workers
            part = g[n * Wm1 + b * n:n * Wm1 + (b + 1) * n]
            messages = np.tensordot(self.code.B, part, axes=1)  # what each worker sent for group b
            total = total + np.tensordot(a, messages, axes=1)
        return total


def multiplexed(n: int, B: int, W: int, lam: int, kind: str = "cyclic", seed: int = 0,
                mu: float | None = None) -> MultiplexedSGC:
    """The paper's M-SGC for the ``(B, W, lam)``-bursty straggler model (delay T = W - 2 + B)."""
    return MultiplexedSGC(n, B, W, lam, kind=kind, seed=seed, mu=mu)
