"""Compressors for what workers send: quantization, top-k, DGC, EControl, sketching; a compressed all-reduce mean.

Each compressor is a :class:`Compressor` ``(init, compress)`` written for one
worker; :func:`compressed_pmean` runs one over a named worker axis and returns
the payload bytes for ``jaxopt_lab.distributed.accounting.add_pmean_bytes(...,
compressed=True)`` (wire: an all-gather of the payloads).
"""

from jaxopt_lab.distributed.compression.base import Compressor, compressed_pmean, identity
from jaxopt_lab.distributed.compression.dgc import DGC_SPARSITY_SCHEDULE, DGCState, dgc
from jaxopt_lab.distributed.compression.econtrol import EControlState, econtrol
from jaxopt_lab.distributed.compression.quantize import FORMATS, QuantizeState, e3m0_grid, quantize
from jaxopt_lab.distributed.compression.sketch import SKETCHES, SketchState, dp_sigma, sketch
from jaxopt_lab.distributed.compression.topk import TopKState, top_k

__all__ = [
    "Compressor",
    "DGCState",
    "DGC_SPARSITY_SCHEDULE",
    "EControlState",
    "FORMATS",
    "QuantizeState",
    "SKETCHES",
    "SketchState",
    "TopKState",
    "compressed_pmean",
    "dgc",
    "dp_sigma",
    "e3m0_grid",
    "econtrol",
    "identity",
    "quantize",
    "sketch",
    "top_k",
]
