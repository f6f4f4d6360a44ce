"""Named step-cache presets a user can pick without knowing thresholds: ``quality``, ``balanced``, ``fast``,
``ultra``, ``max``.

Each is one point on the Pareto front measured by ``python -m zimage_bench cache --sweep`` (``docs/cache-presets.md``
has the table, the command and the model it was measured on). They are library configs, so they may use knobs the
request API does not expose (a calibrator, a step mask, a consecutive cap above the API's 5). In a request they
are the extension field ``acceleratorOptions.cachePreset`` (not in the spec); the request's cache window still
applies.
"""

from __future__ import annotations

from dataclasses import replace

from .config import CacheConfig
from .masks import StepMask
from .registry import method as lookup_method
from .velocity import VelocityCacheConfig

# name -> (method, config keyword arguments). Picked from the sweep's front so that each was >= 45 dB on every one of
# the first 8 held-out captions at 50 steps with CFG; on all 48 held-out captions each is >= 45 dB in the mean, with
# 1-4 captions below (docs/cache-presets.md).
STATIC = 100  # a static mask decides the pattern: the consecutive cap only has to stay out of its way
PRESETS: dict[str, tuple[str, dict]] = {
    "quality": ("tea", {"threshold": 0.1, "max_consecutive": 3, "calibrator": "taylorseer1"}),
    "balanced": ("tea", {"threshold": 0.5, "max_consecutive": 3, "calibrator": "taylorseer2"}),
    "fast": (
        "tea",
        {"max_consecutive": STATIC, "calibrator": "taylorseer2", "mask": StepMask(warmup=3, every=5, policy="static")},
    ),
    "ultra": ("tea", {"threshold": 1.0, "max_consecutive": 4, "calibrator": "taylorseer2"}),
    # the velocity cache (velocity.py): the first step, then every 7th (8 of 50: 6.25x), drift correction 0.5
    "max": (
        "velocity",
        {"mask": StepMask(warmup=1, every=7, policy="static"), "correction": 0.5, "correction_power": 1.0},
    ),
}


def make_config(method: str, *, pipe=None, model_preset: str | None = None, **kw) -> CacheConfig:
    """A config by method name: a registered method (``CacheConfig.for_method``) or ``velocity`` (the library-only
    velocity cache, ``velocity.py``, which has no request switch)."""
    if method == "velocity":
        return VelocityCacheConfig(**kw)
    return CacheConfig.for_method(method, pipe=pipe, preset=model_preset, **kw)


def preset_config(name: str, *, pipe=None, model_preset: str | None = None, window=None) -> CacheConfig:
    """The config of preset ``name`` (with ``pipe``: TeaCache's calibrated coefficients for that model)."""
    if name not in PRESETS:
        raise ValueError(f"unknown cache preset {name!r}; known: {', '.join(PRESETS)}")
    method, kw = PRESETS[name]
    cfg = make_config(method, pipe=pipe, model_preset=model_preset, **kw)
    return replace(cfg, window=window) if window is not None else cfg


__all__ = ["PRESETS", "make_config", "preset_config"]


def from_request(cache: dict, window: tuple[int, int] | None, steps: int, pipe=None, preset: str | None = None):
    """The config for a validated request (``zimage_core.service.request``: ``{"method", "max_consecutive", <each
    registered option's config attribute>}`` or ``{"preset": name}``, and the resolved half-open window). ``steps``
    is checked against the window. ``preset`` here is the *model* preset (TeaCache coefficients)."""
    if window is not None and window[1] > steps:
        raise ValueError(f"cache window {window} ends after the last step ({steps})")
    if "preset" in cache:
        return preset_config(cache["preset"], pipe=pipe, model_preset=preset, window=window)
    m = lookup_method(cache["method"])
    kw = {"max_consecutive": cache.get("max_consecutive", CacheConfig.max_consecutive), "window": window}
    kw.update({o.attr: cache[o.attr] for o in m.options if o.attr in cache})
    return CacheConfig.for_method(m.name, pipe=pipe, preset=preset, **kw)
