"""Timers: ``perf_counter`` on CPU, CUDA events on GPU; warm-up apart from the timed repeats; median/min/max.

A :class:`Clock` hands out *marks* (a ``perf_counter`` float, or a recorded ``torch.cuda.Event``) and turns pairs of
marks into milliseconds once the device is synchronised. Recording an event does not synchronise, so marks can be
placed inside a pipeline's loop (around every transformer forward, at every step end) without changing its timing.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Stats:
    """Summary of timing samples, in milliseconds (or whatever unit the samples were in)."""

    n: int
    median: float
    min: float
    max: float
    mean: float
    std: float

    @classmethod
    def of(cls, samples) -> Stats | None:
        xs = [float(x) for x in samples]
        if not xs:
            return None
        return cls(
            n=len(xs),
            median=statistics.median(xs),
            min=min(xs),
            max=max(xs),
            mean=statistics.fmean(xs),
            std=statistics.stdev(xs) if len(xs) > 1 else 0.0,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{fmt(self.median)} [{fmt(self.min)}–{fmt(self.max)}]"


def fmt(x: float | None, digits: int = 3) -> str:
    """Significant-digit formatting for tables (1234 -> '1234', 12.345 -> '12.3', 0.01234 -> '0.0123')."""
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.{max(digits - 1, 0)}e}"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(digits - 1 - mag, 0)}f}"


class Clock:
    """Marks and elapsed times on one device: CUDA events there, ``time.perf_counter`` elsewhere."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, start, end) -> float:
        """Milliseconds between two marks (call :meth:`sync` first on CUDA)."""
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1000.0


def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, device="cpu") -> dict:
    """Time ``fn()``: ``warmup`` untimed calls (the first one's time reported apart), then ``repeats`` timed calls.

    Returns {"first_call_ms", "samples_ms", "stats": Stats}. On CUDA each call is bracketed by events and the
    device is synchronised before reading them.
    """
    clock = Clock(device)
    first = None
    for i in range(warmup):
        clock.sync()
        a = clock.mark()
        fn()
        b = clock.mark()
        clock.sync()
        if i == 0:
            first = clock.ms(a, b)
    samples = []
    for _ in range(repeats):
        clock.sync()
        a = clock.mark()
        fn()
        b = clock.mark()
        clock.sync()
        samples.append(clock.ms(a, b))
    return {"first_call_ms": first, "samples_ms": samples, "stats": Stats.of(samples)}


def round_robin(names: list[str], repeats: int) -> list[str]:
    """Interleaved run order for side-by-side timing: every round runs each name once, and the starting name
    rotates between rounds, so slow phases of a shared machine fall on every configuration alike.

    >>> round_robin(["a", "b", "c"], 2)
    ['a', 'b', 'c', 'b', 'c', 'a']
    """
    order = []
    for r in range(repeats):
        k = r % len(names) if names else 0
        order.extend(names[k:] + names[:k])
    return order


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on a CUDA device since the last reset (None on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None
