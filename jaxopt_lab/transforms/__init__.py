"""Single-worker transformations (one method per file)."""

from jaxopt_lab.transforms.adamp import ScaleByAdamPState, ScaleBySGDPState, adamp, scale_by_adamp, scale_by_sgdp, sgdp
from jaxopt_lab.transforms.delta_sgd import DeltaSGDState, delta_sgd, scale_by_delta_sgd
from jaxopt_lab.transforms.entropy_sgd import (
    EntropySGDMomentumState,
    EntropySGDState,
    entropy_sgd,
    scale_by_entropy_sgd,
)
from jaxopt_lab.transforms.diffgrad import ScaleByDiffGradState, diffgrad, scale_by_diffgrad
from jaxopt_lab.transforms.orthogonal_grad import OrthogonalGradState, orthogonal_grad
from jaxopt_lab.transforms.perp_adamw import perp_adamw
from jaxopt_lab.transforms.gradient_normalized_smoothness import (
    GNSState,
    gradient_normalized_smoothness,
    scale_by_gradient_normalized_smoothness,
)
from jaxopt_lab.transforms.sso import SSOState, scale_by_sso, sso
from jaxopt_lab.transforms.tpsgd import TPSGDState, scale_by_target_projection, target_projection_grad, tpsgd
from jaxopt_lab.transforms.tract import conv_patches, scale_by_tract, tract
from jaxopt_lab.transforms.weight_decay import AddScaledParamsState, clip_by_coordinate, independent_weight_decay

__all__ = [
    "GNSState",
    "gradient_normalized_smoothness",
    "scale_by_gradient_normalized_smoothness",
    "SSOState",
    "scale_by_sso",
    "sso",
    "TPSGDState",
    "scale_by_target_projection",
    "tpsgd",
    "target_projection_grad",
    "conv_patches",
    "scale_by_tract",
    "tract",
    "DeltaSGDState",
    "delta_sgd",
    "scale_by_delta_sgd",
    "EntropySGDMomentumState",
    "EntropySGDState",
    "entropy_sgd",
    "scale_by_entropy_sgd",
    "AddScaledParamsState",
    "OrthogonalGradState",
    "ScaleByAdamPState",
    "ScaleByDiffGradState",
    "ScaleBySGDPState",
    "adamp",
    "clip_by_coordinate",
    "diffgrad",
    "independent_weight_decay",
    "orthogonal_grad",
    "perp_adamw",
    "scale_by_adamp",
    "scale_by_diffgrad",
    "scale_by_sgdp",
    "sgdp",
]
