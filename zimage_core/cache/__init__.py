"""Step caches for the Z-Image main layers: First Block Cache, TeaCache and DBCache.

Parts, each readable alone:

- ``config.py``   one immutable config per method (:class:`FBCacheConfig`, :class:`TeaCacheConfig`,
                  :class:`DBCacheConfig`), :meth:`CacheConfig.for_method`, :func:`from_request`.
- ``policy.py``   the pure decision: (step, window, counters, measured change) → compute or reuse, with a reason.
- ``state.py``    per-request state: the innermost hook of the chain around the 30 main layers (head, decision, reuse
                  or middle, tail), the :class:`StepCache` / :class:`StepCacheState` contract ``generate`` relies on.
- ``stats.py``    per-evaluation records and the ``stats["cache"]`` summary.
- the metric (Σ|a−b|, Σ|b| in one pass) and the residual apply are ops of the one op switch
  (``zimage_kernels.Ops.l1_sums`` / ``apply_residual``: ``zimage_kernels/reference.py`` and
  ``zimage_kernels/step_cache.py``).
- ``teacache.py`` / ``calibrate.py`` / ``tea_coefficients.json``  TeaCache's per-model coefficients and the tool that
                  fits them.

Semantics: higher thresholds reuse more for every method; the first step of a run and
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
from .policy import Counters, Decision, Rules, StepInfo, decide, forced
from .state import CacheState, StepCache, StepCacheState, relative_change

__all__ = [
    "CONFIGS",
    "DB_DEFAULT_SPLIT",
    "CacheConfig",
    "CacheState",
    "Counters",
    "DBCacheConfig",
    "Decision",
    "FBCacheConfig",
    "Rules",
    "StepCache",
    "StepCacheState",
    "StepInfo",
    "TeaCacheConfig",
    "relative_change",
    "decide",
    "forced",
    "from_request",
]
