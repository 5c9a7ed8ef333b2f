"""Multi-worker training: methods written once over a named worker axis, and the runner.

Asynchronous and federated methods (event-driven simulator, FedAvg/FedBuff/FedAsync/FedFix/
FedCompass, delayed Nesterov) are in :mod:`jaxopt_lab.distributed.federated`.
"""

from jaxopt_lab.distributed.accounting import ByteCount, CommBytes, communicated_bytes, tree_bytes, wire_bytes
from jaxopt_lab.distributed.data_parallel import DataParallelState, data_parallel
from jaxopt_lab.distributed.local_sgd import LocalSGDState, local_sgd, qsr_period
from jaxopt_lab.distributed.local_scaling import (
    LocalScalingState,
    hutchinson_diagonal,
    local_scaling,
    local_scaling_server,
    scaled_local_update,
)
from jaxopt_lab.distributed.streaming_diloco import StreamingDiLoCoState, streaming_diloco
from jaxopt_lab.distributed.gossip import GossipState, consensus_distance, gossip, mix
from jaxopt_lab.distributed.dfedsam import DFedSAMState, dfedsam
from jaxopt_lab.distributed.topology import TOPOLOGIES, Topology, complete, exponential, ring, torus2d
from jaxopt_lab.distributed.compression import Compressor, compressed_pmean, dgc, econtrol, identity, quantize, sketch, top_k
from jaxopt_lab.distributed.choco_gossip import ChocoGossipState, choco_gossip
from jaxopt_lab.distributed.diloco import DiLoCoState, diloco, diloco_inner, diloco_outer
from jaxopt_lab.distributed.dadao import DADAOState, dadao_events, graph_constants, graph_edges, run_dadao
from jaxopt_lab.distributed.gradient_coding import GradientCode, coded_psum, decoding_vector, encode, gradient_code
from jaxopt_lab.distributed.multiplexed_sgc import MultiplexedSGC, follows_bursty_model, multiplexed
from jaxopt_lab.distributed.sequential_gradient_coding import (
    SGCScheme,
    plain_gc,
    selective_repetition,
    unit_times,
    wait_for_all,
)
from jaxopt_lab.distributed.dipaco import DiPaCoState, dipaco, grid_paths, module_bytes
from jaxopt_lab.distributed.sync import next_sync
from jaxopt_lab.distributed.workers import SyncedStep, WorkerRunner
from jaxopt_lab.distributed import collectives, federated

__all__ = [
    "DADAOState",
    "dadao_events",
    "graph_constants",
    "graph_edges",
    "run_dadao",
    "GradientCode",
    "SGCScheme",
    "MultiplexedSGC",
    "follows_bursty_model",
    "coded_psum",
    "decoding_vector",
    "encode",
    "gradient_code",
    "multiplexed",
    "plain_gc",
    "selective_repetition",
    "unit_times",
    "wait_for_all",
    "collectives",
    "federated",
    "ChocoGossipState",
    "choco_gossip",
    "Compressor",
    "compressed_pmean",
    "dgc",
    "econtrol",
    "identity",
    "quantize",
    "sketch",
    "top_k",
    "GossipState",
    "consensus_distance",
    "gossip",
    "mix",
    "DFedSAMState",
    "dfedsam",
    "TOPOLOGIES",
    "Topology",
    "complete",
    "exponential",
    "ring",
    "torus2d",
    "StreamingDiLoCoState",
    "streaming_diloco",
    "LocalSGDState",
    "local_sgd",
    "qsr_period",
    "LocalScalingState",
    "hutchinson_diagonal",
    "local_scaling",
    "local_scaling_server",
    "scaled_local_update",
    "ByteCount",
    "CommBytes",
    "DataParallelState",
    "DiLoCoState",
    "WorkerRunner",
    "SyncedStep",
    "next_sync",
    "communicated_bytes",
    "data_parallel",
    "diloco",
    "diloco_inner",
    "diloco_outer",
    "DiPaCoState",
    "dipaco",
    "grid_paths",
    "module_bytes",
    "tree_bytes",
    "wire_bytes",
]
