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
- ``registry.py`` the one list of methods (config class, request switch and fields, CLI flags) and calibrators;
                  the request schema, the CLI and ``from_request`` read it.
- ``taylorseer.py`` / ``foca.py``  calibrators: forecast the cached residual on a reused step.
- ``masks.py``    step masks (steps that must compute; static or dynamic policy).
- ``presets.py``  named presets (quality, balanced, fast, ultra, max) from the measured Pareto front.
- ``velocity.py`` the velocity cache with drift correction (library-only; the ``max`` preset).
- ``teacache.py`` / ``tea_coefficients.json``  TeaCache's per-model coefficients (the fitting tool is
                  ``python -m zimage_bench calibrate``: this package sits below the pipeline and imports none of it).

Semantics: higher thresholds reuse more for every method; the first step of a run and
the last step always compute; caching only inside the request's window; at most ``max_consecutive`` reused steps in
a row; DBCache refreshes on a fixed grid every ``skip_interval`` steps; CFG halves share one decision
(``cfg_split``: one each); a change of batch shape resets; all state is per request.
"""

from .config import (
    CONFIGS,
    DB_DEFAULT_SPLIT,
    CacheConfig,
    DBCacheConfig,
    FBCacheConfig,
    TeaCacheConfig,
)
from .foca import FoCa
from .masks import StepMask
from .policy import Counters, Decision, Rules, StepInfo, decide, forced
from .presets import PRESETS, from_request, preset_config
from .registry import CALIBRATORS, METHODS, CacheMethod, Option
from .state import CacheState, StepCache, StepCacheState, relative_change
from .taylorseer import TaylorSeer
from .velocity import VelocityCacheConfig, VelocityCacheState

__all__ = [
    "VelocityCacheConfig",
    "VelocityCacheState",
    "CALIBRATORS",
    "CONFIGS",
    "METHODS",
    "PRESETS",
    "CacheMethod",
    "FoCa",
    "Option",
    "StepMask",
    "TaylorSeer",
    "preset_config",
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
