r"""Sequential gradient coding (Krishnan, Ebrahimi & Khisti): code across workers AND rounds, delay T.

Krishnan, Ebrahimi & Khisti, "Sequential Gradient Coding For Straggler
Mitigation" (ICLR 2023), https://arxiv.org/abs/2211.13802. A sequence of
gradients (jobs) :math:`g(1), \dots, g(J)`; job :math:`t` starts in round
:math:`t` and must be decoded by the end of round :math:`t + T`. Plain
gradient coding (:mod:`jaxopt_lab.distributed.gradient_coding`) is
:math:`T = 0`. Schemes simulated here on one round model:

* **selective repetition** (``SGCScheme(..., rep_fraction=0, delay=T)``, the
  paper's SR-SGC): each job is (n, s)-gradient coded with an ``s`` smaller than
  the worst round's stragglers; a job that a round leaves undecodable is
  finished in the next rounds by *selectively* re-attempting only as many of
  its unfinished coded tasks as decoding needs (each by the worker that holds
  its data; the re-attempters are picked greedily, the workers fastest in the
  previous round first), on top of those workers' new tasks.
* **coded + repeated parts** (``rep_fraction`` :math:`\alpha > 0`): each
  job's data is split in two: a fraction :math:`\alpha` in :math:`n` disjoint
  chunks, one per worker, without redundancy (load :math:`\alpha/n`), a chunk
  a straggler missed being repeated by its worker in the following rounds; the
  rest (:math:`1-\alpha`) gradient coded as above (load
  :math:`(1-\alpha)(s+1)/n`). This is a simplification of this package, NOT
  the paper's M-SGC: the paper's scheme spreads each job over :math:`W-1+B`
  rounds with a constant load per round and codes :math:`B` groups separately;
  it is :func:`jaxopt_lab.distributed.multiplexed_sgc.multiplexed` (checked
  against the authors' code). Kept because it fits the round model below.

Round model (the same for every scheme): in round :math:`r` worker :math:`i`
is assigned a load :math:`L_{ri}` (a fraction of one full gradient) and
finishes at :math:`L_{ri} \cdot u_{ri}` with :math:`u_{ri}` its seconds per
full gradient that round (:func:`unit_times`, from the federated simulator's
speed model, or a trace). The master ends the round at the earliest time at
which at least :math:`n - \lambda` workers have returned (``stragglers_per_round``
:math:`\lambda`, by default the code's :math:`s`; the SGC schemes use a code with
:math:`s < \lambda`, which is where their lighter load comes from) and the job at its
deadline (:math:`r - T`) is decodable; the others are that round's stragglers
and return nothing (their round's work is lost). Waiting for all workers is
``rep_fraction=1, delay=0``; plain GC is ``rep_fraction=0, delay=0``.

How SR-SGC is read here: the paper sizes :math:`s` and the task layout from a
bursty straggler model (at most :math:`\lambda` stragglers in any window of
:math:`W` rounds, bursts of at most :math:`B`) to guarantee decoding without
waiting; here they are free parameters and the master waits when a deadline
would be missed, so every job is decoded exactly by its deadline under any
straggler pattern and the price shows up as simulated time. The authors'
simulator (github.com/mamaj/Sequential-Gradient-Coding-2,
``selective_repeat_sgc.py``) differs: :math:`T = B`,
:math:`s = \lceil B\lambda / (W - 1 + B) \rceil`, and in round :math:`t + B`
the :math:`v - s` first of the :math:`v` workers missing from job :math:`t`
redo its task *instead of* their new one (the load stays :math:`(s+1)/n`);
it is not reproduced here. The paper's M-SGC, with the model's parameters and
the authors' layout, is :mod:`jaxopt_lab.distributed.multiplexed_sgc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from jaxopt_lab.distributed.federated.speeds import client_speeds
from jaxopt_lab.distributed.gradient_coding import GradientCode, decoding_vector, gradient_code


def unit_times(
    num_workers: int,
    num_rounds: int,
    speeds: str | Sequence[float] = "lognormal",
    *,
    speed_sigma: float = 0.5,
    jitter_sigma: float = 0.2,
    burst_prob: float = 0.05,
    burst_length: int = 2,
    burst_factor: float = 5.0,
    seed: int = 0,
) -> np.ndarray:
    r"""Seconds per full gradient, :math:`u_{ri} = \text{jitter}_{ri} \cdot \text{burst}_{ri} / v_i` (shape (rounds, n)).

    :math:`v_i` from :func:`~jaxopt_lab.distributed.federated.speeds.client_speeds`
    (the event simulator's speed model, ``sigma=speed_sigma``), a per-round
    log-normal jitter :math:`\exp(\text{jitter\_sigma}\, z)`, and bursty
    stragglers: each round a worker not in a burst starts one with probability
    ``burst_prob``, lasting ``burst_length`` rounds, during which it is
    ``burst_factor`` times slower (the paper's bursty straggler model).
    """
    if not (isinstance(num_rounds, int) and num_rounds >= 1):
        raise ValueError(f"num_rounds must be an int >= 1, got {num_rounds!r}")
    if not 0 <= burst_prob <= 1:
        raise ValueError(f"burst_prob must be in [0, 1], got {burst_prob!r}")
    if not (isinstance(burst_length, int) and burst_length >= 1):
        raise ValueError(f"burst_length must be an int >= 1, got {burst_length!r}")
    if not burst_factor >= 1:
        raise ValueError(f"burst_factor must be >= 1, got {burst_factor!r}")
    v = client_speeds(num_workers, speeds, sigma=speed_sigma, seed=seed)
    rng = np.random.default_rng(seed + 1)
    jitter = np.exp(jitter_sigma * rng.standard_normal((num_rounds, num_workers)))
    burst = np.ones((num_rounds, num_workers))
    left = np.zeros(num_workers, int)
    for r in range(num_rounds):
        start = (left == 0) & (rng.random(num_workers) < burst_prob)
        left[start] = burst_length
        burst[r, left > 0] = burst_factor
        left = np.maximum(left - 1, 0)
    return jitter * burst / v[None, :]


@dataclass
class _Job:
    gc_done: np.ndarray  # (n,) bool: coded task of worker i returned
    rep_done: np.ndarray  # (n,) bool: repetition chunk of worker i returned
    decoded_round: int = -1


@dataclass
class SGCResult:
    """What a run did: per round its simulated duration and stragglers, per job the round it was decoded in
    and the decoding vector of its coded part (float64), and the workers' loads per round."""

    round_times: np.ndarray
    stragglers: np.ndarray  # (rounds, n) bool
    loads: np.ndarray  # (rounds, n)
    decoded_round: np.ndarray  # (J,)
    gc_coefficients: list = field(default_factory=list)  # per job: (n,) decoding vector of the coded part
    rep_done: list = field(default_factory=list)  # per job: (n,) bool, all True once decoded

    @property
    def total_time(self) -> float:
        return float(self.round_times.sum())


@dataclass
class SGCScheme:
    """One scheme of the module docstring: an (n, s) code, the repetition fraction and the delay T."""

    code: GradientCode
    rep_fraction: float = 0.0
    delay: int = 0
    stragglers_per_round: int | None = None  # lambda: the master waits for n - lambda workers (None: the code's s)

    def __post_init__(self):
        if not isinstance(self.code, GradientCode):
            raise ValueError(f"code must be a GradientCode, got {self.code!r}")
        if self.stragglers_per_round is None:
            self.stragglers_per_round = self.code.s
        lam = self.stragglers_per_round
        if not (isinstance(lam, int) and not isinstance(lam, bool) and 0 <= lam < self.code.n):
            raise ValueError(f"stragglers_per_round must be an int in [0, n), got {lam!r}")
        if lam > self.code.s and self.delay == 0:
            raise ValueError(f"stragglers_per_round={lam} > s={self.code.s} needs a delay T >= 1 to finish jobs later")
        if not 0 <= self.rep_fraction <= 1:
            raise ValueError(f"rep_fraction must be in [0, 1], got {self.rep_fraction!r}")
        if not (isinstance(self.delay, int) and not isinstance(self.delay, bool) and self.delay >= 0):
            raise ValueError(f"delay (T) must be an int >= 0, got {self.delay!r}")

    @property
    def n(self) -> int:
        return self.code.n

    def _gc_load(self):
        return (1 - self.rep_fraction) * self.code.load

    def _rep_load(self):
        return self.rep_fraction / self.n

    def _complete(self, job: _Job, extra_gc=None, extra_rep=None) -> bool:
        gc = job.gc_done if extra_gc is None else job.gc_done | extra_gc
        rep = job.rep_done if extra_rep is None else job.rep_done | extra_rep
        rep_ok = self.rep_fraction == 0 or rep.all()
        gc_ok = self.rep_fraction == 1 or decoding_vector(self.code, gc) is not None
        return rep_ok and gc_ok

    def _assign(self, jobs, r, preference):
        """Tasks of round r: {worker: [(job, "gc"|"rep"), ...]}."""
        n = self.n
        tasks = [[] for _ in range(n)]
        for j in range(max(0, r - self.delay), min(r + 1, len(jobs))):
            job = jobs[j]
            if job.decoded_round >= 0:
                continue
            if j == r:  # new job: every worker its coded task and its chunk
                for i in range(n):
                    if self.rep_fraction < 1:
                        tasks[i].append((j, "gc"))
                    if self.rep_fraction > 0:
                        tasks[i].append((j, "rep"))
                continue
            if self.rep_fraction > 0:  # repetition: every missing chunk, by its worker
                for i in np.flatnonzero(~job.rep_done):
                    tasks[i].append((j, "rep"))
            if self.rep_fraction < 1 and decoding_vector(self.code, job.gc_done) is None:
                extra = np.zeros(n, bool)  # selective re-attempt: greedily, fastest last round first
                for i in preference:
                    if job.gc_done[i]:
                        continue
                    extra[i] = True
                    tasks[i].append((j, "gc"))
                    if decoding_vector(self.code, job.gc_done | extra) is not None:
                        break
        return tasks

    def _load(self, task_list):
        return sum(self._gc_load() if kind == "gc" else self._rep_load() for _, kind in task_list)

    def run(self, num_jobs: int, unit_time: np.ndarray | None = None, stragglers: np.ndarray | None = None):
        """Run ``num_jobs`` jobs over ``num_jobs + T`` rounds, from seconds per gradient ``unit_time``
        (rounds, n) (the round rule of the module docstring) or from given ``stragglers`` (rounds, n) bool
        (who returns nothing each round; round times are then the slowest returned load, 1 s per gradient).

        With given stragglers a job whose deadline passes undecoded raises (the pattern defeats the scheme);
        with times the master waits, so every job is decoded by its deadline.
        """
        n, rounds = self.n, num_jobs + self.delay
        if (unit_time is None) == (stragglers is None):
            raise ValueError("give exactly one of unit_time and stragglers")
        given = unit_time if unit_time is not None else stragglers
        given = np.asarray(given)
        if given.shape[1:] != (n,) or given.shape[0] < rounds:
            raise ValueError(f"need an array of shape (>= {rounds}, {n}) (rounds = jobs + T), got {given.shape}")
        jobs = [_Job(np.zeros(n, bool), np.zeros(n, bool)) for _ in range(num_jobs)]
        preference = np.arange(n)
        times, strag, loads = np.zeros(rounds), np.zeros((rounds, n), bool), np.zeros((rounds, n))
        for r in range(rounds):
            tasks = self._assign(jobs, r, preference)
            load = np.array([self._load(t) for t in tasks])
            loads[r] = load
            busy = load > 0
            if stragglers is not None:
                returned = ~np.asarray(stragglers[r], bool) & busy
                finish = np.where(busy, load, 0.0)
                times[r] = finish[returned].max() if returned.any() else 0.0
            else:
                finish = load * unit_time[r]
                order = np.argsort(np.where(busy, finish, np.inf), kind="stable")
                need = max(0, min(n - self.stragglers_per_round, int(busy.sum())))
                deadline = r - self.delay
                returned = np.zeros(n, bool)
                returned[order[:need]] = True
                k = need
                while deadline >= 0 and deadline < num_jobs and jobs[deadline].decoded_round < 0 \
                        and not self._complete(*self._with(jobs[deadline], tasks, returned, deadline)) and k < n:
                    returned[order[k]] = True
                    k += 1
                times[r] = finish[returned].max() if returned.any() else 0.0
                preference = np.argsort(finish, kind="stable")
            strag[r] = busy & ~returned
            for i in np.flatnonzero(returned):
                for j, kind in tasks[i]:
                    (jobs[j].gc_done if kind == "gc" else jobs[j].rep_done)[i] = True
            for j in range(max(0, r - self.delay), min(r + 1, num_jobs)):
                if jobs[j].decoded_round < 0 and self._complete(jobs[j]):
                    jobs[j].decoded_round = r
            if 0 <= r - self.delay < num_jobs and jobs[r - self.delay].decoded_round < 0:
                raise RuntimeError(f"job {r - self.delay} missed its deadline (round {r}) under the given stragglers")
        coeffs = [decoding_vector(self.code, job.gc_done) if self.rep_fraction < 1 else None for job in jobs]
        return SGCResult(times, strag, loads, np.array([job.decoded_round for job in jobs]), coeffs,
                         [job.rep_done.copy() for job in jobs])

    def _with(self, job, tasks, returned, j):
        """(job, extra_gc, extra_rep) if the workers in ``returned`` hand in their round's tasks of job j."""
        n = self.n
        extra_gc, extra_rep = np.zeros(n, bool), np.zeros(n, bool)
        for i in np.flatnonzero(returned):
            for jj, kind in tasks[i]:
                if jj == j:
                    (extra_gc if kind == "gc" else extra_rep)[i] = True
        return job, extra_gc, extra_rep

    def decode(self, result: SGCResult, job: int, partition_grads: np.ndarray) -> np.ndarray:
        r"""The full gradient of ``job`` from what the master received: coded part
        :math:`\sum_i a_i (B g^{(2)})_i` plus the repeated chunks :math:`\sum_i g^{(1)}_i`.

        ``partition_grads``: (2n, ...) float64: rows 0..n-1 the repetition chunks' gradients
        (:math:`\alpha` part), rows n..2n-1 the coded part's n partitions (ignored parts may be zero).
        """
        n = self.n
        g = np.asarray(partition_grads, np.float64)
        total = np.zeros(g.shape[1:])
        if self.rep_fraction > 0:
            if not result.rep_done[job].all():
                raise ValueError(f"job {job}: repetition chunks missing")
            total = total + g[:n].sum(axis=0)
        if self.rep_fraction < 1:
            a = result.gc_coefficients[job]
            if a is None:
                raise ValueError(f"job {job} is not decodable")
            messages = np.tensordot(self.code.B, g[n:], axes=1)  # what each worker sent
            total = total + np.tensordot(a, messages, axes=1)
        return total


def wait_for_all(n: int) -> SGCScheme:
    """No coding: each worker one of n partitions, the master waits for all (``rep_fraction=1, delay=0``)."""
    return SGCScheme(gradient_code("cyclic", n, 0), rep_fraction=1.0, delay=0, stragglers_per_round=0)


def plain_gc(n: int, s: int, kind: str = "cyclic", seed: int = 0) -> SGCScheme:
    """Tandon et al.'s gradient coding, round by round (T = 0)."""
    return SGCScheme(gradient_code(kind, n, s, seed), rep_fraction=0.0, delay=0)


def selective_repetition(n: int, s: int, delay: int, stragglers_per_round: int | None = None, kind: str = "cyclic",
                         seed: int = 0) -> SGCScheme:
    """SR-SGC: (n, s) GC per job, the master waiting for n - lambda workers a round, plus selective re-attempts
    of the unfinished coded tasks within ``delay`` rounds."""
    return SGCScheme(gradient_code(kind, n, s, seed), rep_fraction=0.0, delay=delay,
                     stragglers_per_round=stragglers_per_round)
