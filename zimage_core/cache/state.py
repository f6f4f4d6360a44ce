"""Per-request cache state: the innermost hook of the chain around the transformer's main layers.

``CacheState`` is a :class:`~zimage_core.hooks.StackHook`; its ``around_stack`` decides which ranges of the stack
run (through ``stack.run(hidden, inp, start, stop)``, so every other hook's ``after_layer`` still runs on the layers
that are computed). The model class knows nothing about caching::

    probe ─ TeaCache: RMSNorm₁(hidden)·(1 + scale_msa) of layer 0 (its timestep-modulated input)
    head  ─ layers[:head] always run        (FBCache 1, DBCache fn, TeaCache 0)
    decide ─ policy.decide(step, window, mask, counters, measured change)  (one host sync when it has to measure)
    middle ─ compute: run layers[head:n−tail], store their residual     (and feed it to the calibrator)
           ─ reuse:   hidden + cached residual — one fused kernel; with a calibrator (TaylorSeer, FoCa) the
                      residual forecast at this σ instead
    tail  ─ layers[n−tail:] always run      (DBCache bn)

Everything mutable lives here, one instance per request (per result): two requests on two threads share only the
immutable config and the model's weights. The pipeline tells the state where it is: ``observe(denoise)`` records the
σ of every model evaluation, ``end_step(i)`` advances the step index after each sampler step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ..hooks import StackHook
from .policy import Counters, StepInfo, decide, measures
from .registry import make_calibrator
from .stats import CacheStats


def relative_change(sums: torch.Tensor) -> float:
    """Host float ``Σ|a−b| / Σ|b|`` from :func:`l1_sums` (the one device sync per decision).

    0/0 → 0.0 (nothing changed); x/0 with x > 0 → inf (everything changed); NaN stays NaN (never a cache hit).
    """
    num, den = (float(v) for v in sums.tolist())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


@runtime_checkable
class StepCacheState(Protocol):
    """What ``ZImage.generate`` needs from the per-result state of a step cache (``cache=`` argument): a hook of the
    chain (``around_stack`` etc., the innermost one), told the σ of each evaluation and the end of each step.
    Optional: ``correct(x) -> Tensor | None``, called with the latents after each sampler step (before the inpainting
    blend); a tensor it returns replaces them (the velocity cache's drift correction, ``velocity.py``)."""

    def around_stack(self, inner, hidden: torch.Tensor, inp, stack) -> torch.Tensor: ...

    def after_layer(self, index: int, hidden: torch.Tensor, inp) -> torch.Tensor: ...

    def observe(self, denoise: Callable) -> Callable: ...

    def end_step(self, i: int) -> None: ...

    def summary(self) -> dict: ...


class StepCache(Protocol):
    """A step cache's shareable config: a fresh :class:`StepCacheState` per result."""

    def new_state(self, num_steps: int | None = None, start_step: int = 0) -> StepCacheState: ...


def _unreduced(sums):
    return sums


def _rows(inp, rows: slice, batch: int):
    """``inp`` (a frozen dataclass of per-batch tensors) restricted to ``rows`` of its batch dimension."""
    kw = {}
    for f in dataclasses.fields(inp):
        v = getattr(inp, f.name)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            kw[f.name] = v[rows]
    return dataclasses.replace(inp, **kw)


class CacheState(StackHook):
    """Per-request state. With ``config.cfg_split`` the two CFG halves (rows ``[pos ‖ neg]``) decide separately: each
    half has its own child state (its own reference, residual, counters and calibrator) and runs the middle layers
    only when it computes; the batch is split only when this state is the only hook (ControlNet hints and parallel
    runs are batch-shaped: they keep the joint decision). When CFG truncation drops the negative half, the positive
    half's child carries on with its cache (same shape: no reset)."""

    def __init__(self, config, num_steps: int | None = None, start_step: int = 0, _half: int | None = None):
        self.config = config
        self.rules = config.rules()
        self.num_steps = num_steps
        self.start_step = int(start_step)
        self.step = self.start_step  # absolute step index of the next model evaluation
        self.sigma: float | None = None
        self.counters = Counters()
        self.stats = CacheStats(config.describe())
        self._is_tea = config.probe == "input"  # the method measures layer 0's modulated input (TeaCache)
        self._calibrator = make_calibrator(config.calibrator)
        self._key = None  # (shape, dtype, device) of the cached tensors
        self.reduce_metric = _unreduced  # parallel runs: sums the metric's two L1 sums over the ranks (same decision)
        self._half = _half
        self._halves = None
        if getattr(config, "cfg_split", False) and _half is None:
            self._halves = [CacheState(config, num_steps, start_step, _half=k) for k in (0, 1)]
            for child in self._halves:
                child.stats = self.stats  # one record per half per evaluation, marked with "half"
        self._drop()

    # ---- pipeline hooks ------------------------------------------------------------------------------------------
    def observe(self, denoise):
        """Wrap the sampler's ``denoise(x, sigma)`` so the state knows the σ of each evaluation (Taylor uses it)."""

        def wrapped(x, sigma, *args, **kw):
            self.sigma = float(sigma)
            return denoise(x, sigma, *args, **kw)

        return wrapped

    def end_step(self, i: int) -> None:
        """The sampler finished run step ``i`` (0-based within the run)."""
        self.step = self.start_step + int(i) + 1

    def summary(self) -> dict:
        return self.stats.summary()

    # ---- internals -----------------------------------------------------------------------------------------------
    def _drop(self) -> None:
        self._ref = None  # FB/DB: head residual of the last computed step; Tea: previous modulated input
        self._residual = None  # cached residual of the middle range
        if self._calibrator is not None:
            self._calibrator.reset()
        self._trust = True  # the calibrator's last checked forecast beat copying (see _check_forecast)
        self.counters = Counters()

    def _position(self) -> float:
        """Where the calibrator places this evaluation: the step index (``forecast_axis="step"``, as TaylorSeer and
        cache-dit do; uniform) or σ (``"sigma"``, what ``taylor=True`` always did)."""
        if self.config.forecast_axis == "sigma" and self.sigma is not None:
            return self.sigma
        return float(self.step)

    def _check_forecast(self, pos: float, residual: torch.Tensor) -> None:
        """On a computed step, before the calibrator learns it: would its forecast for this step have beaten copying
        the cached residual? The next reuses forecast only if it did (``trust``); otherwise they copy. One host sync
        per computed step, only with a calibrator."""
        pred = self._calibrator.predict(pos)
        errs = torch.stack([(pred - residual).abs().sum(), (self._residual.to(pred.dtype) - residual).abs().sum()])
        err_forecast, err_copy = (float(v) for v in errs.tolist())
        self._trust = err_forecast <= err_copy

    @staticmethod
    def _modulated_input(hidden, inp, layer0) -> torch.Tensor:
        scale_msa = layer0.modulation_terms(inp.adaln_input)[0]
        return inp.ops.rms_norm_modulate(hidden, layer0.attention_norm1.weight, scale_msa, layer0.eps)

    # ---- the hook ------------------------------------------------------------------------------------------------
    def around_stack(self, inner, hidden: torch.Tensor, inp, stack) -> torch.Tensor:
        """Innermost hook: runs the stack's ranges itself (``inner`` would run every layer) and leaves ``hidden`` /
        ``inp`` as the outer hooks made them."""
        hidden, inp = self.before_stack(hidden, inp)
        batch = int(hidden.shape[0])
        if (
            self._halves is not None
            and batch in (1, 2)
            and len(stack.hooks) <= 1
            and self.reduce_metric is _unreduced
            and self._key is None
        ):
            for child in self._halves:
                child.step, child.sigma = self.step, self.sigma
            if batch == 1:  # CFG off (truncated): the positive half carries on
                return self._halves[0].around_stack(inner, hidden, inp, stack)
            outs = [
                self._halves[k].around_stack(inner, hidden[k : k + 1], _rows(inp, slice(k, k + 1), batch), stack)
                for k in (0, 1)
            ]
            return torch.cat(outs, 0)
        layers = stack.layers
        n = len(layers)
        head, tail = self.config.split(n)
        ops = inp.ops
        self.stats.n_layers = n

        key = (tuple(hidden.shape), hidden.dtype, hidden.device)
        reset = self._key is not None and key != self._key
        if reset:
            self._drop()
        self._key = key
        info = StepInfo(
            step=self.step,
            num_steps=self.num_steps if self.num_steps is not None else math.inf,
            start_step=self.start_step,
            reset=reset,
            has_reference=self._residual is not None and (self._ref is not None),
        )

        probe = self._modulated_input(hidden, inp, layers[0]) if self._is_tea and n else None
        h = stack.run(hidden, inp, 0, head)

        change = None
        if n - tail - head <= 0 or (not self._is_tea and head == 0):
            decision_compute, reason, acc = True, "too-few-layers", None
        else:
            if measures(self.rules, info, self.counters):
                if self._is_tea:
                    change = relative_change(self.reduce_metric(ops.l1_sums(probe, self._ref)))
                else:
                    change = relative_change(self.reduce_metric(ops.l1_sums(h, self._ref, a_sub=hidden)))
            rescale = self.config.rescale if self.rules.accumulate else None
            decision, self.counters = decide(self.rules, info, self.counters, change, rescale)
            decision_compute, reason, acc = decision.compute, decision.reason, decision.accumulated
        if self._is_tea:
            self._ref = probe  # TeaCache compares step to step: the reference moves every evaluation

        pos = self._position()
        if decision_compute:
            if not self._is_tea:
                self._ref = h - hidden  # the head's residual at this (computed) step
            h_in = h
            h = stack.run(h, inp, head, n - tail)
            residual = h - h_in
            if self._calibrator is not None:
                if self.config.forecast_guard and self._residual is not None:
                    self._check_forecast(pos, residual)
                self._calibrator.update(pos, residual)
            self._residual = residual
            layers_run = n
        else:
            forecast = self._calibrator is not None and self._trust
            residual = self._calibrator.predict(pos) if forecast else self._residual
            h = ops.apply_residual(h, residual, None, 0.0)
            layers_run = head + tail
        h = stack.run(h, inp, n - tail, n)

        self.stats.record(
            step=self.step,
            sigma=self.sigma,
            computed=decision_compute,
            reason=reason,
            change=change,
            accumulated=acc,
            layers=layers_run,
            batch=int(hidden.shape[0]),
            **({} if self._half is None else {"half": self._half}),
        )
        return h
