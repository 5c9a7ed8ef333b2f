"""jaxopt_lab: optimization methods of recent papers as pure optax transformations.

The public API is flat, like optax: ``jaxopt_lab.<transform>``. Data sets,
models and the experiment runner live in their subpackages
(``jaxopt_lab.data``, ``jaxopt_lab.models``, ``jaxopt_lab.experiment``).
"""

from jaxopt_lab.transforms.orthogonal_grad import OrthogonalGradState, orthogonal_grad

__version__ = "0.1.0"

__all__ = ["OrthogonalGradState", "orthogonal_grad"]
