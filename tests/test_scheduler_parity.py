"""Our samplers against diffusers 0.42.1's flow-capable schedulers on the small random Z-Image transformer.

Both loops call the same velocity adapter (our transformer, ``v = −F(x, t_model)`` with ``t_model`` computed from σ
exactly as ZImagePipeline does), so any difference comes from the sampler. Each diffusers class runs on its own σ
list (read back after ``set_timesteps``), which our sampler is fed (samplers.md §6).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler,
    LTXEulerAncestralRFScheduler,
    UniPCMultistepScheduler,
)

from tests.helpers import SMALL_CONFIGS, diffusers_transformer
from zimage_core import ZImageTransformer
from zimage_core import samplers as S
from zimage_core.schedules import beta_sigmas, default_sigmas, exponential_sigmas, karras_sigmas

TOL = 1e-5
SHIFT = 3.0
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT)


@pytest.fixture(scope="module")
def denoise():
    """The small model as a sampler sees it: σ (float) -> velocity, with ZImagePipeline's timestep arithmetic."""
    model = ZImageTransformer.from_diffusers(diffusers_transformer("hd32"))
    g = torch.Generator().manual_seed(7)
    ctx = model.encode_context([torch.randn(12, SMALL_CONFIGS["hd32"]["cap_feat_dim"], generator=g)])

    @torch.no_grad()
    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.tensor([sigma], dtype=torch.float32) * 1000  # scheduler.timesteps = σ·1000 in float32
        t_model = (1000 - t) / 1000  # ZImagePipeline: timestep = (1000 - t) / 1000
        out = model.forward_with_context([x[0].unsqueeze(1)], t_model, ctx)[0]
        return -out.squeeze(1).unsqueeze(0).float()

    return velocity


def x_init(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_diffusers(sched, denoise, x, *, n_calls=None, generator=None):
    """The manual loop of ZImagePipeline with ``sched``: one model call per entry of ``sched.timesteps``."""
    sched.set_begin_index(0)
    for k in range(n_calls if n_calls is not None else len(sched.timesteps)):
        t = sched.timesteps[k]
        v = denoise(x, float(sched.sigmas[sched.step_index if sched.step_index is not None else 0]))
        kw = {} if generator is None else {"generator": generator}
        x = sched.step(v, t, x, return_dict=False, **kw)[0]
    return x


# ---------------------------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler: the Default path is bit-exact
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 6, 8])
@pytest.mark.parametrize(
    "flag,schedule",
    [
        (None, default_sigmas),
        ("use_karras_sigmas", karras_sigmas),
        ("use_exponential_sigmas", exponential_sigmas),
        ("use_beta_sigmas", beta_sigmas),
    ],
)
def test_flow_match_euler_exact(denoise, n, flag, schedule):
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT, **({flag: True} if flag else {}))
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist(), mu=0.9)  # exactly as ZImagePipeline
    sigmas = schedule(n, SHIFT)
    assert torch.equal(sigmas, sched.sigmas)
    want = run_diffusers(sched, denoise, x_init())
    got = S.sample_euler(denoise, x_init(), sigmas)
    assert torch.equal(got, want)  # bit for bit, not just within TOL


def test_flow_match_euler_stochastic_is_lcm(denoise):
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT, stochastic_sampling=True)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).tolist())
    want = run_diffusers(sched, denoise, x_init(), generator=torch.Generator().manual_seed(11))
    got = S.sample_lcm(denoise, x_init(), default_sigmas(8, SHIFT), generator=torch.Generator().manual_seed(11))
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("n", [4, 8])
def test_flow_match_lcm(denoise, n):
    sched = FlowMatchLCMScheduler(shift=SHIFT)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist())
    assert torch.equal(sched.sigmas, default_sigmas(n, SHIFT))
    want = run_diffusers(sched, denoise, x_init(), generator=torch.Generator().manual_seed(5))
    got = S.sample_lcm(denoise, x_init(), default_sigmas(n, SHIFT), generator=torch.Generator().manual_seed(5))
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("n", [3, 8])
def test_flow_match_heun(denoise, n):
    sched = FlowMatchHeunDiscreteScheduler(shift=SHIFT)
    sched.set_timesteps(n)
    assert len(sched.timesteps) == 2 * n - 1  # the model-call count of Heun
    sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1:-1:2], sched.sigmas[-1:]])  # de-duplicated σ list
    calls = []
    want = run_diffusers(sched, denoise, x_init())
    got = S.sample_heun(lambda x, s: calls.append(s) or denoise(x, s), x_init(), sigmas)
    assert len(calls) == 2 * n - 1
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("n", [6, 8])
def test_ltx_euler_ancestral_rf(denoise, n):
    sched = LTXEulerAncestralRFScheduler(eta=1.0)
    sigmas = default_sigmas(n, SHIFT)
    sched.set_timesteps(sigmas=sigmas.tolist())  # takes the shifted list with its terminal 0 as given
    want = run_diffusers(sched, denoise, x_init(), n_calls=n, generator=torch.Generator().manual_seed(2))
    got = S.sample_euler_ancestral(denoise, x_init(), sigmas, generator=torch.Generator().manual_seed(2))
    assert rel(got, want) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Multistep / single-step exponential integrators with use_flow_sigmas (their own σ lists)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 20])
@pytest.mark.parametrize(
    "kwargs,sampler",
    [
        (dict(algorithm_type="dpmsolver++", solver_order=2), S.sample_dpmpp_2m),
        (dict(algorithm_type="dpmsolver++", solver_order=3), S.sample_dpmpp_3m),
        (dict(algorithm_type="sde-dpmsolver++", solver_order=2), S.sample_dpmpp_2m_sde),
    ],
    ids=["2M", "3M", "2M-SDE"],
)
def test_dpmsolver_multistep(denoise, n, kwargs, sampler):
    sched = DPMSolverMultistepScheduler(**FLOW, **kwargs)
    sched.set_timesteps(n)
    sigmas = sched.sigmas.clone()
    assert len(sigmas) == n + 1 and sigmas[-1] == 0 and 0.999 < sigmas[0] < 1
    want = run_diffusers(sched, denoise, x_init(), generator=torch.Generator().manual_seed(9))
    got = sampler(denoise, x_init(), sigmas, generator=torch.Generator().manual_seed(9))
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("n", [8, 9, 20])
def test_dpmsolver_singlestep(denoise, n):
    sched = DPMSolverSinglestepScheduler(**FLOW, solver_order=2)
    sched.set_timesteps(n)
    want = run_diffusers(sched, denoise, x_init())
    got = S.sample_dpmpp_2s_singlestep(denoise, x_init(), sched.sigmas.clone())
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("n", [5, 8, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh2(denoise, n, order):
    sched = UniPCMultistepScheduler(**FLOW, solver_order=order, solver_type="bh2")
    sched.set_timesteps(n)
    sigmas = sched.sigmas.clone()
    assert float(sigmas[0]) == pytest.approx(1 - 1e-6) and sigmas[-1] == 0
    want = run_diffusers(sched, denoise, x_init())
    got = S.sample_unipc(denoise, x_init(), sigmas, order=order, variant="bh2")
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh1_without_terminal_zero(denoise, order):
    """bh1 NaNs in diffusers when the last σ is 0 (samplers.md §6); compare on its σ_min-terminated list."""
    sched = UniPCMultistepScheduler(**FLOW, solver_order=order, solver_type="bh1", final_sigmas_type="sigma_min")
    sched.set_timesteps(8)
    want = run_diffusers(sched, denoise, x_init())
    got = S.sample_unipc(denoise, x_init(), sched.sigmas.clone(), order=order, variant="bh1")
    assert torch.isfinite(want).all()
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("n", [16, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_deis(denoise, n, order):
    """DEIS's flow σ list repeats its last value (a final no-op step); compare up to that σ (samplers.md §6).

    With n ≥ 15 diffusers' lower-order-final rule is off, so n − 1 steps of ours equal its n steps.
    """
    sched = DEISMultistepScheduler(**FLOW, solver_order=order)
    sched.set_timesteps(n)
    assert sched.sigmas[-1] == sched.sigmas[-2] > 0  # the pitfall: never reaches 0
    # diffusers' DEIS coefficients cancel badly in float32 (samplers.md: up to 6e-5); in float64 they are clean.
    sched.sigmas = sched.sigmas.double()
    want = run_diffusers(sched, denoise, x_init())
    got = S.sample_deis(denoise, x_init(), sched.sigmas[:-1].clone(), order=order)
    assert rel(got, want) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Every API name on the small model (sampler level; the pipeline's end-to-end test builds on this)
# ---------------------------------------------------------------------------------------------------------------


def test_every_name_runs_on_the_small_model(denoise):
    from zimage_core.scheduler_table import SCHEDULER_NAMES, resolve_scheduler

    n, outs, keys = 6, {}, {}
    seed_image = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4)) * 0.5
    for name in SCHEDULER_NAMES:
        spec = resolve_scheduler(name)
        calls = []
        out = spec.sample(
            lambda x, s, calls=calls: calls.append(s) or denoise(x, s),
            x_init(),
            spec.sigmas(n, SHIFT),
            generator=torch.Generator().manual_seed(1),
            x0=seed_image,
        )
        assert out.shape == (1, 16, 8, 8) and out.dtype == torch.float32
        assert torch.isfinite(out).all(), name
        assert len(calls) == spec.nfe(n), name
        outs[name], keys[name] = out, spec.key
    for a in SCHEDULER_NAMES:
        for b in SCHEDULER_NAMES:
            if a < b:
                same = torch.equal(outs[a], outs[b])
                assert same == (keys[a] == keys[b]), (a, b)
