"""Sigma schedules in flow-matching space (σ ∈ [0, 1], x_σ = (1 − σ)·x0 + σ·noise).

Every schedule is a pure function ``(n, shift) -> sigmas``: a 1-D tensor of ``n`` decreasing values in (0, 1]
followed by the terminal 0, so ``len(sigmas) == n + 1`` and "n steps" means n intervals σ_i → σ_{i+1}.

Values follow diffusers' ``FlowMatchEulerDiscreteScheduler`` (0.42.1) exactly: the shifted default schedule
``shift(linspace(1, 1/n, n))`` is built first and Karras / Exponential / Beta respace between its ends
(σ_max = 1, σ_min = shift(1/n)). With the default ``dtype=torch.float32`` every value is bit-identical to that
scheduler's ``sigmas`` (same float32 linspace, same numpy float32 shift, float64 respacing rounded to float32), so
a pipeline built on these schedules can match diffusers' latents bit for bit. ``dtype=torch.float64`` gives the
same formulas evaluated in float64 throughout (for analysis; not diffusers-exact).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "SCHEDULES",
    "beta_sigmas",
    "default_sigmas",
    "exponential_sigmas",
    "img2img_start",
    "karras_sigmas",
    "shift_sigmas",
    "uniform_sigmas",
    "unshift_sigmas",
]


def shift_sigmas(u, shift: float):
    """The static timestep shift of SD3 (arXiv 2403.03206): ``σ = s·u / (1 + (s − 1)·u)``, on floats or arrays."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigmas(sigma, shift: float):
    """Inverse of :func:`shift_sigmas`: ``u = σ / (s − (s − 1)·σ)``."""
    return sigma / (shift - (shift - 1) * sigma)


def _check(n: int, shift: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")


def _append_zero(sigmas: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    out = torch.from_numpy(np.ascontiguousarray(sigmas)).to(dtype)
    return torch.cat([out, out.new_zeros(1)])


def _shifted_base(n: int, shift: float, dtype: torch.dtype) -> np.ndarray:
    """shift(linspace(1, 1/n, n)) without the terminal 0, as diffusers' ZImagePipeline + FlowMatchEuler compute it."""
    if dtype == torch.float32:
        # ZImagePipeline: torch.linspace(1.0, 1 / N, N).tolist(); FlowMatchEulerDiscreteScheduler.set_timesteps:
        # np.array(sigmas).astype(np.float32), then the shift in numpy float32 (a Python float scalar stays weak).
        u = np.array(torch.linspace(1.0, 1 / n, n).tolist()).astype(np.float32)
        return shift * u / (1 + (shift - 1) * u)
    if dtype != torch.float64:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return shift_sigmas(np.linspace(1.0, 1.0 / n, n), shift)


def default_sigmas(n: int, shift: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Z-Image's own schedule: ``shift(linspace(1, 1/n, n))`` then 0 (diffusers 0.42.1's ZImagePipeline)."""
    _check(n, shift)
    return _append_zero(_shifted_base(n, shift, dtype), dtype)


uniform_sigmas = default_sigmas
"""``Uniform``: for a flow model, uniform spacing in model time is the default schedule (samplers.md §2)."""


def _ends(n: int, shift: float, dtype: torch.dtype) -> tuple[float, float]:
    base = _shifted_base(n, shift, dtype)
    return float(base[0]), float(base[-1])  # σ_max, σ_min as Python floats (diffusers: in_sigmas[0/-1].item())


def karras_sigmas(n: int, shift: float, rho: float = 7.0, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Karras et al. (2022, arXiv 2206.00364) ρ-spacing between the shifted schedule's ends, then 0."""
    _check(n, shift)
    sigma_max, sigma_min = _ends(n, shift, dtype)
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, dtype)


def exponential_sigmas(n: int, shift: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-linear spacing between the shifted schedule's ends, then 0 (diffusers ``use_exponential_sigmas``)."""
    _check(n, shift)
    sigma_max, sigma_min = _ends(n, shift, dtype)
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), dtype)


def beta_sigmas(
    n: int, shift: float, alpha: float = 0.6, beta: float = 0.6, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Beta-quantile spacing (Lee et al. 2024, arXiv 2407.12173) between the shifted schedule's ends, then 0."""
    import scipy.stats  # the only schedule that needs scipy

    _check(n, shift)
    sigma_max, sigma_min = _ends(n, shift, dtype)
    ppf = [scipy.stats.beta.ppf(t, alpha, beta) for t in 1 - np.linspace(0, 1, n)]
    return _append_zero(np.array([sigma_min + (p * (sigma_max - sigma_min)) for p in ppf]), dtype)


SCHEDULES = {
    "default": default_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "beta": beta_sigmas,
}
"""Schedule name (as used by the scheduler table) → function ``(n, shift) -> sigmas``."""


def img2img_start(n: int, strength: float) -> int:
    """First step index of image-to-image / inpainting: ``n − floor(strength·n)`` (docs/python-api.md, ``strength``),
    but at least one step runs whenever ``strength > 0`` (as in diffusers, whose ``int(n − n·strength)`` runs one
    step there): otherwise a small strength would return the seed image through the VAE, ignoring prompt and mask.

    The run covers ``sigmas[img2img_start(n, strength):]``. ``strength·n`` is a float product; one within 1e-9 of
    an integer counts as that integer, so ``strength=0.29, n=100`` re-noises 29 steps (the float product is
    28.999999999999996).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")
    start = n - math.floor(strength * n + 1e-9)
    return min(start, n - 1) if strength > 0 else start
