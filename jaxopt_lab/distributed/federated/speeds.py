"""Client compute speeds: homogeneous, log-normal (heterogeneous hardware), or given.

A client of speed :math:`v_k` takes ``step_time / v_k`` simulated seconds per
local step, so a 10x spread in speeds is a 10x spread in round-trip times for
the same work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxopt_lab.distributed.federated._checks import check_int, check_per_client, check_real

SPEED_DISTRIBUTIONS = ("homogeneous", "lognormal")


def client_speeds(
    num_clients: int,
    distribution: str | Sequence[float] = "homogeneous",
    *,
    sigma: float = 1.0,
    max_spread: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    r"""Per-client compute speeds, seeded.

    - ``"homogeneous"``: every speed is 1.
    - ``"lognormal"``: :math:`v_k = \exp(\sigma z_k)`, :math:`z_k \sim N(0, 1)`
      from ``numpy.random.default_rng(seed)``, with :math:`\log v_k` clipped to
      :math:`\pm \tfrac12 \log(\text{max\_spread})` so the fastest client is at
      most ``max_spread`` times faster than the slowest (median speed 1).
    - a sequence of ``num_clients`` positive numbers: used as given.

    Args:
      num_clients: N >= 1.
      distribution: one of the names above or the speeds themselves.
      sigma: log-normal scale (>= 0).
      max_spread: largest allowed ratio fastest/slowest (>= 1).
      seed: non-negative seed of the log-normal draw.

    Returns:
      float64 array of shape ``(num_clients,)``, all > 0.
    """
    num_clients = check_int("num_clients", num_clients, 1)
    if isinstance(distribution, str):
        if distribution not in SPEED_DISTRIBUTIONS:
            raise ValueError(f"speeds must be one of {SPEED_DISTRIBUTIONS} or a sequence of numbers, got {distribution!r}")
        if distribution == "homogeneous":
            return np.ones((num_clients,))
        sigma = check_real("speed_sigma", sigma)
        if sigma < 0:
            raise ValueError(f"speed_sigma must be >= 0, got {sigma}")
        max_spread = check_real("max_speed_spread", max_spread)
        if max_spread < 1:
            raise ValueError(f"max_speed_spread must be >= 1, got {max_spread}")
        seed = check_int("seed", seed, 0)
        half = 0.5 * np.log(max_spread)
        z = np.random.default_rng(seed).standard_normal(num_clients)
        return np.exp(np.clip(sigma * z, -half, half))
    return check_per_client("speeds", distribution, num_clients, positive=True)
