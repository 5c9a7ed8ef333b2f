"""The few JAX APIs that moved between the versions we support, wrapped once."""

from __future__ import annotations

import jax

try:  # JAX >= 0.6: public, with check_vma
    _shard_map = jax.shard_map
    _CHECK = "check_vma"
except AttributeError:  # older JAX
    from jax.experimental.shard_map import shard_map as _shard_map

    _CHECK = "check_rep"


def shard_map(f, *, mesh, in_specs, out_specs, check: bool = False):
    """``jax.shard_map`` across versions; ``check`` maps to check_vma / check_rep."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK: check})
