"""The decision policy: pure functions of (step, window, counters, measured change) → compute or reuse.

No tensors, no state: the wrapper (``state.py``) measures the change and keeps the counters; this module only says
what to do, so every rule of the step caches (README, "Step caches") is testable on plain numbers.

Order of the rules (the first that applies decides; ``reason`` names it):

1. ``first``    the first step of the run computes (img2img runs start at ``start_step``).
2. ``last``     the last step of the schedule (``num_steps − 1``) computes.
3. ``reset``    the batch changed shape (CFG truncation switching the batch 2 → 1, a new resolution): the cached
                tensors no longer fit, so compute and start over.
4. ``no-reference``  nothing cached yet (cannot happen after rules 1 and 3 in a normal run; kept for safety).
5. ``outside-window``  caching only inside the half-open window ``[start, end)``.
6. ``refresh``  DBCache's skip interval N: inside the window, steps ``anchor, anchor + N, anchor + 2N, …`` are full
                computes whatever the threshold says (``anchor`` = first step where caching is allowed), so every N
                consecutive steps contain a full compute. Counted on the step grid, computed steps included, so it
                does not duplicate the consecutive cap (caching.md §8 option (a)).
7. ``mask``     a step mask (``masks.py``) marks the step as one that must compute.
8. ``max-consecutive``  at most ``max_consecutive`` reused steps in a row; the counter resets on every full compute.
9. a *static* mask reuses every other step without measuring (reason ``mask-static``); otherwise
   the measured change decides: FBCache/DBCache reuse iff ``change < threshold`` (strict; higher ⇒ more reuse);
   TeaCache adds ``max(poly(change), 0)`` to an accumulator and reuses iff the accumulator ``< threshold``. A NaN
   change never reuses. A threshold of 0 never reuses (the change and the accumulator are ≥ 0).
   Reasons: ``hit`` (reuse) or ``above-threshold`` (compute).

On a compute the counters reset (consecutive 0, accumulator 0); on a reuse the consecutive counter grows and the
accumulator keeps its new value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from .masks import StepMask


@dataclass(frozen=True)
class Rules:
    """The per-request knobs of the policy (from the method config and the request's window)."""

    threshold: float
    max_consecutive: int = 3
    window: tuple[int, int] | None = None  # half-open [start, end) in absolute schedule steps; None = everywhere
    skip_interval: int | None = None  # DBCache refresh period N (None: no periodic refresh)
    accumulate: bool = False  # TeaCache: accumulate the rescaled change since the last compute
    mask: StepMask | None = None  # steps that must compute, and whether the others measure (masks.py)

    def __post_init__(self):
        if not (self.threshold >= 0):
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")
        if self.skip_interval is not None and self.skip_interval < 1:
            raise ValueError(f"skip_interval must be >= 1, got {self.skip_interval}")
        if self.window is not None and not (0 <= self.window[0] < self.window[1]):
            raise ValueError(f"window must be half-open [start, end) with 0 <= start < end, got {self.window}")


@dataclass(frozen=True)
class StepInfo:
    """Where the sampler is: absolute step index in a schedule of ``num_steps`` steps, run started at ``start_step``."""

    step: int
    num_steps: int
    start_step: int = 0
    reset: bool = False  # the batch changed shape since the cached tensors were stored
    has_reference: bool = True  # something is cached to compare with / reuse


@dataclass(frozen=True)
class Counters:
    consecutive: int = 0  # reused steps since the last full compute
    accumulated: float = 0.0  # TeaCache: Σ rescaled change since the last full compute


@dataclass(frozen=True)
class Decision:
    compute: bool
    reason: str
    accumulated: float | None = None  # TeaCache: the accumulator this decision compared (None if not measured)


def anchor(rules: Rules, info: StepInfo) -> int:
    """The first step at which caching may happen (the skip-interval grid starts there)."""
    return max(info.start_step, rules.window[0] if rules.window else 0)


def forced(rules: Rules, info: StepInfo, counters: Counters) -> str | None:
    """The reason a full compute is forced before any measurement (rules 1–7), or None if the change decides."""
    if info.step <= info.start_step:
        return "first"
    if info.step >= info.num_steps - 1:
        return "last"
    if info.reset:
        return "reset"
    if not info.has_reference:
        return "no-reference"
    if rules.window is not None and not (rules.window[0] <= info.step < rules.window[1]):
        return "outside-window"
    if rules.skip_interval is not None and (info.step - anchor(rules, info)) % rules.skip_interval == 0:
        return "refresh"
    if rules.mask is not None:
        end = rules.window[1] if rules.window is not None else info.num_steps
        if rules.mask.must_compute(info.step, anchor(rules, info), min(end, info.num_steps)):
            return "mask"
    if counters.consecutive >= rules.max_consecutive:
        return "max-consecutive"
    return None


def measures(rules: Rules, info: StepInfo, counters: Counters) -> bool:
    """Whether the decision needs the measured change (no rule forces a compute and no static mask reuses)."""
    return forced(rules, info, counters) is None and not (rules.mask is not None and rules.mask.static)


def decide(
    rules: Rules,
    info: StepInfo,
    counters: Counters,
    change: float | None,
    rescale: Callable[[float], float] | None = None,
) -> tuple[Decision, Counters]:
    """One decision and the counters after it. ``change`` may be None only when :func:`forced` applies."""
    reason = forced(rules, info, counters)
    if reason is not None:
        return Decision(True, reason), Counters()
    if rules.mask is not None and rules.mask.static:
        return Decision(False, "mask-static"), replace(
            counters, consecutive=counters.consecutive + 1, accumulated=counters.accumulated
        )
    if change is None:
        raise ValueError("decide: the measured change is needed when no rule forces a compute")
    acc = None
    if rules.accumulate:
        r = rescale(change) if rescale is not None else change
        acc = counters.accumulated + (max(r, 0.0) if not math.isnan(r) else math.nan)  # a distance is never < 0
        hit = acc < rules.threshold
    else:
        hit = change < rules.threshold  # False for NaN
    if hit:
        return Decision(False, "hit", acc), replace(
            counters, consecutive=counters.consecutive + 1, accumulated=acc if acc is not None else 0.0
        )
    return Decision(True, "above-threshold", acc), Counters()


__all__ = ["Counters", "Decision", "Rules", "StepInfo", "anchor", "decide", "forced", "measures"]
