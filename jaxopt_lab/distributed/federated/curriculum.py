r"""Ordered local training: curriculum, anti-curriculum and random curriculum on the clients.

Vahidian, Kadaveru, Baek, Wang, Kungurtsev, Chen, Shah & Lin, "When Do Curricula
Work in Federated Learning?" (ICCV 2023), https://arxiv.org/abs/2212.12712, with the
pacing functions of Wu, Dyer & Neyshabur, "When Do Curricula Work?" (ICLR 2021),
https://arxiv.org/abs/2012.03107, which that paper uses.

A client scores each of its examples (a *difficulty*, low = easy), orders them —
easy first (``"curriculum"``), hard first (``"anti"``) or in a random order
(``"random"``) — and at local step :math:`t` of :math:`T` draws its minibatch
uniformly, without replacement, from the first :math:`m_t` examples of that order:

.. math::

   m_t = \min\bigl(n, \max(1, \lfloor n\, g(t) \rfloor)\bigr), \qquad
   g(t) = b + (1 - b)\, h\!\left(\frac{t}{aT}\right) \ (\text{capped at } 1),

with :math:`n` the client's examples, :math:`b` the starting fraction, :math:`a`
the fraction of the steps after which all data is in play, and :math:`h` the
pacing family of Wu et al.: ``linear`` :math:`x`, ``quad`` :math:`x^2`, ``root``
:math:`\sqrt x`, ``step`` :math:`\lfloor x \rfloor`, ``exp``
:math:`(e^{10x} - 1)/(e^{10} - 1)`, ``log`` :math:`1 + 0.1 \log(x + e^{-10})`. The pool
size is truncated (:math:`\lfloor\cdot\rfloor`) as Wu et al.'s official
``get_pacing_function`` (google-research/understanding-curricula, ``utils.py``:
``int(rate * step + index_start)`` with ``index_start = b * N``) does.

The score is, by default, the loss of the model the client was sent on each of its
examples (the global model is the expert a client has; the paper's loss-based scoring),
computed once per dispatch; pass ``scores`` (``(num_clients, max_size)``, e.g. from a
pre-trained expert) to fix them instead. Use it as an option of the local update::

    local = fl.make_local_update(loss_fn, clients, optax.sgd(0.1), 16,
                                 curriculum=fl.curriculum("curriculum", "linear", a=0.8, b=0.2))

Assumptions (our reading; we found no code of the federated paper): the pacing runs over
each dispatch's local steps (:math:`T` = ``num_steps``), and every step draws its batch
uniformly from the current pool. Wu et al.'s code instead walks a shuffled loader over
the pool and recomputes the pool after each pass through it, and never lets the pool go
below a hard-coded floor (``max(m_t, 256)`` examples); here the pool follows :math:`m_t`
at every step, down to one example. With :math:`b = 1` the pool is the whole client from
the first step, so the three orderings train identically.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.distributed.federated import _rng
from jaxopt_lab.distributed.federated._checks import check_real

ORDERINGS = ("curriculum", "anti", "random")
PACINGS = ("linear", "quad", "root", "step", "exp", "log")
_ORDER_STREAM, _BATCH_STREAM = 0x435552, 0x424154  # counters of the random order and the batch draws


class Curriculum(NamedTuple):
    """A client-side ordering with its pacing (build it with :func:`curriculum`)."""

    ordering: str
    pacing: str
    a: float
    b: float
    scores: Any  # None or (num_clients, max_size) difficulties


def curriculum(ordering: str = "curriculum", pacing: str = "linear", a: float = 0.8, b: float = 0.2,
               scores=None) -> Curriculum:
    """The ``curriculum=`` option of :func:`~jaxopt_lab.distributed.federated.make_local_update`.

    Args:
      ordering: ``"curriculum"`` (easy first), ``"anti"`` (hard first) or ``"random"``.
      pacing: the family :math:`h` (module docstring).
      a: fraction of the local steps after which every example is in the pool, > 0.
      b: fraction of the examples in the pool at the first step, in (0, 1].
      scores: optional fixed difficulties ``(num_clients, max_size)``; None: the loss of
        the received model, per dispatch.
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    if pacing not in PACINGS:
        raise ValueError(f"pacing must be one of {PACINGS}, got {pacing!r}")
    a, b = check_real("a", a), check_real("b", b)
    if not a > 0:
        raise ValueError(f"a must be > 0, got {a}")
    if not 0 < b <= 1:
        raise ValueError(f"b must be in (0, 1], got {b}")
    if scores is not None:
        scores = np.asarray(scores, np.float32)
        if scores.ndim != 2:
            raise ValueError(f"scores must have shape (num_clients, max_size), got {scores.shape}")
    return Curriculum(ordering, pacing, float(a), float(b), scores)


def pacing_fraction(pacing: str, x, b: float):
    r""":math:`g = \min(1, b + (1 - b) h(x))` at :math:`x = t / (aT)` (jnp or numpy arrays)."""
    xp = jnp if isinstance(x, jax.Array) else np
    if pacing == "linear":
        h = x
    elif pacing == "quad":
        h = x * x
    elif pacing == "root":
        h = xp.sqrt(x)
    elif pacing == "step":
        h = xp.floor(x)
    elif pacing == "exp":
        h = (xp.exp(10.0 * x) - 1.0) / (math.exp(10.0) - 1.0)
    elif pacing == "log":
        h = 1.0 + 0.1 * xp.log(x + math.exp(-10.0))
    else:
        raise ValueError(f"pacing must be one of {PACINGS}, got {pacing!r}")
    return xp.minimum(1.0, b + (1.0 - b) * h)


def pool_size(pacing: str, a: float, b: float, t, num_steps, n):
    """:math:`m_t`: how many of the ordered examples step ``t`` draws from."""
    x = t.astype(jnp.float32) / (jnp.float32(a) * jnp.maximum(num_steps, 1).astype(jnp.float32))
    frac = pacing_fraction(pacing, x, b)
    m = jnp.floor(frac * n.astype(jnp.float32) + 1e-4).astype(jnp.int32)  # 1e-4: float32 products of exact integers
    return jnp.clip(m, 1, jnp.maximum(n, 1))


class CurriculumWalk:
    """How a curriculum client reads its examples: ranks once per dispatch, then paced draws."""

    def __init__(self, cur: Curriculum, max_size: int, num_clients: int, batch_size: int):
        if not isinstance(cur, Curriculum):
            raise ValueError(f"curriculum must be built by fl.curriculum(...), got {cur!r}")
        if cur.scores is not None and cur.scores.shape != (num_clients, max_size):
            raise ValueError(f"curriculum scores must have shape {(num_clients, max_size)}, got {cur.scores.shape}")
        self.cur, self.max_size, self.batch_size = cur, max_size, batch_size
        self.k = min(batch_size, max_size)

    def ranks(self, client_id, n, key_data, loss_rows):
        """Rank of each of the client's rows in its order (padding rows last). ``loss_rows()`` gives
        the received model's per-example losses (called only without fixed scores)."""
        cur = self.cur
        valid = jnp.arange(self.max_size) < n
        if cur.ordering == "random":
            s = _rng.uniform(key_data, _ORDER_STREAM, size=self.max_size)
        else:
            s = loss_rows() if cur.scores is None else jnp.asarray(cur.scores)[client_id]
            s = -s if cur.ordering == "anti" else s
        order = jnp.argsort(jnp.where(valid, s, jnp.inf), stable=True)
        return jnp.zeros((self.max_size,), jnp.int32).at[order].set(jnp.arange(self.max_size, dtype=jnp.int32))

    def batch(self, ranks, n, s, num_steps, key_data):
        """Row indices (within the client) and validity of step ``s``'s minibatch."""
        m = pool_size(self.cur.pacing, self.cur.a, self.cur.b, s, num_steps, n)
        u = _rng.uniform(key_data, _BATCH_STREAM, s, size=self.max_size)
        _, rows = jax.lax.top_k(-(u + 2.0 * (ranks >= m)), self.k)
        valid = ranks[rows] < m
        if self.k < self.batch_size:  # a batch larger than the padded client: pad with masked rows
            pad = self.batch_size - self.k
            rows = jnp.concatenate([rows, jnp.zeros((pad,), rows.dtype)])
            valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
        return rows, valid
