"""Learning-rate schedules."""

from jaxopt_lab.schedules.refined import (
    grad_norms_from_run,
    median_smooth,
    refined_schedule,
    refined_schedule_from_run,
    refined_schedule_weights,
)

__all__ = [
    "grad_norms_from_run",
    "median_smooth",
    "refined_schedule",
    "refined_schedule_from_run",
    "refined_schedule_weights",
]
