"""XLA compilation in experiment runs: the persistent cache the CLI turns on, and a compile counter.

The ``jaxopt-lab`` CLI enables JAX's persistent compilation cache by default, so
a program compiled once (by an earlier run, or by another variant of the same
config whose program is the same) is loaded from disk instead of compiled
again. The cache folder is, in order of precedence:

1. whatever JAX was already told (``JAX_COMPILATION_CACHE_DIR`` or
   ``jax.config.update("jax_compilation_cache_dir", ...)``): left as it is;
2. ``$JAXOPT_LAB_CACHE_DIR``;
3. ``$XDG_CACHE_HOME/jaxopt_lab/xla``, by default ``~/.cache/jaxopt_lab/xla``.

``jaxopt-lab run|resume|sweep --no-compile-cache`` turns it off (nothing is
read or written). The folder is safe to delete at any time; entries are keyed
by the program, the compile options, the JAX/XLA version and the device, so a
stale one is never used. Like any JAX compilation cache it is trusted: do not
point it at a folder others can write.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import jax

ENV_DIR = "JAXOPT_LAB_CACHE_DIR"
# Programs that compile faster than this are not written (JAX's default is 1 s, which on
# CPU leaves out most of an experiment's programs: model init, eval step, a small model's step).
MIN_COMPILE_SECS = 0.1
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> str:
    """``$JAXOPT_LAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxopt_lab/xla`` (``~/.cache/jaxopt_lab/xla``)."""
    if os.environ.get(ENV_DIR):
        return os.path.expanduser(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxopt_lab", "xla")


def configure_cache(enabled: bool = True) -> str | None:
    """Turn JAX's persistent compilation cache on (in :func:`default_cache_dir` unless JAX already
    has a folder) or off; returns the folder in use, or None when off.

    Call before the first compile: JAX opens its cache once per process.
    """
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    path = jax.config.jax_compilation_cache_dir
    if not path:
        path = default_cache_dir()
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:  # an unwritable home: run without the cache rather than fail
            return None
        jax.config.update("jax_compilation_cache_dir", path)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return path


@dataclasses.dataclass
class CompileCounter:
    """Counts XLA compiles (``jax.monitoring``'s backend-compile events) while active.

    A program loaded from the persistent cache counts too (as a compile and as a
    ``cache_hit``): the event times the whole ``compile_or_get_cached`` call.

        with CompileCounter() as c:
            ...
        c.count, c.seconds, c.by_name, c.cache_hits
    """

    count: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    by_name: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration
            self.by_name[str(kwargs.get("fun_name", "?"))] += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)
