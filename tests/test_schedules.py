"""Sigma schedules against diffusers' FlowMatchEulerDiscreteScheduler and the numbers of samplers.md §2."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from zimage_core.schedules import (
    SCHEDULES,
    beta_sigmas,
    default_sigmas,
    exponential_sigmas,
    img2img_start,
    karras_sigmas,
    shift_sigmas,
    uniform_sigmas,
    unshift_sigmas,
)

FLAGS = {
    "default": None,
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}


def diffusers_sigmas(kind: str, n: int, shift: float) -> torch.Tensor:
    """What ZImagePipeline hands the scheduler, and what the scheduler makes of it."""
    flag = FLAGS[kind]
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, **({flag: True} if flag else {}))
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist(), mu=0.5)
    return sched.sigmas


@pytest.mark.parametrize("kind", list(FLAGS))
@pytest.mark.parametrize("n", [1, 2, 4, 8, 9, 30, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_bit_identical_to_diffusers(kind, n, shift):
    ours = SCHEDULES[kind](n, shift)
    assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
    assert torch.equal(ours, diffusers_sigmas(kind, n, shift))


@pytest.mark.parametrize("kind", list(FLAGS))
@pytest.mark.parametrize("n", [4, 8, 30])
def test_float64_variant_agrees(kind, n):
    f64 = SCHEDULES[kind](n, 3.0, dtype=torch.float64)
    assert f64.dtype == torch.float64
    assert torch.allclose(f64, SCHEDULES[kind](n, 3.0).double(), rtol=0, atol=1e-6)


# samplers.md §2 table (N = 8, s = 3) and the quoted N = 4 Karras schedule
QUOTED = {
    ("default", 8): [1, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3],
    ("karras", 8): [1, 0.8523, 0.7237, 0.6121, 0.5156, 0.4324, 0.3610, 0.3],
    ("exponential", 8): [1, 0.8420, 0.7089, 0.5969, 0.5026, 0.4232, 0.3563, 0.3],
    ("beta", 8): [1, 0.9502, 0.8482, 0.7190, 0.5810, 0.4518, 0.3498, 0.3],
    ("karras", 4): [1, 0.7997, 0.6348, 0.5],
}


@pytest.mark.parametrize("kind,n", list(QUOTED))
def test_quoted_values(kind, n):
    want = torch.tensor([*QUOTED[kind, n], 0.0], dtype=torch.float64)
    assert torch.allclose(SCHEDULES[kind](n, 3.0).double(), want, rtol=0, atol=6e-5)


def test_base_model_last_sigma():
    assert float(default_sigmas(30, 6.0)[-2]) == pytest.approx(0.1714, abs=1e-4)  # shift(1/30), samplers.md §1.4


def test_turbo_timesteps_n9():
    want = [1000, 960, 913.04, 857.14, 789.47, 705.88, 600, 461.54, 272.73]  # diffusers ZImagePipeline, Turbo, 9
    assert torch.allclose(default_sigmas(9, 3.0)[:-1].double() * 1000, torch.tensor(want).double(), atol=6e-3)


@pytest.mark.parametrize("kind", list(FLAGS))
@pytest.mark.parametrize("n", [1, 2, 5, 8, 30])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_shape_ends_and_monotonic(kind, n, shift):
    s = SCHEDULES[kind](n, shift)
    assert s[0] == 1 and s[-1] == 0
    assert bool((s[1:] < s[:-1]).all())
    if n > 1:
        assert float(s[-2]) == pytest.approx(shift * (1 / n) / (1 + (shift - 1) / n), rel=1e-6)  # σ_min = shift(1/N)


@pytest.mark.parametrize("kind", list(FLAGS))
def test_single_step_is_one_then_zero(kind):
    assert SCHEDULES[kind](1, 3.0).tolist() == [1.0, 0.0]


def test_uniform_is_default():
    assert uniform_sigmas is default_sigmas


def test_shift_roundtrip_and_identity():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(unshift_sigmas(shift_sigmas(u, 3.0), 3.0), u, atol=1e-15)
    assert torch.equal(shift_sigmas(u, 1.0), u)
    assert shift_sigmas(0.5, 3.0) == 0.75


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_rejects_bad_step_counts(bad):
    for fn in (default_sigmas, karras_sigmas, exponential_sigmas, beta_sigmas):
        with pytest.raises(ValueError):
            fn(bad, 3.0)


def test_rejects_bad_shift():
    with pytest.raises(ValueError):
        default_sigmas(8, 0.0)


@pytest.mark.parametrize(
    "n,strength,start",
    [
        (30, 0.8, 6),  # the spec's default strength: 24 steps run
        (30, 1.0, 0),
        (30, 0.0, 30),
        (10, 0.25, 8),  # floor(2.5) = 2 steps run
        (8, 0.5, 4),
        (100, 0.29, 71),  # 0.29·100 = 28.999999999999996 in floats: still 29 steps
        (100, 0.57, 43),  # 0.57·100 = 56.99999999999999
        (7, 0.99, 1),
        (1, 0.5, 0),  # floor(0.5) = 0, but strength > 0 always runs at least one step
        (4, 0.1, 3),  # floor(0.4) = 0 -> one step, as diffusers' int(4 - 0.4) = 3
        (30, 1e-6, 29),
        (1, 1.0, 0),
    ],
)
def test_img2img_start(n, strength, start):
    assert img2img_start(n, strength) == start


@pytest.mark.parametrize("strength", [-0.1, 1.01])
def test_img2img_start_rejects_out_of_range(strength):
    with pytest.raises(ValueError):
        img2img_start(10, strength)
