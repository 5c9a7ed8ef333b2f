"""Projectors for low-rank gradient methods: one protocol, several bases.

See :mod:`jaxopt_lab.lowrank.projectors.base` for the protocol.
"""

from jaxopt_lab.lowrank.projectors.base import BasisState, Projector, basis_projector, project_onto, transposed
from jaxopt_lab.lowrank.projectors.dct import DCTState, dct_columns, dct_matrix, dct_projector
from jaxopt_lab.lowrank.projectors.int4 import Int4State, dequantize_int4, int4_projector, quantize_int4
from jaxopt_lab.lowrank.projectors.random import RandomState, random_matrix, random_projector
from jaxopt_lab.lowrank.projectors.randomized_svd import randomized_svd_projector
from jaxopt_lab.lowrank.projectors.svd import canonical_signs, svd_projector

PROJECTORS = {
    "svd": svd_projector,
    "svd_gram": lambda: svd_projector("gram"),
    "svd_lapack": lambda: svd_projector("svd"),
    "randomized_svd": randomized_svd_projector,
    "dct": dct_projector,
    "random": random_projector,
}


def get_projector(projector) -> Projector:
    """A Projector from itself or its name (``"svd"``, ``"svd_gram"``, ``"svd_lapack"``,
    ``"randomized_svd"``, ``"dct"``, ``"random"``, or ``"int4_<name>"`` for int4 storage, asymmetric
    as Q-GaLore, ``"int4_sym_<name>"`` symmetric)."""
    if isinstance(projector, Projector):
        return projector
    if isinstance(projector, str):
        name = projector
        if name.startswith("int4_sym_") and name[9:] in PROJECTORS:
            return int4_projector(PROJECTORS[name[9:]](), symmetric=True)
        if name.startswith("int4_") and name[5:] in PROJECTORS:
            return int4_projector(PROJECTORS[name[5:]]())
        if name in PROJECTORS:
            return PROJECTORS[name]()
    raise ValueError(
        f"projector must be a Projector or one of {sorted(PROJECTORS)} (optionally prefixed 'int4_' or 'int4_sym_'), got {projector!r}"
    )


__all__ = [
    "BasisState", "DCTState", "Int4State", "PROJECTORS", "Projector", "RandomState", "basis_projector",
    "canonical_signs", "dct_columns", "dct_matrix", "dct_projector", "dequantize_int4", "get_projector",
    "int4_projector", "project_onto", "quantize_int4", "random_matrix", "random_projector",
    "randomized_svd_projector", "svd_projector", "transposed",
]
