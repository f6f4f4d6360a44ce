"""The one sampling loop, used by ``ZImage`` (and so the service) and by the diffusers drop-in.

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

    After each step, in this order: the inpainting blend, the cache's and the ControlNet's end of step, then
    ``on_step(info)`` with ``info["x"]`` the latents so far; a tensor it returns replaces them."""
    calls = 0
    inner = denoise if cache_state is None else cache_state.observe(denoise)

    def counted(x_, sigma):
        nonlocal calls
        calls += 1
        return inner(x_, sigma)

    def step(info):
        out = None
        if inpaint is not None:
            out = inpaint.blend(info["x"], info["sigma_next"], last=info["i"] == len(sigmas) - 2)
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


__all__ = ["Inpaint", "run_sampler"]
