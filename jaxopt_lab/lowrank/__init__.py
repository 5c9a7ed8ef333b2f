"""Memory-efficient low-rank training: one projector protocol, small methods over it.

``galore`` / ``fira`` / ``q_galore`` / ``apollo`` / ``gradnorm_lorp`` (and their
``scale_by_*`` directions) wrap any optax inner optimizer (Q-GaLore's default,
``scale_by_adam_8bit``, stores Adam's moments in 8 bits as bitsandbytes); ``stable_spam`` is
the full-rank stabilized Adam of the same family of papers; projectors live in
:mod:`jaxopt_lab.lowrank.projectors`; :func:`optimizer_state_bytes` reports
what a state holds.
"""

from jaxopt_lab.lowrank._projected import LowRankState, default_label_fn, scale_by_projected
from jaxopt_lab.lowrank.adam8bit import ScaleByAdam8bitState, scale_by_adam_8bit
from jaxopt_lab.lowrank.apollo import apollo, apollo_mini, scale_by_apollo
from jaxopt_lab.lowrank.fira import FiraLimiterState, fira, scale_by_fira
from jaxopt_lab.lowrank.galore import galore, scale_by_galore
from jaxopt_lab.lowrank.gradnorm_lorp import (
    WeightNormParts,
    WeightNormState,
    gradnorm_lorp,
    scale_by_gradnorm_lorp,
    weight_normalized,
)
from jaxopt_lab.lowrank.kernels_as_matrices import kernels_as_matrices
from jaxopt_lab.lowrank.memory import optimizer_state_bytes, state_bytes_report
from jaxopt_lab.lowrank.projectors import (
    Projector,
    dct_projector,
    int4_projector,
    random_projector,
    randomized_svd_projector,
    svd_projector,
)
from jaxopt_lab.lowrank.q_galore import (
    Int8WeightsState,
    LazyRefreshState,
    int8_weights,
    q_galore,
    scale_by_q_galore,
    stochastic_round_int8,
    stochastic_round_uint8,
)
from jaxopt_lab.lowrank.stable_spam import ScaleByStableSpamState, scale_by_stable_spam, stable_spam

__all__ = [
    "FiraLimiterState", "Int8WeightsState", "LazyRefreshState", "LowRankState", "Projector",
    "ScaleByAdam8bitState", "ScaleByStableSpamState", "WeightNormParts", "WeightNormState", "apollo", "apollo_mini", "dct_projector",
    "default_label_fn", "fira", "galore", "gradnorm_lorp", "int4_projector", "int8_weights", "kernels_as_matrices",
    "optimizer_state_bytes", "q_galore", "random_projector", "randomized_svd_projector", "scale_by_adam_8bit", "scale_by_apollo",
    "scale_by_fira", "scale_by_galore", "scale_by_gradnorm_lorp", "scale_by_projected", "scale_by_q_galore",
    "scale_by_stable_spam", "stable_spam", "state_bytes_report", "stochastic_round_int8", "stochastic_round_uint8", "svd_projector",
    "weight_normalized",
]
