"""Single-worker transformations (one method per file)."""

from jaxopt_lab.transforms.orthogonal_grad import OrthogonalGradState, orthogonal_grad

__all__ = ["OrthogonalGradState", "orthogonal_grad"]
