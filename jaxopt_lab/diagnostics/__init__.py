"""Loss-landscape diagnostics from Hessian-vector products (pure, jit-able, pytree params), and training-dynamics
monitors (instability proxies, opposing signals)."""

from jaxopt_lab.diagnostics.eigen import top_eigenvalue
from jaxopt_lab.diagnostics.hvp import hvp
from jaxopt_lab.diagnostics.instability import (
    instability_metrics,
    log_partition,
    lr_sensitivity,
    max_attention_logit,
    output_logit_divergence,
)
from jaxopt_lab.diagnostics.opposing_signals import (
    OpposingSignals,
    group_losses,
    largest_loss_changes,
    opposing_signals,
    opposing_signals_from_gradients,
    per_example_gradients,
)
from jaxopt_lab.diagnostics.sharpness import directional_sharpness, edge_of_stability
from jaxopt_lab.diagnostics.trace import hutchinson_trace

__all__ = [
    "OpposingSignals",
    "group_losses",
    "largest_loss_changes",
    "opposing_signals",
    "opposing_signals_from_gradients",
    "per_example_gradients",
    "directional_sharpness",
    "edge_of_stability",
    "hutchinson_trace",
    "hvp",
    "instability_metrics",
    "log_partition",
    "lr_sensitivity",
    "max_attention_logit",
    "output_logit_divergence",
    "top_eigenvalue",
]
