"""Classification losses and loss-side diagnostics (one method per file)."""

from jaxopt_lab.losses.noisy_softmax import noisy_softmax_cross_entropy, noisy_softmax_logits
from jaxopt_lab.losses.softmax_collapse import softmax_collapse_fraction
from jaxopt_lab.losses.stablemax import log_stable_max, stable_max, stable_max_cross_entropy
from jaxopt_lab.losses.z_loss import z_loss

__all__ = [
    "log_stable_max",
    "noisy_softmax_cross_entropy",
    "noisy_softmax_logits",
    "softmax_collapse_fraction",
    "stable_max",
    "stable_max_cross_entropy",
    "z_loss",
]
