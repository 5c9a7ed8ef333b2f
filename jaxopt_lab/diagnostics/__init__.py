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
from jaxopt_lab.diagnostics.sharpness import directional_sharpness, edge_of_stability
from jaxopt_lab.diagnostics.trace import hutchinson_trace

__all__ = [
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
