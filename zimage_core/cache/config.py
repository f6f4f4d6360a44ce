"""One immutable config per method. A config is shareable (threads, requests); ``new_state()`` makes the
per-request state that holds every tensor and counter (``state.py``).

Defaults are the request API's (README, "Step caches"): FBCache threshold 0.25, TeaCache distance
0.5, DBCache threshold 0.25 with skip interval 5, at most 3 reused steps in a row. DBCache's ``fn``/``bn`` (first
blocks always computed and measured, last blocks always computed) are library parameters; their defaults were picked
with ``python -m zimage_bench cache --db-split`` (see ``DB_DEFAULT_SPLIT`` below) and differ from FBCache's ``(1, 0)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

from .masks import StepMask
from .policy import Rules
from .registry import CALIBRATORS, METHODS, Option, register
from .registry import method as lookup_method

# DBCache (Fn, Bn) default: measured with `python -m zimage_bench cache --db-split` (zimage_core/cache/README.md,
# "DBCache split").
DB_DEFAULT_SPLIT = (1, 1)


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Common knobs. ``threshold``: higher reuses more (all three methods). ``window``: half-open [start, end) in
    absolute schedule steps, None = the whole run. ``max_consecutive``: reused steps in a row before a full compute.
    ``calibrator``: forecast the cached residual on a reused step (``taylorseer1``, ``taylorseer2``, ``foca``;
    ``registry.CALIBRATORS``) instead of copying it. ``mask``: a :class:`~.masks.StepMask` (steps that must compute,
    static or dynamic policy). ``cfg_split``: the positive and negative CFG halves decide (and compute) separately.
    ``forecast_axis``: the calibrator's positions, step index (default) or σ. ``forecast_guard``: on every computed
    step, check whether the calibrator's forecast for it beat copying the cached residual; the reuses that follow
    forecast only if it did (long forecast horizons on real trajectories can be far worse than copying).

    Class attributes read by the per-request state: ``probe`` (``"head"``: the change of the head layers' residual
    against the last computed step; ``"input"``: the change of layer 0's modulated input step to step) and
    ``accumulate`` (sum the rescaled change since the last compute, TeaCache)."""

    method: ClassVar[str] = ""
    probe: ClassVar[str] = "head"
    accumulate: ClassVar[bool] = False
    threshold: float = 0.25
    max_consecutive: int = 3
    window: tuple[int, int] | None = None
    calibrator: str | None = None
    mask: StepMask | None = None
    cfg_split: bool = False  # the two CFG halves decide separately (state.py); False: one joint decision
    forecast_axis: str = "step"  # calibrator positions: "step" (index) or "sigma"
    forecast_guard: bool = True  # forecast only while the last checked forecast beat copying (state.py)

    def __post_init__(self):
        if self.calibrator is not None and self.calibrator not in CALIBRATORS:
            raise ValueError(f"unknown calibrator {self.calibrator!r}; known: {sorted(CALIBRATORS)}")
        if self.forecast_axis not in ("step", "sigma"):
            raise ValueError(f"forecast_axis must be 'step' or 'sigma', got {self.forecast_axis!r}")
        if self.mask is not None and not isinstance(self.mask, StepMask):
            raise ValueError(f"mask must be a StepMask, got {type(self.mask).__name__}")
        self.rules()  # validates threshold / max_consecutive / window / skip interval

    # ---- policy inputs -------------------------------------------------------------------------------------------
    def rules(self) -> Rules:
        return Rules(
            threshold=float(self.threshold),
            max_consecutive=int(self.max_consecutive),
            window=None if self.window is None else (int(self.window[0]), int(self.window[1])),
            accumulate=self.accumulate,
            mask=self.mask,
        )

    def split(self, n_layers: int) -> tuple[int, int]:
        """(head, tail): main layers always run before / after the cached middle range."""
        raise NotImplementedError

    # ---- state ---------------------------------------------------------------------------------------------------
    def new_state(self, num_steps: int | None = None, start_step: int = 0):
        """Fresh per-request state. ``num_steps``: length of the schedule (the last step always computes);
        ``start_step``: absolute index of the run's first step (image-to-image starts later)."""
        from .state import CacheState

        return CacheState(self, num_steps=num_steps, start_step=start_step)

    def describe(self) -> dict:
        d = {"method": self.method, **asdict(self)}
        if d.get("window") is not None:
            d["window"] = list(d["window"])
        return d

    # ---- construction --------------------------------------------------------------------------------------------
    @staticmethod
    def for_method(method: str, threshold: float | None = None, *, pipe=None, preset: str | None = None, **kw):
        """``fb`` | ``tea`` | ``db`` (also ``fbCache``/``fbcache``, ...) with that method's defaults; ``threshold=None``
        keeps the default.

        With ``pipe`` (a ``ZImage``), TeaCache takes the calibrated coefficients for that model and ``preset``
        (``zimage_core/cache/tea_coefficients.json``); without, or when none are stored, the identity rescaling."""
        cls = lookup_method(method).config
        if threshold is not None:
            kw["threshold"] = threshold
        if getattr(cls, "calibrated", False) and pipe is not None and "coefficients" not in kw:
            from .teacache import lookup

            coeffs = lookup(pipe, preset)
            kw.update(coefficients=coeffs.coefficients, coefficients_source=coeffs.source)
            if coeffs.source.get("x_range"):
                kw["fit_range"] = tuple(coeffs.source["x_range"])
        return cls(**kw)


THRESHOLD_HELP = "step cache threshold in [0, 1] (higher reuses more)"


@register(
    "fb",
    switch="fbCache",
    options=(Option("fbCacheThreshold", "threshold", "float", 0, 1, cli="--cache-threshold", help=THRESHOLD_HELP),),
)
@dataclass(frozen=True, kw_only=True)
class FBCacheConfig(CacheConfig):
    """First Block Cache: run main layer 0; reuse the cached residual of layers 1.. when the relative L1 change of
    layer 0's residual against the last *computed* step is below the threshold."""

    threshold: float = 0.25

    def split(self, n_layers: int) -> tuple[int, int]:
        return 1, 0


@register(
    "tea",
    switch="teaCache",
    options=(Option("teaCacheDistance", "threshold", "float", 0, 1, cli="--cache-threshold", help=THRESHOLD_HELP),),
)
@dataclass(frozen=True, kw_only=True)
class TeaCacheConfig(CacheConfig):
    """TeaCache: accumulated, polynomial-rescaled relative L1 change of main layer 0's timestep-modulated input
    (step to step); reuse the whole main stack's residual while the accumulator stays below the distance.

    ``coefficients``: rescaling polynomial, highest power first (``numpy.poly1d`` order). Default: the identity
    ``(1, 0)`` (the raw change, uncalibrated) — ``for_method(..., pipe=...)`` substitutes calibrated ones.
    ``fit_range``: the (min, max) change the polynomial was fitted on. Outside it a degree-4 fit can swing to huge or
    negative values, so the polynomial is evaluated at the nearest end and scaled linearly, ``poly(end)·x/end``
    (falling back to the raw change if ``poly(end) <= 0``)."""

    probe: ClassVar[str] = "input"
    accumulate: ClassVar[bool] = True
    calibrated: ClassVar[bool] = True  # for_method(pipe=...) looks its coefficients up (teacache.py)
    threshold: float = 0.5
    coefficients: tuple[float, ...] = (1.0, 0.0)
    fit_range: tuple[float, float] | None = None
    coefficients_source: dict = field(
        default_factory=lambda: {"kind": "identity", "note": "uncalibrated: raw relative L1 change, not rescaled"},
        compare=False,
    )

    def __post_init__(self):
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        if self.fit_range is not None:
            object.__setattr__(self, "fit_range", (float(self.fit_range[0]), float(self.fit_range[1])))
        if not self.coefficients:
            raise ValueError("TeaCache coefficients must not be empty")
        super().__post_init__()

    def split(self, n_layers: int) -> tuple[int, int]:
        return 0, 0

    def _poly(self, x: float) -> float:
        acc = 0.0
        for c in self.coefficients:  # Horner, highest power first
            acc = acc * x + c
        return acc

    def rescale(self, x: float) -> float:
        if self.fit_range is not None and not math.isnan(x):
            lo, hi = self.fit_range
            end = hi if x > hi else lo if x < lo else None
            if end is not None and end > 0:
                at_end = self._poly(end)
                return at_end * x / end if at_end > 0 else x
        return self._poly(x)


@register(
    "db",
    switch="dbCache",
    options=(
        Option("dbCacheThreshold", "threshold", "float", 0, 1, cli="--cache-threshold", help=THRESHOLD_HELP),
        Option(
            "dbCacheSkipInterval",
            "skip_interval",
            "int",
            1,
            1000,
            cli="--cache-skip-interval",
            help="DBCache: a full compute every N steps inside the cache window (1-1000)",
        ),
    ),
)
@dataclass(frozen=True, kw_only=True)
class DBCacheConfig(CacheConfig):
    """DBCache (cache-dit): the first ``fn`` main layers always run and their residual's change decides; on a
    reuse the middle layers' cached residual is added (optionally extrapolated, ``taylor``: the same as
    ``calibrator="taylorseer1"``), the last ``bn`` layers always run. ``skip_interval`` N: a full compute at least
    every N steps inside the window (a fixed grid)."""

    threshold: float = 0.25
    fn: int = DB_DEFAULT_SPLIT[0]
    bn: int = DB_DEFAULT_SPLIT[1]
    skip_interval: int | None = 5
    taylor: bool = False

    def __post_init__(self):
        if self.fn < 1 or self.bn < 0:
            raise ValueError(f"DBCache needs fn >= 1 and bn >= 0, got fn={self.fn}, bn={self.bn}")
        if self.taylor:
            if self.calibrator not in (None, "taylorseer1"):
                raise ValueError(f"taylor=True is calibrator='taylorseer1'; got also calibrator={self.calibrator!r}")
            object.__setattr__(self, "calibrator", "taylorseer1")
            object.__setattr__(self, "forecast_axis", "sigma")  # what taylor=True always did
            object.__setattr__(self, "forecast_guard", False)
        super().__post_init__()

    def rules(self) -> Rules:
        return replace(super().rules(), skip_interval=self.skip_interval)

    def split(self, n_layers: int) -> tuple[int, int]:
        """Clamped so that at least one middle layer is left (models shallower than fn + bn + 1)."""
        head = min(self.fn, max(n_layers - 1, 0))
        tail = min(self.bn, max(n_layers - 1 - head, 0))
        return head, tail


CONFIGS: dict[str, type[CacheConfig]] = {name: m.config for name, m in METHODS.items()}
