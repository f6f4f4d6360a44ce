"""Temporary: Z-Image's default flow-matching Euler only, until the full scheduler table lands."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np
import torch

SCHEDULER_NAMES = ("Default", "FlowMatchEulerDiscreteScheduler", "Euler")


class UnknownSchedulerError(ValueError):
    def __init__(self, name: str):
        self.name = name
        self.suggestions = difflib.get_close_matches(name, SCHEDULER_NAMES, n=3, cutoff=0.4)
        super().__init__(f"unknown scheduler {name!r}; close matches: {self.suggestions}")


def default_sigmas(n: int, shift: float) -> torch.Tensor:
    """diffusers' ZImagePipeline schedule, computed the same way (float32 numpy shift), with the terminal 0."""
    s = np.array(torch.linspace(1.0, 1 / n, n).tolist()).astype(np.float32)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])


def sample_euler(denoise, x, sigmas, *, generator=None, callback=None):
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = denoise(x, sigma)
        x = x + (sigma_next - sigma) * v
        if callback is not None:
            out = callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": None})
            x = out if out is not None else x
    return x


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    stochastic: bool = False
    requires_seed_image: bool = False
    knobs: dict = field(default_factory=dict)

    def sigmas(self, n: int, shift: float) -> torch.Tensor:
        return default_sigmas(n, shift)

    def nfe(self, n: int) -> int:
        return n

    def sample(self, denoise, x, sigmas, generator=None, callback=None, **kw):
        return sample_euler(denoise, x, sigmas, generator=generator, callback=callback)


def resolve_scheduler(name: str) -> SchedulerSpec:
    if name not in SCHEDULER_NAMES:
        raise UnknownSchedulerError(name)
    return SchedulerSpec(name)
