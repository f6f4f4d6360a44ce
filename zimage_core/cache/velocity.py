"""Velocity cache with drift correction: skip the whole transformer on reused steps, and when the next step computes,
take back the drift the stale velocity caused.

On a reused evaluation the sampler gets the velocity ``v_p`` of the last computed step ``p`` (no layer runs: not the
main layers, nor the refiners or the final layer). At the next computed step ``c`` the true velocity ``v_c`` is known,
so the error of the reused velocity at ``c`` is ``e_c = v_p − v_c``. Assume the error of the reused velocity grew from
0 at ``p`` as ``e_s ≈ ((s − p)/(c − p))^q · e_c``; the Euler steps ``x_{s+1} = x_s + Δσ_s·v`` of the reused steps then
moved ``x`` by ``D = Σ_{p<s<c} Δσ_s · ((s − p)/(c − p))^q · e_c`` too far (``Δσ_s = σ_{s+1} − σ_s``). After step ``c``
the state subtracts ``α·D`` from the latents (``correction`` α, ``correction_power`` q)::

    x_{c+1} ← x_c + Δσ_c·v_c − α·Σ_{p<s<c} Δσ_s·((s − p)/(c − p))^q·(v_p − v_c)

With α = 0 this is a plain output cache (copy the velocity). α = 1 with q = 1 would remove the whole drift if the
velocity moved linearly in the step index and the flow did not pull the trajectory back by itself; on the trained
default model α ≈ 0.5, q = 1 measured best (on training captions, then checked on held-out ones:
``docs/cache-presets.md``), i.e. about half of the linear estimate. Closed form the tests check: on a velocity field
linear in the step index, a drifted trajectory is moved by exactly ``α·D``.

Which steps compute comes from a static :class:`~.masks.StepMask` (the default: the first step, then every 7th: 8 of
50 steps, 6.25× fewer main-layer evaluations) and the usual rules (first and last step, window, cap). Nothing is
measured, so there is no host sync. The correction assumes one model evaluation per sampler step (Euler, DDIM,
the flow samplers of that kind); with samplers that evaluate more than once per step (Heun, DPM2, …) the state copies
only and records ``"correction": "off (several evaluations per step)"``. Works at the sampler level, so it composes
with CFG (the guided velocity is reused), CFG truncation, ControlNet (hints run on computed steps only) and parallel
runs (every rank makes the same static decision on the same velocity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..hooks import StackHook
from .config import CacheConfig
from .masks import StepMask
from .policy import Counters, StepInfo, decide
from .stats import CacheStats


def drift(steps: list[tuple[int, float]], p: int, c: int, power: float) -> float:
    """``Σ Δσ_s·((s − p)/(c − p))^q`` over the reused steps ``(s, Δσ_s)`` between computed steps ``p`` and ``c``: the
    factor of ``v_p − v_c`` by which ``x`` drifted."""
    h = float(c - p)
    return sum(ds * ((s - p) / h) ** power for s, ds in steps)


@dataclass(frozen=True, kw_only=True)
class VelocityCacheConfig(CacheConfig):
    """Reuse the sampler's velocity on the steps a static mask leaves out, correcting the drift at the next compute.

    ``correction`` α in [0, 1] and ``correction_power`` q > 0: see the module docstring. ``mask`` must be static
    (nothing is measured); ``threshold`` is unused (kept at 0 for the shared rules)."""

    method: ClassVar[str] = "velocity"
    threshold: float = 0.0
    max_consecutive: int = 1000
    mask: StepMask | None = field(default_factory=lambda: StepMask(warmup=1, every=7, policy="static"))
    correction: float = 0.5
    correction_power: float = 1.0

    def __post_init__(self):
        if self.mask is None or not isinstance(self.mask, StepMask) or not self.mask.static:
            raise ValueError("the velocity cache needs a static step mask (StepMask(..., policy='static'))")
        if self.calibrator is not None or self.cfg_split:
            raise ValueError("the velocity cache takes no calibrator and no cfg_split")
        if not 0.0 <= self.correction <= 1.0:
            raise ValueError(f"velocity cache correction must be in [0, 1], got {self.correction}")
        if not self.correction_power > 0:
            raise ValueError(f"velocity cache correction_power must be > 0, got {self.correction_power}")
        super().__post_init__()

    def split(self, n_layers: int) -> tuple[int, int]:
        return 0, 0

    def new_state(self, num_steps: int | None = None, start_step: int = 0):
        return VelocityCacheState(self, num_steps=num_steps, start_step=start_step)


class VelocityCacheState(StackHook):
    """Per-request state of :class:`VelocityCacheConfig` (a :class:`~.state.StepCacheState`, plus ``correct``)."""

    def __init__(self, config: VelocityCacheConfig, num_steps: int | None = None, start_step: int = 0):
        self.config = config
        self.rules = config.rules()
        self.num_steps = num_steps
        self.start_step = int(start_step)
        self.step = self.start_step
        self.counters = Counters()
        self.stats = CacheStats(config.describe())
        self._v: torch.Tensor | None = None  # velocity of the last computed step
        self._computed_at: int | None = None
        self._key = None
        self._reused: list[tuple[int, float]] = []  # (step, σ) of the evaluations reused since the last compute
        self._evals_in_step = 0
        self._multi = False  # a sampler with several evaluations per step: no correction
        self._pending: torch.Tensor | None = None  # displacement to subtract after this step
        self._batch = 1
        self.corrections = 0

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def around_stack(self, inner, hidden: torch.Tensor, inp, stack) -> torch.Tensor:
        """Runs only on computed steps (reused ones never call the model): every layer, counted for the stats."""
        self.stats.n_layers = len(stack.layers)
        self._batch = int(hidden.shape[0])
        hidden, inp = self.before_stack(hidden, inp)
        return inner(hidden, inp)

    def observe(self, denoise):
        def wrapped(x, sigma, *args, **kw):
            return self._evaluate(denoise, x, sigma, args, kw)

        return wrapped

    def end_step(self, i: int) -> None:
        self.step = self.start_step + int(i) + 1
        self._evals_in_step = 0

    def correct(self, x: torch.Tensor) -> torch.Tensor | None:
        """After a sampler step: the latents with the drift of the reused steps taken back (None: nothing to do)."""
        d, self._pending = self._pending, None
        if d is None or self._multi:
            return None
        self.corrections += 1
        return x - d.to(x.dtype)

    def summary(self) -> dict:
        out = self.stats.summary()
        out["corrections"] = self.corrections
        out["correction"] = "off (several evaluations per step)" if self._multi else self.config.correction
        return out

    # ---- internals -----------------------------------------------------------------------------------------------
    def _evaluate(self, denoise, x, sigma, args, kw):
        s = float(sigma)
        self._evals_in_step += 1
        if self._evals_in_step > 1:
            self._multi = True
        key = (tuple(x.shape), x.dtype, x.device)
        reset = self._key is not None and key != self._key
        info = StepInfo(
            step=self.step,
            num_steps=self.num_steps if self.num_steps is not None else math.inf,
            start_step=self.start_step,
            reset=reset,
            has_reference=self._v is not None,
        )
        decision, self.counters = decide(self.rules, info, self.counters, None)
        if not decision.compute:
            self._reused.append((self.step, s))
            self._record(s, False, decision.reason)
            return self._v
        v = denoise(x, sigma, *args, **kw)
        if self._v is not None and self._reused and not reset and not self._multi and self.config.correction > 0:
            nxt = [sig for _, sig in self._reused[1:]] + [s]  # Δσ_s = σ of the next evaluation − σ_s
            steps = [(st, n - sig) for (st, sig), n in zip(self._reused, nxt, strict=True)]
            f = drift(steps, self._computed_at, self.step, self.config.correction_power)
            self._pending = (self.config.correction * f) * (self._v - v)
        self._reused = []
        self._v, self._computed_at, self._key = v, self.step, key
        self._record(s, True, decision.reason)
        return v

    def _record(self, sigma: float, computed: bool, reason: str) -> None:
        self.stats.record(
            step=self.step,
            sigma=sigma,
            computed=computed,
            reason=reason,
            change=None,
            accumulated=None,
            layers=self.stats.n_layers if computed else 0,
            batch=self._batch,
        )


__all__ = ["VelocityCacheConfig", "VelocityCacheState", "drift"]
