"""Counter-based random numbers for the simulator's scheduling (client choice, jitter, dropout).

Every draw is a pure function of ``(seed key, stream tag, counters...)``, so a
run is reproducible and resumable from its counters alone. The mixing function
is the "lowbias32" integer hash (Chris Wellons, hash-prospector), applied in a
chain over the counters: a handful of integer ops, where ``jax.random``'s
threefry costs seconds of XLA compile time per call site inside a scan. It is
statistically sound for simulation, not cryptographic. Local training gets
ordinary JAX PRNG key data (:func:`key_data`).
"""

from __future__ import annotations

import jax.numpy as jnp

_GOLDEN = 0x9E3779B9
_LANE = 0x85EBCA6B


def _mix(x):
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def bits(key, *counters, size: int | None = None):
    """uint32 hash of the key (uint32 ``(2,)``) and integer counters; ``size``: a vector over lanes."""
    h = _mix(key[0] ^ _mix(key[1] + jnp.uint32(_GOLDEN)))
    for c in counters:
        h = _mix(h ^ (jnp.asarray(c).astype(jnp.uint32) * jnp.uint32(_GOLDEN) + jnp.uint32(0x632BE5AB)))
    if size is not None:
        h = _mix(h ^ ((jnp.arange(size, dtype=jnp.uint32) + jnp.uint32(1)) * jnp.uint32(_LANE)))
    return h


def uniform(key, *counters, size: int | None = None):
    """float32 uniform in [0, 1) with 24 random bits."""
    return (bits(key, *counters, size=size) >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def normal(key, *counters):
    """A standard normal (Box-Muller on two independent uniforms)."""
    u1 = 1.0 - uniform(key, *counters, 0)  # (0, 1]
    u2 = uniform(key, *counters, 1)
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)


def key_data(key, *counters):
    """A uint32 ``(2,)`` JAX PRNG key (threefry key data) for the given counters."""
    return jnp.stack([bits(key, *counters, 0), bits(key, *counters, 1)])
