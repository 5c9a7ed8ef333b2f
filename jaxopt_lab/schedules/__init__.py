"""Learning-rate schedules, and rescaling them with the batch size."""

from jaxopt_lab.schedules.batch_size import (
    batch_scale,
    linear_scaled_learning_rate,
    predicted_max_learning_rate,
    regime_adaptation,
    rescale_config,
    scaling_rule,
    sqrt_scaled_learning_rate,
    steps_for_batch,
)

from jaxopt_lab.schedules.refined import (
    grad_norms_from_run,
    median_smooth,
    refined_schedule,
    refined_schedule_from_run,
    refined_schedule_weights,
)

__all__ = [
    "batch_scale",
    "linear_scaled_learning_rate",
    "predicted_max_learning_rate",
    "regime_adaptation",
    "rescale_config",
    "scaling_rule",
    "sqrt_scaled_learning_rate",
    "steps_for_batch",
    "grad_norms_from_run",
    "median_smooth",
    "refined_schedule",
    "refined_schedule_from_run",
    "refined_schedule_weights",
]
