"""Memory-efficient low-rank training: one projector protocol, small methods over it.

``galore`` / ``fira`` (and their ``scale_by_*`` directions) wrap any optax
inner optimizer; projectors live in :mod:`jaxopt_lab.lowrank.projectors`;
:func:`optimizer_state_bytes` reports what a state holds.
"""

from jaxopt_lab.lowrank._projected import LowRankState, default_label_fn, scale_by_projected
from jaxopt_lab.lowrank.fira import FiraLimiterState, fira, scale_by_fira
from jaxopt_lab.lowrank.galore import galore, scale_by_galore
from jaxopt_lab.lowrank.memory import optimizer_state_bytes, state_bytes_report
from jaxopt_lab.lowrank.projectors import (
    Projector,
    dct_projector,
    int4_projector,
    random_projector,
    randomized_svd_projector,
    svd_projector,
)

__all__ = [
    "FiraLimiterState", "LowRankState", "Projector", "dct_projector", "default_label_fn", "fira",
    "galore", "int4_projector", "optimizer_state_bytes", "random_projector", "randomized_svd_projector",
    "scale_by_fira", "scale_by_galore", "scale_by_projected", "state_bytes_report", "svd_projector",
]
