"""Step caches for the Z-Image main layers: First Block Cache, TeaCache and DBCache (issue #6).

Parts, each readable alone:

- ``config.py``   one immutable config per method (:class:`FBCacheConfig`, :class:`TeaCacheConfig`,
                  :class:`DBCacheConfig`), :meth:`CacheConfig.for_method`, :func:`from_request`.
- ``policy.py``   the pure decision: (step, window, counters, measured change) → compute or reuse, with a reason.
- ``state.py``    per-request state and the wrapper around the 30 main layers (head, decision, reuse or middle, tail).
- ``stats.py``    per-evaluation records and the ``stats["cache"]`` summary.
- ``reference.py`` / ``triton_kernels.py`` / ``ops.py``  the metric (Σ|a−b|, Σ|b| in one pass) and the residual
                  apply, torch reference and Triton kernels behind the project's op switch.
- ``teacache.py`` / ``calibrate.py`` / ``tea_coefficients.json``  TeaCache's per-model coefficients and the tool that
                  fits them.

Semantics (../shared/docs/decisions.md): higher thresholds reuse more for every method; the first step of a run and
the last step always compute; caching only inside the request's window; at most ``max_consecutive`` reused steps in
a row; DBCache refreshes on a fixed grid every ``skip_interval`` steps; CFG halves share one decision; a change of
batch shape resets; all state is per request.
"""

from .config import (
    CONFIGS,
    DB_DEFAULT_SPLIT,
    CacheConfig,
    DBCacheConfig,
    FBCacheConfig,
    TeaCacheConfig,
    from_request,
)
from .ops import CacheOps, cache_ops
from .policy import Counters, Decision, Rules, StepInfo, decide, forced
from .state import CacheState

__all__ = [
    "CONFIGS",
    "DB_DEFAULT_SPLIT",
    "CacheConfig",
    "CacheOps",
    "CacheState",
    "Counters",
    "DBCacheConfig",
    "Decision",
    "FBCacheConfig",
    "Rules",
    "StepInfo",
    "TeaCacheConfig",
    "cache_ops",
    "decide",
    "forced",
    "from_request",
]
