"""Samplers for a flow-matching (rectified-flow) model, in one k-diffusion-like shape.

Conventions and update rules follow k-diffusion in flow-matching form (``docs/schedulers.md`` maps API names here).

Every sampler is ``sample_x(denoise, x, sigmas, *, generator=None, callback=None, **knobs) -> x`` where

- ``denoise(x, sigma) -> v`` returns the (guided) flow **velocity** ``v ≈ ε − x0`` at the latent ``x`` and noise
  level ``sigma``, a Python ``float`` in [0, 1] (only the inverse sampler asks for σ = 0). Every other prediction
  follows from it: ``x̂0 = x − σ·v``, ``ε̂ = x + (1 − σ)·v``. Model conventions (Z-Image: ``t = 1 − σ``, negated
  output, CFG) live in the caller's adapter, never here.
- ``sigmas`` is a decreasing 1-D tensor (or sequence) of noise levels, normally ending in 0 (``zimage_core.schedules``);
  ``len(sigmas) − 1`` steps are taken and the model is never evaluated at σ = 0.
- ``generator`` is a CPU ``torch.Generator``; every noise draw is
  ``torch.randn(x.shape, generator=generator, dtype=torch.float32)`` moved to ``x``'s device, in order of use (§1.6).
  Deterministic samplers never draw.
- ``callback(info)`` is called once per step, after the update, with ``info = {"i", "x", "sigma", "sigma_next",
  "denoised"}`` (``x`` the new latent, ``denoised`` the step's x̂0, sigmas as floats). If it returns a tensor (same
  shape as ``x``), sampling continues from that tensor instead of ``x``: this is how a pipeline blends an inpainting
  mask after each step. Histories of multistep methods (past x̂0, ε̂ or v) are kept as they are; the UniPC corrector
  and the paired single-step solver carry the replacement through their next update (see their docstrings).

Latent arithmetic runs in ``x``'s dtype (float32 in the pipeline); scalar coefficients are Python float64.
Endpoint rules (§1.5): the step to σ' = 0 is the first-order limit ``x̂0`` for every sampler except LMS; λ-based
multistep methods give a history point at σ = 1 (λ = −∞) zero weight by not using it; single-step λ-midpoint methods
replace a first σ = 1 by ``1 − 1e-4``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]

SIGMA_ONE_OFFSET = 1e-4  # σ_0 = 1 is replaced by 1 − this in single-step λ-midpoint methods (ComfyUI)

__all__ = [
    "invert_dpmpp_2m",
    "sample_ddim",
    "sample_ddpm",
    "sample_deis",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_inverse",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s",
    "sample_dpmpp_2s_singlestep",
    "sample_dpmpp_3m",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_ipndm",
    "sample_lcm",
    "sample_lms",
    "sample_pndm",
    "sample_tcd",
    "sample_unipc",
]


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _floats(sigmas) -> list[float]:
    if isinstance(sigmas, torch.Tensor):
        if sigmas.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        return [float(s) for s in sigmas.detach().cpu().double()]
    return [float(s) for s in sigmas]


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One fresh N(0, I) draw from the (CPU) generator, moved to x's device and dtype (§1.6)."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def _report(callback, x: torch.Tensor, **info) -> torch.Tensor:
    """Call the step callback; a returned tensor replaces x."""
    if callback is None:
        return x
    out = callback({"x": x, **info})
    if out is None:
        return x
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise ValueError(f"callback must return None or a tensor of shape {tuple(x.shape)}")
    return out


def _lam(s: float) -> float:
    """Flow half-log-SNR λ(σ) = log((1 − σ)/σ); −inf at σ = 1, +inf at σ = 0 (§1.3)."""
    if s >= 1.0:
        return -math.inf
    if s <= 0.0:
        return math.inf
    return math.log((1.0 - s) / s)


def _exp_neg_h(s: float, s1: float) -> float:
    """e^{−h} for the step σ → σ', h = λ(σ') − λ(σ), without logs: σ'(1 − σ)/(σ(1 − σ')) (§1.3)."""
    if s == s1:
        return 1.0
    return s1 * (1.0 - s) / (s * (1.0 - s1))


def _push(hist: list, item, keep: int) -> list:
    """Append to a history list, keeping the most recent ``keep`` entries."""
    return [*hist, item][-keep:] if keep > 0 else []


def _offset_first(sig: list[float]) -> list[float]:
    if sig and sig[0] >= 1.0:
        return [1.0 - SIGMA_ONE_OFFSET, *sig[1:]]
    return sig


def _rf_renoise(x_d: torch.Tensor, s_d: float, s1: float, generator, s_noise: float) -> torch.Tensor:
    """Forward-noise a flow latent from σ_d up to σ' ≥ σ_d along x_σ = (1 − σ)x0 + σε (§3.5)."""
    if s_d == s1:
        return x_d
    a1, a_d = 1.0 - s1, 1.0 - s_d
    c = math.sqrt(max(s1 * s1 - (s_d * a1 / a_d) ** 2, 0.0))
    return (a1 / a_d) * x_d + (s_noise * c) * _noise(x_d, generator)


@cache
def _gauss_legendre01(n: int) -> tuple[np.ndarray, np.ndarray]:
    t, w = np.polynomial.legendre.leggauss(n)
    return (t + 1) / 2, w / 2


def _lagrange_integrals(nodes: Sequence[float], weight: Callable[[np.ndarray], np.ndarray], n_gauss: int) -> list:
    """∫_0^1 ℓ_j(θ)·weight(θ) dθ for the Lagrange basis ℓ_j on ``nodes`` (Gauss–Legendre, scaled variable θ)."""
    t, w = _gauss_legendre01(n_gauss)
    wt = w * weight(t)
    out = []
    for j, tj in enumerate(nodes):
        basis = np.ones_like(t)
        for m, tm in enumerate(nodes):
            if m != j:
                basis = basis * (t - tm) / (tj - tm)
        out.append(float(np.sum(wt * basis)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# First-order and Runge–Kutta samplers in σ (no history)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """Euler steps on the flow ODE dx/dσ = v (Karras et al. 2022, Algorithm 2 without churn); DDIM η = 0 is identical.

    The update is computed exactly as diffusers' ``FlowMatchEulerDiscreteScheduler.step``: ``x + (σ' − σ)·v`` with
    ``σ' − σ`` taken in the dtype of ``sigmas`` (float32 schedules reproduce ZImagePipeline bit for bit).
    """
    if isinstance(sigmas, torch.Tensor):
        sig = sigmas.detach().cpu()
    else:
        sig = torch.tensor(_floats(sigmas), dtype=torch.float64)
    for i in range(len(sig) - 1):
        s = float(sig[i])
        v = denoise(x, s)
        x_old = x
        x = x + (sig[i + 1] - sig[i]) * v
        if callback is not None:
            x = _report(callback, x, i=i, sigma=s, sigma_next=float(sig[i + 1]), denoised=x_old - s * v)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the step to σ' = 0. NFE 2N − 1."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        if s1 == 0:
            x_new = x + (s1 - s) * v
        else:
            v2 = denoise(x + (s1 - s) * v, s1)
            x_new = x + (s1 - s) * ((v + v2) / 2)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


@torch.no_grad()
def sample_dpm_2(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """DPM-Solver-2 in σ with a log-σ midpoint (k-diffusion ``sample_dpm_2``, Lu et al. 2022). NFE 2N − 1."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        if s1 == 0:
            x_new = x + (s1 - s) * v
        else:
            s_mid = math.sqrt(s * s1)
            v2 = denoise(x + (s_mid - s) * v, s_mid)
            x_new = x + (s1 - s) * v2
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


def _sample_rf_ancestral(denoise, x, sigmas, sigma_down, *, second_order, generator, callback, s_noise):
    """Step deterministically to σ_d = sigma_down(σ, σ') ≤ σ', then re-noise along the flow to σ' (§3.5, 3.6, 3.9)."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        if s1 == 0:
            x_new = denoised
        else:
            s_d = sigma_down(s, s1)
            if second_order and s_d > 0:  # KDPM2 step σ → σ_d through the log-midpoint
                s_mid = math.sqrt(s * s_d)
                x_d = x + (s_d - s) * denoise(x + (s_mid - s) * v, s_mid)
            else:  # Euler/DDIM step σ → σ_d
                x_d = (s_d / s) * x + (1 - s_d / s) * denoised
            x_new = _rf_renoise(x_d, s_d, s1, generator, s_noise)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


def _eta_sigma_down(eta: float):
    return lambda s, s1: s1 * (1 + (s1 / s - 1) * eta)


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoise, x: torch.Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, generator=None, callback=None
) -> torch.Tensor:
    """Euler ancestral for rectified flow (ComfyUI ``sample_euler_ancestral_RF``): σ_d = σ'(1 + (σ'/σ − 1)η), §3.5."""
    return _sample_rf_ancestral(
        denoise,
        x,
        sigmas,
        _eta_sigma_down(eta),
        second_order=False,
        generator=generator,
        callback=callback,
        s_noise=s_noise,
    )


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoise: Denoise, x: torch.Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, generator=None, callback=None
) -> torch.Tensor:
    """KDPM2 ancestral for rectified flow (ComfyUI ``sample_dpm_2_ancestral_RF``), §3.6. NFE 2N − 1."""
    return _sample_rf_ancestral(
        denoise,
        x,
        sigmas,
        _eta_sigma_down(eta),
        second_order=True,
        generator=generator,
        callback=callback,
        s_noise=s_noise,
    )


@torch.no_grad()
def sample_tcd(
    denoise: Denoise, x: torch.Tensor, sigmas, *, gamma: float = 0.3, generator=None, callback=None
) -> torch.Tensor:
    """Trajectory-consistency sampling (Zheng et al. 2024, arXiv 2402.19159) in flow σ: σ_d = (1 − γ)σ', §3.9."""
    return _sample_rf_ancestral(
        denoise,
        x,
        sigmas,
        lambda s, s1: (1 - gamma) * s1,
        second_order=False,
        generator=generator,
        callback=callback,
        s_noise=1.0,
    )


@torch.no_grad()
def sample_ddim(
    denoise: Denoise, x: torch.Tensor, sigmas, *, eta: float = 0.0, generator=None, callback=None
) -> torch.Tensor:
    """DDIM(η) (Song et al. 2020, arXiv 2010.02502) in flow form, §3.2: η = 0 is the Euler step, η = 1 the DDPM step."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        if s1 == 0:
            x_new = denoised
        else:
            e = _exp_neg_h(s, s1)
            c = eta * s1 * math.sqrt(max(1 - e * e, 0.0))
            x_new = (1 - s1) * denoised + math.sqrt(max(s1 * s1 - c * c, 0.0)) * (x + (1 - s) * v)
            if c > 0:
                x_new = x_new + c * _noise(x, generator)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """DDPM ancestral step (Ho et al. 2020): the exact Gaussian posterior q(x_σ' | x_σ, x0 = x̂0) of the flow, §3.7."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        if s1 == 0:
            x_new = denoised
        else:
            e = _exp_neg_h(s, s1)
            x_new = (s1 / s * e) * x + ((1 - s1) * (1 - e * e)) * denoised
            x_new = x_new + (s1 * math.sqrt(max(1 - e * e, 0.0))) * _noise(x, generator)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


@torch.no_grad()
def sample_lcm(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """Consistency-style sampling (Luo et al. 2023, arXiv 2310.04378): predict x̂0, re-noise fully to σ', §3.8.

    Matches diffusers' ``FlowMatchLCMScheduler`` given the same generator (it also draws, unused, on the last step).
    """
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        x_new = denoised if s1 == 0 else (1 - s1) * denoised + s1 * _noise(x, generator)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# DPM-Solver++ family (data-prediction exponential integrators in the flow λ)
# ---------------------------------------------------------------------------------------------------------------


def _phi2(h: float) -> float:
    """φ₂ of §3.11/3.12: (e^{−h} − 1)/h + 1."""
    return math.expm1(-h) / h + 1


def _low_order_cap(i: int, n: int, lower_order_final: bool) -> int:
    """diffusers' ``lower_order_final`` for fewer than 15 steps: last step order 1, second-to-last ≤ 2."""
    if lower_order_final and n < 15:
        if i == n - 1:
            return 1
        if i == n - 2:
            return 2
    return 3


def _dpmpp_multistep(denoise, x, sigmas, *, order, eta, s_noise, phi_ramp, lower_order_final, generator, callback):
    """DPM-Solver++(2M/3M) (Lu et al. 2022, arXiv 2211.01095) and their SDE forms (η > 0), §3.10–3.12.

    History: x̂0 and λ at previous nodes with σ < 1. The order ramps 1 → ``order`` with usable history.
    ``phi_ramp`` picks the k-diffusion ``3m_sde`` second-order term (α'φ₂·ΔD/r) over diffusers' midpoint term.
    """
    sig = _floats(sigmas)
    n = len(sig) - 1
    hist: list[tuple[torch.Tensor, float]] = []  # (x̂0, λ) of usable previous nodes, most recent last
    for i in range(n):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        d = x - s * v
        if s1 == 0:
            x_new = d
        else:
            lam, lam1 = _lam(s), _lam(s1)
            e = _exp_neg_h(s, s1)
            k = 1 if s >= 1 else min(order, 1 + len(hist), _low_order_cap(i, n, lower_order_final))
            c_d = (1 - s1) * (1 - e ** (1 + eta))  # α'(1 − E^{1+η})
            x_new = (s1 / s * e**eta) * x + c_d * d
            if k >= 2:
                h = lam1 - lam
                h_eta = h * (1 + eta)
                (d1, l1) = hist[-1]
                r0 = (lam - l1) / h
                d1_0 = (d - d1) / r0
                if k == 2:
                    if phi_ramp:
                        x_new = x_new + ((1 - s1) * _phi2(h_eta)) * d1_0
                    else:
                        x_new = x_new + (0.5 * c_d) * d1_0
                else:
                    (d2, l2) = hist[-2]
                    r1 = (l1 - l2) / h
                    d1_1 = (d1 - d2) / r1
                    dd1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    dd2 = (d1_0 - d1_1) / (r0 + r1)
                    phi2 = _phi2(h_eta)
                    phi3 = phi2 / h_eta - 0.5
                    x_new = x_new + ((1 - s1) * phi2) * dd1 - ((1 - s1) * phi3) * dd2
            if eta > 0 and s_noise > 0:
                x_new = x_new + (s1 * math.sqrt(max(1 - e ** (2 * eta), 0.0)) * s_noise) * _noise(x, generator)
        if s < 1:
            hist = _push(hist, (d, _lam(s)), order - 1)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=d)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoise, x: torch.Tensor, sigmas, *, lower_order_final: bool = True, generator=None, callback=None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) on the flow λ = log((1 − σ)/σ), §3.10.

    Equal to diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    use_flow_sigmas=True, prediction_type="flow_prediction")`` on the same σ list.
    """
    return _dpmpp_multistep(
        denoise,
        x,
        sigmas,
        order=2,
        eta=0.0,
        s_noise=0.0,
        phi_ramp=False,
        lower_order_final=lower_order_final,
        generator=generator,
        callback=callback,
    )


@torch.no_grad()
def sample_dpmpp_3m(
    denoise: Denoise, x: torch.Tensor, sigmas, *, lower_order_final: bool = True, generator=None, callback=None
) -> torch.Tensor:
    """DPM-Solver++(3M) as published (diffusers ``solver_order=3``; converges at order 2, see §3.11), flow λ."""
    return _dpmpp_multistep(
        denoise,
        x,
        sigmas,
        order=3,
        eta=0.0,
        s_noise=0.0,
        phi_ramp=False,
        lower_order_final=lower_order_final,
        generator=generator,
        callback=callback,
    )


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    lower_order_final: bool = True,
    generator=None,
    callback=None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``, midpoint) on the flow λ, §3.12.

    η = 1 equals diffusers' ``algorithm_type="sde-dpmsolver++"`` given the same noise stream.
    """
    return _dpmpp_multistep(
        denoise,
        x,
        sigmas,
        order=2,
        eta=eta,
        s_noise=s_noise,
        phi_ramp=False,
        lower_order_final=lower_order_final,
        generator=generator,
        callback=callback,
    )


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    lower_order_final: bool = True,
    generator=None,
    callback=None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``) on the flow λ, §3.12."""
    return _dpmpp_multistep(
        denoise,
        x,
        sigmas,
        order=3,
        eta=eta,
        s_noise=s_noise,
        phi_ramp=True,
        lower_order_final=lower_order_final,
        generator=generator,
        callback=callback,
    )


def _ancestral_rho(rho: float, rho1: float, eta: float) -> tuple[float, float]:
    """k-diffusion ``get_ancestral_step`` on ρ = σ/(1 − σ), the VE noise level of x/α: (ρ_down, ρ_up)."""
    if not eta:
        return rho1, 0.0
    up = min(rho1, eta * math.sqrt(rho1**2 * (rho**2 - rho1**2) / rho**2))
    return math.sqrt(rho1**2 - up**2), up


@torch.no_grad()
def sample_dpmpp_sde(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    generator=None,
    callback=None,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, single-step; k-diffusion ``sample_dpmpp_sde``) on the flow λ, §3.13. NFE 2N − 1.

    Two noise draws per step (independent, not a Brownian tree). A first σ = 1 is offset to 1 − 1e-4.
    """
    sig = _offset_first(_floats(sigmas))
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        d = x - s * v
        if s1 == 0:
            x_new = d
        else:
            lam = _lam(s)
            lam_m = lam + r * (_lam(s1) - lam)
            s_m = 1 / (1 + math.exp(lam_m))
            rho, rho_m, rho1 = s / (1 - s), math.exp(-lam_m), s1 / (1 - s1)
            a, a_m, a1 = 1 - s, 1 - s_m, 1 - s1
            # stage 1: σ → σ_m
            rd, ru = _ancestral_rho(rho, rho_m, eta)
            eg = rd / rho
            x2 = (a_m / a * eg) * x + (a_m * (1 - eg)) * d
            if eta > 0 and s_noise > 0:
                x2 = x2 + (a_m * ru * s_noise) * _noise(x, generator)
            d_m = x2 - s_m * denoise(x2, s_m)
            # stage 2: σ → σ'
            rd, ru = _ancestral_rho(rho, rho1, eta)
            eg = rd / rho
            fac = 1 / (2 * r)
            x_new = (a1 / a * eg) * x + (a1 * (1 - eg)) * ((1 - fac) * d + fac * d_m)
            if eta > 0 and s_noise > 0:
                x_new = x_new + (a1 * ru * s_noise) * _noise(x, generator)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=d)
    return x


@torch.no_grad()
def sample_dpmpp_2s(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """DPM-Solver++(2S) with the λ-midpoint, one extra evaluation per step (η = 0 of ``sample_dpmpp_sde``), §3.14."""
    return sample_dpmpp_sde(denoise, x, sigmas, eta=0.0, generator=generator, callback=callback)


def _singlestep_orders(n: int) -> list[int]:
    """diffusers ``DPMSolverSinglestepScheduler.get_order_list`` for solver_order=2, lower_order_final, σ_N = 0."""
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    orders[-1] = 1
    return orders


@torch.no_grad()
def sample_dpmpp_2s_singlestep(
    denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None
) -> torch.Tensor:
    """DPM-Solver++(2S) paired on the schedule (diffusers ``DPMSolverSinglestepScheduler``, solver_order=2), §3.14.

    The σ list is consumed with orders [1, 2, 1, 2, …]: an order-2 step goes from the pair's start node to the next
    node using the middle node as σ_c; NFE N. A first σ = 1 is offset to 1 − 1e-4. If a callback replaced the middle
    latent, the replacement is carried by the first-order transport ``(σ'/σ_c)·(x_replaced − x_computed)``.
    """
    sig = _offset_first(_floats(sigmas))
    n = len(sig) - 1
    orders = _singlestep_orders(n) if n else []
    start = None  # (x, x̂0, σ) at the start of the current pair
    x_mid = None  # the middle latent as the order-1 step computed it
    for i in range(n):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        d = x - s * v
        if orders[i] == 1 or start is None:
            start = (x, d, s)
            x_new = (s1 / s) * x + (1 - s1 / s) * d
        else:
            x_a, d_a, s_a = start
            lam_a = _lam(s_a)
            h = _lam(s1) - lam_a
            r0 = (_lam(s) - lam_a) / h
            c_d = (1 - s1) * (1 - _exp_neg_h(s_a, s1))
            x_new = (s1 / s_a) * x_a + c_d * d_a + (0.5 * c_d / r0) * (d - d_a)
            if x is not x_mid:
                x_new = x_new + (s1 / s) * (x - x_mid)
        x_mid = x_new
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=d)
    return x


# ---------------------------------------------------------------------------------------------------------------
# UniPC and DEIS (multistep, polynomial extrapolation in λ / log ρ)
# ---------------------------------------------------------------------------------------------------------------


def _unipc_update(x, s, s1, m0, hist, m_new, order, variant, corrector):
    """One UniP (``corrector=False``) or UniC (``corrector=True``, uses ``m_new``) update from σ to σ', §3.15.

    ``hist`` holds the (x̂0, λ) of the ``order − 1`` nodes before σ (most recent last); ``m0`` is x̂0 at σ.
    """
    lam = _lam(s)
    h = _lam(s1) - lam
    e = _exp_neg_h(s, s1)
    x_lin = (s1 / s) * x + ((1 - s1) * (1 - e)) * m0
    rks, d1s = [], []
    for m_k, lam_k in reversed(hist[len(hist) - (order - 1) :] if order > 1 else []):
        rk = (lam_k - lam) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    if not corrector and order == 1:
        return x_lin
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks_all = np.array([*rks, 1.0])
    psi, fact, b = math.expm1(hh) / hh - 1, 1, []
    for q in range(1, order + 1):
        b.append(psi * fact / b_h)
        fact *= q + 1
        psi = psi / hh - 1 / fact
    R = np.stack([rks_all ** (q - 1) for q in range(1, order + 1)])
    if corrector:
        coeffs = [0.5] if order == 1 else list(np.linalg.solve(R, np.array(b)))
        res = (m_new - m0) * float(coeffs[-1])
    else:
        coeffs = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], np.array(b[:-1])))
        res = torch.zeros_like(x)
    for c, dk in zip(coeffs, d1s):
        res = res + float(c) * dk
    return x_lin - ((1 - s1) * b_h) * res


@torch.no_grad()
def sample_unipc(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    generator=None,
    callback=None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, arXiv 2302.04867): UniP-``order`` predictor + UniC corrector, data prediction, §3.15.

    ``variant`` is ``"bh1"`` (B(h) = −h) or ``"bh2"`` (B(h) = e^{−h} − 1). Equal to diffusers'
    ``UniPCMultistepScheduler`` (flow settings) on the same σ list. The corrector reuses the next evaluation (no
    extra NFE); it is skipped after a step that started at σ = 1. A callback's replacement of the predicted latent is
    kept: the corrector's change ``UniC − UniP`` is added to the replaced latent.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    sig = _floats(sigmas)
    n = len(sig) - 1
    hist: list[tuple[torch.Tensor, float]] = []  # (x̂0, λ) of usable nodes before the current one
    prev = None  # (x the last predictor started from, its σ, its x̂0, its history, its order, its output)
    for i in range(n):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        m = x - s * v
        if prev is not None and prev[1] < 1:
            x_p, s_p, m_p, hist_p, k_p, x_pred = prev
            x_c = _unipc_update(x_p, s_p, s, m_p, hist_p, m, k_p, variant, corrector=True)
            x = x_c if x is x_pred else x_c + (x - x_pred)
        if s1 == 0:
            k = 1
        else:
            k = 1 if s >= 1 else min(order, 1 + len(hist))
            if lower_order_final:
                k = min(k, n - i)
        x_new = _unipc_update(x, s, s1, m, hist, None, k, variant, corrector=False) if s1 > 0 else m
        prev = (x, s, m, list(hist), k, x_new)
        if s < 1:
            hist = _push(hist, (m, _lam(s)), order - 1)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=m)
    return x


@torch.no_grad()
def sample_deis(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    generator=None,
    callback=None,
) -> torch.Tensor:
    """ρAB-DEIS (Zhang & Chen 2022, arXiv 2204.13902): Lagrange extrapolation of ε̂ in log ρ, exact in ρ, §3.16.

    Coefficients ``∫_ρ^ρ' ℓ_j(log ρ̃) dρ̃`` are integrated in the scaled variable θ (log ρ̃ = log ρ + θ·h) with
    16-point Gauss–Legendre. The steps from σ = 1 and to σ' = 0 are DDIM; diffusers' ``lower_order_final`` applies.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
    sig = _floats(sigmas)
    n = len(sig) - 1
    hist: list[tuple[torch.Tensor, float]] = []  # (ε̂, log ρ) of usable previous nodes
    for i in range(n):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        d = x - s * v
        eps = x + (1 - s) * v
        k = 1 if s >= 1 or s1 == 0 else min(order, 1 + len(hist), _low_order_cap(i, n, lower_order_final))
        if k == 1:
            x_new = (1 - s1) * d + s1 * eps
        else:
            u, u1 = math.log(s / (1 - s)), math.log(s1 / (1 - s1))
            h = u1 - u
            nodes_eps = [eps] + [e for e, _ in reversed(hist[len(hist) - (k - 1) :])]
            nodes = [0.0] + [(uk - u) / h for _, uk in reversed(hist[len(hist) - (k - 1) :])]
            coeffs = _lagrange_integrals(nodes, lambda t, h=h: np.exp(h * t), 16)
            rho = s / (1 - s)
            acc = x / (1 - s)
            for c, e in zip(coeffs, nodes_eps):
                acc = acc + (rho * h * c) * e
            x_new = (1 - s1) * acc
        if s < 1:
            hist = _push(hist, (eps, math.log(s / (1 - s))), order - 1)
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=d)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Linear multistep in σ (LMS, iPNDM) and PNDM
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_lms(
    denoise: Denoise, x: torch.Tensor, sigmas, *, order: int = 4, generator=None, callback=None
) -> torch.Tensor:
    """Linear multistep (variable-step Adams–Bashforth) in σ on v (k-diffusion ``sample_lms``), §3.17.

    Coefficients are integrated in θ = (τ − σ_i)/Δ by Gauss–Legendre (exact for these polynomials). The last step,
    to σ' = 0, keeps full order.
    """
    sig = _floats(sigmas)
    vs: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        vs = _push(vs, v, order)
        k = len(vs)
        dt = s1 - s
        nodes = [(sig[i - j] - s) / dt for j in range(k)]  # θ of σ_i, σ_{i−1}, …
        coeffs = _lagrange_integrals(nodes, np.ones_like, max(2, (k + 1) // 2 + 1))
        x_new = x
        for c, vj in zip(coeffs, reversed(vs)):
            x_new = x_new + (dt * c) * vj
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=x - s * v)
    return x


_AB_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_ipndm(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2022, arXiv 2204.13902): fixed Adams–Bashforth coefficients in σ on v, §3.18."""
    sig = _floats(sigmas)
    vs: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        vs = _push(vs, v, 4)
        if s1 == 0:
            x_new = denoised
        else:
            x_new = x
            for c, vj in zip(_AB_COEFFS[len(vs)], reversed(vs)):
                x_new = x_new + ((s1 - s) * c) * vj
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


@torch.no_grad()
def sample_pndm(denoise: Denoise, x: torch.Tensor, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """Pseudo linear multistep (PLMS; Liu et al. 2022, arXiv 2202.09778): AB-combined ε̂ + DDIM transfer, §3.19.

    The step from σ = 1 is plain DDIM and its ε̂ is not kept; NFE N (no Runge–Kutta warm-up, no re-evaluation).
    """
    sig = _floats(sigmas)
    epss: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        denoised = x - s * v
        eps = x + (1 - s) * v
        if s1 == 0:
            x_new = denoised
        elif s >= 1:
            x_new = (1 - s1) * denoised + s1 * eps
        else:
            epss = _push(epss, eps, 4)
            eps_c = sum(c * e for c, e in zip(_AB_COEFFS[len(epss)], reversed(epss)))
            x0_c = (x - s * eps_c) / (1 - s)
            x_new = (1 - s1) * x0_c + s1 * eps_c
        x = _report(callback, x_new, i=i, sigma=s, sigma_next=s1, denoised=denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Inversion (DPMSolverMultistepInverse)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def invert_dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas) -> torch.Tensor:
    """Integrate the flow ODE from data (σ = 0) up to ``sigmas[0]`` with DPM-Solver++(2M) on the reversed list, §3.20.

    ``x`` is the clean latent; ``sigmas`` the (truncated) sampling schedule ending in 0. The first step leaves σ = 0
    by its Euler limit ``x + σ'·v(x, 0)`` (the only place a denoiser is asked for σ = 0), which gives no usable
    history (λ = +∞); the rest is the 2M update with h < 0. NFE ``len(sigmas) − 1``.
    """
    sig = _floats(sigmas)[::-1]
    if sig[0] != 0:
        raise ValueError("invert_dpmpp_2m needs a schedule that ends in 0")
    prev = None  # (x̂0, λ) of the previous usable node
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        v = denoise(x, s)
        if s == 0:
            x = x + s1 * v
            continue
        d = x - s * v
        lam, lam1 = _lam(s), _lam(s1)
        c_d = (1 - s1) - s1 * (1 - s) / s  # α'(1 − e^{−h}), finite also for σ' = 1
        x_new = (s1 / s) * x + c_d * d
        if prev is not None and s1 < 1:
            r = (lam - prev[1]) / (lam1 - lam)
            x_new = x_new + (0.5 * c_d / r) * (d - prev[0])
        prev = (d, lam)
        x = x_new
    return x


@torch.no_grad()
def sample_dpmpp_2m_inverse(
    denoise: Denoise, x: torch.Tensor, sigmas, *, lower_order_final: bool = True, generator=None, callback=None
) -> torch.Tensor:
    """``DPMSolverMultistepInverse``: invert the clean latent ``x`` to ``sigmas[0]``, then sample back with DPM++ 2M.

    Unlike every other sampler, ``x`` is the **clean** seed-image latent (σ = 0), not noise; ``sigmas`` is the
    schedule truncated by ``strength``. Deterministic; NFE 2·(len(sigmas) − 1). The callback sees only the
    sampling-back steps.
    """
    x_t = invert_dpmpp_2m(denoise, x, sigmas)
    return sample_dpmpp_2m(denoise, x_t, sigmas, lower_order_final=lower_order_final, callback=callback)
