"""The one sampling loop, used by ``ZImage`` (and so the service) and by the diffusers drop-in.

:class:`SamplingRun` is the one place that builds what a run needs: the denoiser (``zimage_core.denoiser.Denoiser``:
caption contexts, CFG, the hooks of every model call with a step cache's state innermost, parallelism, ControlNet
hints), a fresh step-cache state and ControlNet state for the run's schedule, and the statistics they leave; its
:meth:`SamplingRun.run` calls :func:`run_sampler`. ``ZImage._sample`` and the drop-in's ``_run`` only map their
arguments onto it.

:func:`run_sampler` runs a sampler of the scheduler table over a sigma schedule, calling a denoiser
(``zimage_core.denoiser.Denoiser``: CFG, hooks, LoRA phase, parallelism), with the per-run extensions every caller
shares: a step cache (its ``observe`` wrapper and its end-of-step bookkeeping), ControlNet hints (end-of-step
bookkeeping of ``controlnet.ControlState``), inpainting (the known region re-imposed at the next noise level after
every step) and the caller's own step hook (progress bars, diffusers' ``callback_on_step_end``, interrupts). LoRA
is applied around the whole call by ``zimage_core.lora.apply_loras`` (per thread, per call), and the hooks of every
model call are assembled by the caller into the denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import controlnet as cn_mod
from .denoiser import Denoiser, GenerationStats


@dataclass
class Inpaint:
    """Inpainting: after each step, outside the mask the latents are the seed image's at the next noise level."""

    mask: torch.Tensor  # latent mask, 1 = repaint (a callback may replace it between steps)
    noise: torch.Tensor  # the initial noise
    x0: torch.Tensor  # the clean seed-image latents

    def blend(self, x: torch.Tensor, sigma_next: float, last: bool = False) -> torch.Tensor:
        """After the last step (or at σ = 0) the known region is the seed image itself, as in diffusers."""
        sig = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
        known = self.x0 if last or float(sig) == 0 else sig * self.noise + (1.0 - sig) * self.x0
        return (1 - self.mask) * known + self.mask * x


def run_sampler(
    spec,
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    x0: torch.Tensor | None = None,
    cache_state=None,
    control_state=None,
    inpaint: Inpaint | None = None,
    on_step: Callable[[dict], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample ``x`` over ``sigmas`` with ``spec`` (a scheduler-table entry); returns (final latents, model calls).

    After each step, in this order: the cache's drift correction (velocity cache), the inpainting blend, the cache's
    and the ControlNet's end of step, then
    ``on_step(info)`` with ``info["x"]`` the latents so far; a tensor it returns replaces them."""
    calls = 0
    inner = denoise if cache_state is None else cache_state.observe(denoise)

    def counted(x_, sigma):
        nonlocal calls
        calls += 1
        return inner(x_, sigma)

    correct = getattr(cache_state, "correct", None)  # the velocity cache takes back the drift of its reused steps

    def step(info):
        out = correct(info["x"]) if correct is not None else None
        if inpaint is not None:
            x_ = info["x"] if out is None else out
            out = inpaint.blend(x_, info["sigma_next"], last=info["i"] == len(sigmas) - 2)
        if cache_state is not None:
            cache_state.end_step(info["i"])
        if control_state is not None:
            control_state.end_step(info["i"])
        if on_step is not None:
            replaced = on_step(info if out is None else {**info, "x": out})
            if replaced is not None:
                out = replaced
        return out

    if len(sigmas) > 1:
        x = spec.sample(counted, x, sigmas, generator=generator, callback=step, x0=x0)
    return x, calls


class SamplingRun:
    """One run of the sampler over one schedule, with its per-run extensions.

    ``num_steps``/``t_start``: the whole schedule's length and the step it starts at (image-to-image starts later);
    ``cache``: a step-cache config (a fresh state per run, innermost hook; under ``parallel`` every rank takes the same
    decision); ``controls``: prepared ControlNets (``controlnet._Prepared``); ``hooks``: the caller's
    :class:`~zimage_core.hooks.StackHook` s, outermost first; ``parallel``: a ``parallel.ParallelContext`` or None.
    LoRA is active around the run through ``zimage_core.lora.apply_loras`` (per thread), which the caller opens for
    the whole call (the caption contexts passed to :meth:`set_contexts` are encoded under it too)."""

    def __init__(
        self,
        transformer,
        spec,
        *,
        stats: GenerationStats,
        guidance: float,
        cfg_normalization: float,
        cfg_truncation: float,
        num_steps: int,
        t_start: int,
        hooks=(),
        cache=None,
        controls=(),
        parallel=None,
    ):
        self.transformer, self.spec, self.stats, self.parallel = transformer, spec, stats, parallel
        self.cfg = (float(guidance), float(cfg_normalization), float(cfg_truncation))
        self.cache_state = cache.new_state(num_steps=num_steps, start_step=t_start) if cache is not None else None
        if self.cache_state is not None and parallel is not None:  # every rank takes the same decision
            self.cache_state.reduce_metric = parallel.reduce_metric
        self.control_state = cn_mod.ControlState(list(controls), transformer, t_start, t_start) if controls else None
        self.hooks = (*hooks, *([] if self.cache_state is None else [self.cache_state]))  # the cache is innermost
        self.denoiser: Denoiser | None = None

    def set_contexts(self, pos, neg, low=None) -> None:
        """(Re)build the denoiser on these caption contexts (``neg`` None: no CFG; ``low``: the (pos, neg) contexts
        below ``lora.HIGH_NOISE_SIGMA`` for a phased caption LoRA). Between steps too: the next step uses them."""
        guidance, cfg_norm, cfg_trunc = self.cfg
        self.denoiser = Denoiser.build(
            self.transformer,
            pos,
            neg,
            guidance=guidance,
            cfg_normalization=cfg_norm,
            cfg_truncation=cfg_trunc,
            stats=self.stats,
            hooks=self.hooks,
            ctx_low=low,
            parallel=self.parallel,
            control=self.control_state,  # ControlNet hints, added after their main layers through the hook chain
        )

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.denoiser(x, sigma)

    def run(
        self,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        x0: torch.Tensor | None = None,
        inpaint: Inpaint | None = None,
        on_step: Callable[[dict], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """:func:`run_sampler` over ``sigmas`` (from the start step on); returns (final latents, model calls) and adds
        the cache's and the ControlNets' summaries to ``stats`` (one per run). :meth:`set_contexts` first."""
        if self.denoiser is None:
            raise RuntimeError("SamplingRun.run: call set_contexts first")
        try:
            return run_sampler(
                self.spec,
                self.denoise,
                x,
                sigmas,
                generator=generator,
                x0=x0,
                cache_state=self.cache_state,
                control_state=self.control_state,
                inpaint=inpaint,
                on_step=on_step,
            )
        finally:  # also when a step hook stops the run early (diffusers' interrupt)
            if self.cache_state is not None:
                self.stats.cache = [*(self.stats.cache or []), self.cache_state.summary()]
            if self.control_state is not None:
                self.stats.controlnet = [*(self.stats.controlnet or []), dict(self.control_state.stats)]


__all__ = ["Inpaint", "SamplingRun", "run_sampler"]
