"""jaxopt_lab: optimization methods of recent papers as pure optax transformations.

The public API is flat, like optax: ``jaxopt_lab.<transform>``. Data sets,
models and the experiment runner live in their subpackages
(``jaxopt_lab.data``, ``jaxopt_lab.models``, ``jaxopt_lab.experiment``).
"""

from jaxopt_lab.distributed.data_parallel import DataParallelState, data_parallel
from jaxopt_lab.distributed.local_sgd import LocalSGDState, local_sgd
from jaxopt_lab.distributed.streaming_diloco import StreamingDiLoCoState, streaming_diloco
from jaxopt_lab.distributed.gossip import GossipState, gossip
from jaxopt_lab.distributed.dfedsam import DFedSAMState, dfedsam
from jaxopt_lab.distributed.compression import dgc, econtrol, quantize, top_k
from jaxopt_lab.distributed.choco_gossip import ChocoGossipState, choco_gossip
from jaxopt_lab.distributed.diloco import DiLoCoState, diloco, diloco_inner, diloco_outer
from jaxopt_lab.lowrank import FiraLimiterState, LowRankState, fira, galore, scale_by_fira, scale_by_galore
from jaxopt_lab.transforms import (
    DeltaSGDState,
    delta_sgd,
    scale_by_delta_sgd,
    EntropySGDState,
    entropy_sgd,
    scale_by_entropy_sgd,
    AddScaledParamsState,
    OrthogonalGradState,
    ScaleByAdamPState,
    ScaleByDiffGradState,
    ScaleBySGDPState,
    adamp,
    clip_by_coordinate,
    diffgrad,
    independent_weight_decay,
    orthogonal_grad,
    perp_adamw,
    scale_by_adamp,
    scale_by_diffgrad,
    scale_by_sgdp,
    sgdp,
)

__version__ = "0.1.0"

__all__ = [
    "DeltaSGDState",
    "delta_sgd",
    "scale_by_delta_sgd",
    "FiraLimiterState",
    "LowRankState",
    "fira",
    "galore",
    "scale_by_fira",
    "scale_by_galore",
    "ChocoGossipState",
    "choco_gossip",
    "EntropySGDState",
    "entropy_sgd",
    "scale_by_entropy_sgd",
    "dgc",
    "econtrol",
    "quantize",
    "top_k",
    "GossipState",
    "gossip",
    "DFedSAMState",
    "dfedsam",
    "StreamingDiLoCoState",
    "streaming_diloco",
    "LocalSGDState",
    "local_sgd",
    "DataParallelState",
    "DiLoCoState",
    "AddScaledParamsState",
    "OrthogonalGradState",
    "ScaleByAdamPState",
    "ScaleByDiffGradState",
    "ScaleBySGDPState",
    "adamp",
    "clip_by_coordinate",
    "diffgrad",
    "independent_weight_decay",
    "perp_adamw",
    "scale_by_adamp",
    "scale_by_diffgrad",
    "scale_by_sgdp",
    "sgdp",
    "data_parallel",
    "diloco",
    "diloco_inner",
    "diloco_outer",
    "orthogonal_grad",
]
