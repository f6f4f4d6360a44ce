"""Per-request cache state and the wrapper that replaces the transformer's 30 main layers.

``CacheState.main_layers(hidden, inputs, layers)`` is what ``ZImageTransformer.forward_with_context`` calls instead
of running every main layer (the model class knows nothing about caching)::

    probe ─ TeaCache: RMSNorm₁(hidden)·(1 + scale_msa) of layer 0 (its timestep-modulated input)
    head  ─ layers[:head] always run        (FBCache 1, DBCache fn, TeaCache 0)
    decide ─ policy.decide(step, window, counters, measured change)    (one host sync when it has to measure)
    middle ─ compute: run layers[head:n−tail], store their residual     (+ the previous one for Taylor)
           ─ reuse:   hidden + cached residual (+ coef·Δ, order-1 Taylor in σ)  — one fused kernel
    tail  ─ layers[n−tail:] always run      (DBCache bn)

Everything mutable lives here, one instance per request (per result): two requests on two threads share only the
immutable config and the model's weights. The pipeline tells the state where it is: ``observe(denoise)`` records the
σ of every model evaluation, ``end_step(i)`` advances the step index after each sampler step.
"""

from __future__ import annotations

import math

import torch

from .ops import cache_ops
from .policy import Counters, StepInfo, decide, forced
from .reference import relative_change
from .stats import CacheStats


def _unreduced(sums):
    return sums


class CacheState:
    def __init__(self, config, num_steps: int | None = None, start_step: int = 0):
        self.config = config
        self.rules = config.rules()
        self.num_steps = num_steps
        self.start_step = int(start_step)
        self.step = self.start_step  # absolute step index of the next model evaluation
        self.sigma: float | None = None
        self.counters = Counters()
        self.stats = CacheStats(config.describe())
        self._is_tea = config.method == "tea"
        self._taylor = bool(getattr(config, "taylor", False))
        self._key = None  # (shape, dtype, device) of the cached tensors
        self.reduce_metric = _unreduced  # parallel runs: sums the metric's two L1 sums over the ranks (same decision)
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
        self._delta = None  # Taylor: residual − previous residual
        self._spacing = None  # Taylor: position of the last compute − position of the one before
        self._res_pos = None  # position (σ, else step) of the cached residual
        self.counters = Counters()

    def _position(self) -> float:
        return self.sigma if self.sigma is not None else float(self.step)

    @staticmethod
    def _modulated_input(hidden, inp, layer0) -> torch.Tensor:
        scale_msa = layer0.modulation_terms(inp.adaln_input)[0]
        return inp.ops.rms_norm_modulate(hidden, layer0.attention_norm1.weight, scale_msa, layer0.eps)

    # ---- the wrapper ---------------------------------------------------------------------------------------------
    def main_layers(self, hidden: torch.Tensor, inp, layers) -> torch.Tensor:
        n = len(layers)
        head, tail = self.config.split(n)
        middle = layers[head : n - tail]
        cops = cache_ops(inp.ops.name, hidden.device)
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
        h = hidden
        for layer in layers[:head]:
            h = layer(h, inp)

        change = None
        if len(middle) == 0 or (not self._is_tea and head == 0):
            decision_compute, reason, acc = True, "too-few-layers", None
        else:
            if forced(self.rules, info, self.counters) is None:
                if self._is_tea:
                    change = relative_change(self.reduce_metric(cops.l1_sums(probe, self._ref)))
                else:
                    change = relative_change(self.reduce_metric(cops.l1_sums(h, self._ref, a_sub=hidden)))
            rescale = self.config.rescale if self._is_tea else None
            decision, self.counters = decide(self.rules, info, self.counters, change, rescale)
            decision_compute, reason, acc = decision.compute, decision.reason, decision.accumulated
        if self._is_tea:
            self._ref = probe  # TeaCache compares step to step: the reference moves every evaluation

        pos = self._position()
        if decision_compute:
            if not self._is_tea:
                self._ref = h - hidden  # the head's residual at this (computed) step
            h_in = h
            for layer in middle:
                h = layer(h, inp)
            residual = h - h_in
            if self._taylor:
                if self._residual is not None and self._res_pos is not None and pos != self._res_pos:
                    self._delta, self._spacing = residual - self._residual, pos - self._res_pos
                else:
                    self._delta = self._spacing = None
            self._residual, self._res_pos = residual, pos
            layers_run = n
        else:
            delta, coef = None, 0.0
            if self._taylor and self._delta is not None:
                delta, coef = self._delta, (pos - self._res_pos) / self._spacing
            h = cops.apply_residual(h, self._residual, delta, coef)
            layers_run = head + tail
        for layer in layers[n - tail :]:
            h = layer(h, inp)

        self.stats.record(
            step=self.step,
            sigma=self.sigma,
            computed=decision_compute,
            reason=reason,
            change=change,
            accumulated=acc,
            layers=layers_run,
            batch=int(hidden.shape[0]),
        )
        return h
