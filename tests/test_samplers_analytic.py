"""The analytic test bed of samplers.md §5: Gaussian data, whose flow velocity and flow map are known in closed form.

x0 ~ N(μ, diag(s²)) per coordinate; then (§5.1, §5.2), with V(σ) = (1 − σ)²s² + σ² and u = x − (1 − σ)μ,

    v*(x, σ) = ((σ − (1 − σ)s²)/V)·u − μ        x(σ_b) = (1 − σ_b)μ + sqrt(V(σ_b)/V(σ_a))·(x(σ_a) − (1 − σ_a)μ)

Every expected number below comes from these formulas or is quoted from samplers.md §5.4, never from our samplers.
No neural network: float64, vectorised over many start points or samples.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from zimage_core import samplers as S
from zimage_core.scheduler_table import FAMILIES, SCHEDULER_NAMES, resolve_scheduler
from zimage_core.schedules import default_sigmas, img2img_start, shift_sigmas, unshift_sigmas

MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
SD = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
SHIFT = 3.0


class Gaussian:
    """Closed forms of §5.1–5.2 for data N(mu, diag(sd²))."""

    def __init__(self, mu: torch.Tensor, sd: torch.Tensor):
        self.mu, self.sd = mu, sd

    def var(self, s: float) -> torch.Tensor:
        return (1 - s) ** 2 * self.sd**2 + s**2

    def velocity(self, x: torch.Tensor, s: float) -> torch.Tensor:
        mu, sd = self.mu.to(x.dtype), self.sd.to(x.dtype)
        u = x - (1 - s) * mu
        return ((s - (1 - s) * sd**2) / ((1 - s) ** 2 * sd**2 + s**2)) * u - mu

    def flow(self, x: torch.Tensor, sa: float, sb: float) -> torch.Tensor:
        return (1 - sb) * self.mu + torch.sqrt(self.var(sb) / self.var(sa)) * (x - (1 - sa) * self.mu)

    def denoise_gain(self, s: float) -> torch.Tensor:
        """k(σ) with x̂0* = μ + k·(x − (1 − σ)μ)."""
        return (1 - s) * self.sd**2 / self.var(s)


BED = Gaussian(MU, SD)


STARTS = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def interval_sigmas(n: int) -> torch.Tensor:
    """§5.4(a): σ_k = shift(linspace(u_a, u_b, n + 1)) from 0.95 to 0.05, no terminal 0 (avoids the λ singularities)."""
    ua, ub = unshift_sigmas(0.95, SHIFT), unshift_sigmas(0.05, SHIFT)
    return shift_sigmas(torch.linspace(ua, ub, n + 1, dtype=torch.float64), SHIFT)


def interval_error(sampler, n: int, bed: Gaussian = BED, starts: torch.Tensor = STARTS, callback=None) -> float:
    sig = interval_sigmas(n)
    x = sampler(bed.velocity, starts.clone(), sig, callback=callback)
    return float((x - bed.flow(starts, float(sig[0]), float(sig[-1]))).abs().max())


def full_error(sampler, n: int) -> float:
    x = sampler(BED.velocity, STARTS.clone(), default_sigmas(n, SHIFT, dtype=torch.float64))
    return float((x - BED.flow(STARTS, 1.0, 0.0)).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# The closed forms themselves
# ---------------------------------------------------------------------------------------------------------------


def test_closed_forms_are_consistent():
    x = STARTS[:8]
    assert torch.allclose(BED.velocity(x, 1.0), x - MU)  # σ = 1: x̂0* = μ
    assert torch.allclose(BED.velocity(x, 0.0), -x)  # σ = 0: x̂0* = x
    via = BED.flow(BED.flow(x, 1.0, 0.4), 0.4, 0.0)
    assert torch.allclose(via, BED.flow(x, 1.0, 0.0), atol=1e-14)  # the flow map composes (§5.2)
    for s in (0.1, 0.5, 0.9):  # and solves dx/dσ = v*
        h = 1e-6
        deriv = (BED.flow(x, 0.7, s + h) - BED.flow(x, 0.7, s - h)) / (2 * h)
        assert torch.allclose(deriv, BED.velocity(BED.flow(x, 0.7, s), s), atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# (a) Convergence order of every deterministic sampler: rate log2(e(N)/e(2N)) at N = 128 → 256 (§5.4 table)
# ---------------------------------------------------------------------------------------------------------------

RATES = {
    "euler": (S.sample_euler, 1.00),
    "ddim": (partial(S.sample_ddim, eta=0.0), 1.00),
    "euler_a eta=0": (partial(S.sample_euler_ancestral, eta=0.0), 1.00),
    "tcd gamma=0": (partial(S.sample_tcd, gamma=0.0), 1.00),
    "heun": (S.sample_heun, 2.00),
    "kdpm2": (S.sample_dpm_2, 2.00),
    "dpmpp_2s": (S.sample_dpmpp_2s, 1.99),
    "dpmpp_2m": (S.sample_dpmpp_2m, 2.05),
    "dpmpp_2m_sde eta=0": (partial(S.sample_dpmpp_2m_sde, eta=0.0), 2.05),
    "dpmpp_2s_singlestep": (S.sample_dpmpp_2s_singlestep, 1.67),
    "dpmpp_3m": (S.sample_dpmpp_3m, 2.46),
    "dpmpp_3m_sde eta=0": (partial(S.sample_dpmpp_3m_sde, eta=0.0), 2.46),
    "deis2": (partial(S.sample_deis, order=2), 1.90),
    "deis3": (partial(S.sample_deis, order=3), 2.54),
    "lms4": (S.sample_lms, 2.01),
    "ipndm": (S.sample_ipndm, 2.01),
    "pndm": (S.sample_pndm, 1.95),
    "unipc2": (partial(S.sample_unipc, order=2), 1.89),
    "unipc3": (partial(S.sample_unipc, order=3), 1.88),
}


@pytest.mark.parametrize("name", list(RATES))
def test_convergence_rate(name):
    sampler, rate = RATES[name]
    e1, e2 = interval_error(sampler, 128), interval_error(sampler, 256)
    assert e2 < e1 < 0.1
    assert math.log2(e1 / e2) == pytest.approx(rate, abs=0.15)


# Nominal orders (§5.4(a), last paragraph): 1-D data with s = 1, the first K − 1 nodes overwritten with the exact
# flow map (through the callback), no lower-order final step, N = 512 → 1024.
BED_1D = Gaussian(torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
STARTS_1D = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
NOMINAL = {
    "lms4": (partial(S.sample_lms, order=4), 4, 4.02),
    "lms3": (partial(S.sample_lms, order=3), 3, 3.07),
    "deis3": (partial(S.sample_deis, order=3, lower_order_final=False), 3, 2.94),
    "unipc2 bh1": (partial(S.sample_unipc, order=2, variant="bh1", lower_order_final=False), 2, 3.00),
    "unipc2 bh2": (partial(S.sample_unipc, order=2, variant="bh2", lower_order_final=False), 2, 2.98),
    "unipc3 bh2": (partial(S.sample_unipc, order=3, variant="bh2", lower_order_final=False), 3, 3.95),
    "dpmpp_3m": (partial(S.sample_dpmpp_3m, lower_order_final=False), 3, 1.83),
    "ipndm": (S.sample_ipndm, 4, 2.00),
    "pndm": (S.sample_pndm, 4, 2.00),
}


@pytest.mark.parametrize("name", list(NOMINAL))
def test_nominal_order_with_exact_startup(name):
    sampler, k, rate = NOMINAL[name]

    def err(n):
        s0 = float(interval_sigmas(n)[0])

        def exact_startup(info):
            if info["i"] < k - 1:
                return BED_1D.flow(STARTS_1D, s0, info["sigma_next"])

        return interval_error(sampler, n, BED_1D, STARTS_1D, callback=exact_startup)

    assert math.log2(err(512) / err(1024)) == pytest.approx(rate, abs=0.15)


# ---------------------------------------------------------------------------------------------------------------
# (b) The full Z-Image schedule, σ 1 → 0
# ---------------------------------------------------------------------------------------------------------------

FULL = {
    "heun": S.sample_heun,
    "kdpm2": S.sample_dpm_2,
    "dpmpp_2m": S.sample_dpmpp_2m,
    "dpmpp_3m": S.sample_dpmpp_3m,
    "dpmpp_2s_singlestep": S.sample_dpmpp_2s_singlestep,
    "deis2": partial(S.sample_deis, order=2),
    "unipc2": partial(S.sample_unipc, order=2),
    "unipc3": partial(S.sample_unipc, order=3),
    "lms4": S.sample_lms,
    "ipndm": S.sample_ipndm,
    "pndm": S.sample_pndm,
}
FULL_NS = [4, 8, 16, 32, 64]


@pytest.fixture(scope="module")
def euler_full():
    return {n: full_error(S.sample_euler, n) for n in FULL_NS}


def test_full_schedule_euler_is_first_order(euler_full):
    errs = [euler_full[n] for n in FULL_NS]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert math.log2(euler_full[32] / euler_full[64]) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("name", list(FULL))
def test_full_schedule_decreasing_and_beats_euler(name, euler_full):
    errs = {n: full_error(FULL[name], n) for n in FULL_NS}
    assert all(errs[a] > errs[b] for a, b in zip(FULL_NS, FULL_NS[1:])), errs
    assert all(errs[n] < euler_full[n] for n in FULL_NS if n >= 16), (errs, euler_full)


def test_inverse_converges_to_the_exact_flow_map():
    """DPMSolverMultistepInverse: the inversion tends to the exact map 0 → σ_start; inversion + sampling back → x0."""
    x0 = MU + SD * STARTS
    inv_err, round_trip = [], []
    for n in (16, 32, 64, 128, 256):
        sig = default_sigmas(n, SHIFT, dtype=torch.float64)[img2img_start(n, 0.6) :]
        xt = S.invert_dpmpp_2m(BED.velocity, x0.clone(), sig)
        inv_err.append(float((xt - BED.flow(x0, 0.0, float(sig[0]))).abs().max()))
        round_trip.append(float((S.sample_dpmpp_2m_inverse(BED.velocity, x0.clone(), sig) - x0).abs().max()))
    for errs in (inv_err, round_trip):
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
        assert errs[-2] / errs[-1] > 2.5  # at least first order, approaching second


# ---------------------------------------------------------------------------------------------------------------
# (c) NFE: counted model calls equal the NFE column of samplers.md §4
# ---------------------------------------------------------------------------------------------------------------

TWO_N_MINUS_ONE = {
    "Heun", "HeunDiscreteScheduler", "Heun Karras", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DPM++ SDE", "DPM++ SDE Karras", "DPM++ SDE Exponential", "DPM++ SDE Beta",
}  # fmt: skip
TWO_N = {"DPMSolverMultistepInverse"}


def expected_nfe(name: str, n: int) -> int:
    return 2 * n - 1 if name in TWO_N_MINUS_ONE else 2 * n if name in TWO_N else n


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_nfe(name):
    spec = resolve_scheduler(name)
    for n in (1, 2, 3, 8, 12):
        calls = []

        def counting(x, s, calls=calls):
            calls.append(s)
            return BED.velocity(x, s)

        sig = spec.sigmas(n, SHIFT)
        out = spec.sample(counting, STARTS[:4].clone(), sig, generator=torch.Generator().manual_seed(0), x0=MU[None])
        assert torch.isfinite(out).all()
        assert len(calls) == expected_nfe(name, n) == spec.nfe(n), (name, n, len(calls))
        assert all(0 <= s <= 1 for s in calls)
        assert 0 not in calls or spec.requires_seed_image  # the model is never asked for σ = 0 when sampling


def test_heun_12_steps_takes_23_calls():
    assert resolve_scheduler("Heun").nfe(12) == 23  # §5.4(c)


# ---------------------------------------------------------------------------------------------------------------
# (d) Stochastic samplers: exact mean, exact finite-N variance where a closed form exists, variance convergence
# ---------------------------------------------------------------------------------------------------------------

B = 100_000


def draw(sampler, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, generator=g, dtype=torch.float32)  # float32 latents, as in the pipeline
    return sampler(BED.velocity, x, default_sigmas(n, SHIFT, dtype=torch.float64), generator=g).double()


STOCHASTIC = {
    "euler_a": S.sample_euler_ancestral,
    "kdpm2_a": S.sample_dpm_2_ancestral,
    "ddpm": S.sample_ddpm,
    "lcm": S.sample_lcm,
    "tcd": S.sample_tcd,
    "dpmpp_sde": S.sample_dpmpp_sde,
    "dpmpp_2m_sde": S.sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": S.sample_dpmpp_3m_sde,
}


@pytest.fixture(scope="module")
def samples_n10():
    return {name: draw(fn, 10) for name, fn in STOCHASTIC.items()}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_mean_is_exact(name, samples_n10):
    out = samples_n10[name]
    assert torch.isfinite(out).all()
    assert bool(((out.mean(0) - MU).abs() < 4 * SD / math.sqrt(B)).all()), (out.mean(0) - MU) / (SD / math.sqrt(B))


def test_ve_ancestral_step_fails_the_mean_test():
    """Regression guard (§3.5, §5.4(d)): k-diffusion's VE ancestral step on flow σ drifts by hundreds of std errors."""

    def ve_euler_ancestral(denoise, x, sigmas, generator=None):
        sig = [float(s) for s in sigmas]
        for s, s1 in zip(sig[:-1], sig[1:]):
            up = math.sqrt(s1**2 * (s**2 - s1**2) / s**2)
            down = math.sqrt(s1**2 - up**2)
            x = x + (down - s) * denoise(x, s)
            x = x + up * torch.randn(x.shape, generator=generator, dtype=torch.float32)
        return x

    out = draw(ve_euler_ancestral, 10)
    assert float(((out.mean(0) - MU) / (SD / math.sqrt(B))).abs().max()) > 100


def step_coefficients(kind: str, s: float, s1: float) -> tuple[float, float, float]:
    """(a, b, c) of x' = a·x + b·x̂0 + c·z for the history-free samplers (§3.5, 3.7, 3.8, 3.9), from their formulas."""
    if s1 == 0:
        return 0.0, 1.0, 0.0
    if kind == "lcm":
        return 0.0, 1 - s1, s1
    if kind == "ddpm":
        e = s1 * (1 - s) / (s * (1 - s1))
        return s1 / s * e, (1 - s1) * (1 - e * e), s1 * math.sqrt(1 - e * e)
    s_d = s1 * s1 / s if kind == "euler_a" else (1 - 0.3) * s1  # η = 1; TCD γ = 0.3
    f = (1 - s1) / (1 - s_d)
    return f * s_d / s, f * (1 - s_d / s), math.sqrt(s1**2 - (s_d * f) ** 2)


def predicted_std(kind: str, n: int) -> torch.Tensor:
    """Var' = (a + b·k)²·Var + c², Var_0 = 1 (§5.4(d))."""
    sig = [float(s) for s in default_sigmas(n, SHIFT, dtype=torch.float64)]
    var = torch.ones(4, dtype=torch.float64)
    for s, s1 in zip(sig[:-1], sig[1:]):
        a, b, c = step_coefficients(kind, s, s1)
        var = (a + b * BED.denoise_gain(s)) ** 2 * var + c * c
    return var.sqrt()


QUOTED_STD_N10 = {  # samplers.md §5.4(d), N = 10, shift 3
    "lcm": (0.0275, 0.283, 0.602, 1.250),
    "euler_a": (0.0280, 0.336, 0.754, 1.611),
    "ddpm": (0.0279, 0.330, 0.740, 1.580),
    "tcd": (0.0281, 0.341, 0.744, 1.528),
}


@pytest.mark.parametrize("name", list(QUOTED_STD_N10))
def test_exact_finite_n_variance(name, samples_n10):
    pred = predicted_std(name, 10)
    assert torch.allclose(pred, torch.tensor(QUOTED_STD_N10[name], dtype=torch.float64), rtol=2e-3, atol=1e-4)
    std = samples_n10[name].std(0)
    z = (std - pred) / (pred / math.sqrt(2 * B))
    assert float(z.abs().max()) < 4, z


CONVERGENCE_N30 = {  # relative std error, max over s ≥ 0.5, N = 30 (§5.4(d))
    "kdpm2_a": 0.005,
    "dpmpp_sde": 0.141,
    "dpmpp_2m_sde": 0.044,
    "dpmpp_3m_sde": 0.106,
}


@pytest.mark.parametrize("name", list(CONVERGENCE_N30))
def test_variance_convergence_n30(name):
    out = draw(STOCHASTIC[name], 30)
    rel = ((out.std(0) - SD) / SD)[1:].abs().max()
    assert float(rel) == pytest.approx(CONVERGENCE_N30[name], abs=0.012)


# ---------------------------------------------------------------------------------------------------------------
# Identities between families (§3.2, 3.7, 3.9, 3.12)
# ---------------------------------------------------------------------------------------------------------------

SIG12 = default_sigmas(12, SHIFT, dtype=torch.float64)


def run(sampler, seed=4, **kw):
    return sampler(BED.velocity, STARTS.clone(), SIG12, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize(
    "a,b",
    [
        (partial(S.sample_ddim, eta=0.0), S.sample_euler),  # DDIM η = 0 is Euler
        (partial(S.sample_ddim, eta=1.0), S.sample_ddpm),  # DDIM η = 1 is the DDPM posterior step
        (partial(S.sample_euler_ancestral, eta=0.0), S.sample_euler),
        (partial(S.sample_tcd, gamma=0.0), S.sample_euler),
        (partial(S.sample_tcd, gamma=1.0), S.sample_lcm),  # TCD γ = 1 is LCM
        (partial(S.sample_dpmpp_2m_sde, eta=0.0), S.sample_dpmpp_2m),
        (partial(S.sample_dpm_2_ancestral, eta=0.0), S.sample_dpm_2),
        (partial(S.sample_deis, order=1), S.sample_euler),  # DEIS-1 is DDIM
    ],
    ids=["ddim0-euler", "ddim1-ddpm", "eulera0-euler", "tcd0-euler", "tcd1-lcm", "2msde0-2m", "kdpm2a0-kdpm2", "deis1"],
)
def test_family_identities(a, b):
    assert torch.allclose(run(a), run(b), rtol=0, atol=1e-12)


def test_first_order_sde_step_is_ddpm():
    """§3.7: the first-order SDE-DPM-Solver++ step (2M SDE with no usable history) is the DDPM step."""
    sig = SIG12[3:5]  # one interior step: no history
    a = S.sample_dpmpp_2m_sde(BED.velocity, STARTS.clone(), sig, generator=torch.Generator().manual_seed(3))
    b = S.sample_ddpm(BED.velocity, STARTS.clone(), sig, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# A latent replaced by the step callback is honoured: the output responds to it as the exact flow map does
# ---------------------------------------------------------------------------------------------------------------

DETERMINISTIC_FAMILIES = [key for key, fam in FAMILIES.items() if not fam.stochastic]


@pytest.mark.parametrize("step", [14, 15])
@pytest.mark.parametrize("key", DETERMINISTIC_FAMILIES)
def test_replaced_latent_is_honoured(key, step):
    """The field is linear, so out(x + δ at node i+1) − out(x) = J·δ; the exact J is sqrt(V(0)/V(σ_{i+1})).

    A multistep method that dropped the replacement when revising a node (UniPC's corrector, the second half of a
    single-step pair) would respond with J ≈ 0.
    """
    fam, n = FAMILIES[key], 32
    sig = default_sigmas(n, SHIFT, dtype=torch.float64)

    def run(delta):
        cb = lambda info: info["x"] + delta if info["i"] == step else None
        return fam.sampler(BED.velocity, 0.3 * MU[None], sig, callback=cb, **fam.knobs)[0]

    response = run(1.0) - run(0.0)
    exact = SD / torch.sqrt(BED.var(float(sig[step + 1])))
    ratio = response / exact
    assert float(ratio[0]) > 0.5, ratio  # s = 0.1: the final x̂0 step from shift(1/N) dominates (§5.4(b))
    assert torch.allclose(ratio[1:], torch.ones(3, dtype=torch.float64), atol=0.15), ratio
