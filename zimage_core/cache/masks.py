"""Step masks: which steps must compute, and what the other steps do (cache-dit's step-computation masks).

A :class:`StepMask` is counted inside the cache window: from the *anchor* (the first step where caching may happen:
the window's start or the run's first step, whichever is later) to the window's end (or the end of the schedule).

- ``warmup`` W: the first W steps from the anchor compute (the early, high-σ steps shape the layout).
- ``every`` K: then every K-th step counted from the anchor computes (a fixed grid, computed steps included).
- ``tail`` T: the last T steps before the window's end compute (the fine detail).
- ``steps``: absolute step indices that compute.

``policy``: ``"dynamic"`` (the unmasked steps are left to the method: its measured change, the consecutive cap)
or ``"static"`` (the unmasked steps reuse without measuring: no host sync, a fixed compute pattern; the safety
rules still apply: first and last step, a batch-shape reset, the consecutive cap).

The mask composes with any method and with the request's window: outside the window every step computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("dynamic", "static")


@dataclass(frozen=True)
class StepMask:
    warmup: int = 0
    every: int | None = None
    tail: int = 0
    steps: tuple[int, ...] = ()
    policy: str = "dynamic"

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if self.warmup < 0 or self.tail < 0:
            raise ValueError(f"mask warmup and tail must be >= 0, got warmup={self.warmup}, tail={self.tail}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"mask every must be >= 1, got {self.every}")
        if any(s < 0 for s in self.steps):
            raise ValueError(f"mask steps must be >= 0, got {self.steps}")
        if self.policy not in POLICIES:
            raise ValueError(f"mask policy must be one of {POLICIES}, got {self.policy!r}")

    @property
    def static(self) -> bool:
        return self.policy == "static"

    def must_compute(self, step: int, anchor: int, end: float) -> bool:
        """Whether absolute ``step`` must compute, for caching allowed in ``[anchor, end)``."""
        k = step - anchor
        if k < self.warmup or step >= end - self.tail or step in self.steps:
            return True
        return self.every is not None and k % self.every == 0

    def describe(self) -> dict:
        return {
            "warmup": self.warmup,
            "every": self.every,
            "tail": self.tail,
            "steps": list(self.steps),
            "policy": self.policy,
        }

    def label(self) -> str:
        parts = [f"W{self.warmup}"] if self.warmup else []
        parts += [f"K{self.every}"] if self.every else []
        parts += [f"T{self.tail}"] if self.tail else []
        parts += [f"S{','.join(map(str, self.steps))}"] if self.steps else []
        return ("static " if self.static else "") + ("".join(parts) or "none")


__all__ = ["POLICIES", "StepMask"]
