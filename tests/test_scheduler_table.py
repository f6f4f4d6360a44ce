"""The API name table: names, lookup errors, aliases vs distinct samplers, the generated doc, the callback contract."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from zimage_core import samplers as S
from zimage_core.scheduler_table import (
    DOC_PATH,
    FAMILIES,
    SCHEDULER_NAMES,
    SCHEDULERS,
    UnknownSchedulerError,
    render_markdown,
    resolve_scheduler,
)

# The spec's allowed values, copied verbatim from imageInference-api.md (`scheduler`).
SPEC_ALLOWED = (
    "`DDIM` `DDIMScheduler` `DDPMScheduler` `DEISMultistepScheduler` `Default` `DPM++` `DPM++ 2M` `DPM++ 2M Beta` "
    "`DPM++ 2M Exponential` `DPM++ 2M Karras` `DPM++ 2M SDE` `DPM++ 2M SDE Beta` `DPM++ 2M SDE Exponential` "
    "`DPM++ 2M SDE Karras` `DPM++ 2M SDE Uniform` `DPM++ 2M Uniform` `DPM++ 3M` `DPM++ 3M Beta` "
    "`DPM++ 3M Exponential` `DPM++ 3M Karras` `DPM++ 3M SDE Uniform` `DPM++ 3M Uniform` `DPM++ Beta` "
    "`DPM++ Exponential` `DPM++ Karras` `DPM++ SDE` `DPM++ SDE Beta` `DPM++ SDE Exponential` `DPM++ SDE Karras` "
    "`DPM++ Uniform` `DPM++ Uniform Beta` `DPM++ Uniform Exponential` `DPM++ Uniform Karras` "
    "`DPMSolverMultistepInverse` `DPMSolverMultistepScheduler` `DPMSolverSinglestepScheduler` "
    "`EDMDPMSolverMultistepScheduler` `EDMEulerScheduler` `Euler` `Euler a` `Euler Beta` `Euler DiscreteScheduler` "
    "`Euler Exponential` `Euler Karras` `EulerAncestralDiscreteScheduler` `FlowMatchEulerDiscreteScheduler` `Heun` "
    "`HeunDiscreteScheduler` `Heun Karras` `IPNDMScheduler` `IPNDM Uniform` `IPNDM Uniform Beta` "
    "`IPNDM Uniform Exponential` `IPNDM Uniform Karras` `KDPM2AncestralDiscreteScheduler` `KDPM2DiscreteScheduler` "
    "`LCM` `LCMScheduler` `LMS` `LMSDiscreteScheduler` `LMS Karras` `PNDMScheduler` `TCDScheduler` `UniPC` "
    "`UniPC 2M` `UniPC 2M Karras` `UniPC 2M Uniform` `UniPC 3M` `UniPC 3M Karras` `UniPC 3M Uniform` `UniPC Karras` "
    "`UniPC Uniform` `UniPC Uniform Beta` `UniPC Uniform Exponential` `UniPC Uniform Karras`"
)
SPEC_NAMES = re.findall(r"`([^`]+)`", SPEC_ALLOWED)
SPEC_FILE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "imageInference-api.md"

SHIFT = 3.0
N = 8


def test_names_are_exactly_the_spec_list():
    assert len(SPEC_NAMES) == 75
    assert len(SCHEDULER_NAMES) == len(set(SCHEDULER_NAMES)) == 75
    assert set(SCHEDULER_NAMES) == set(SPEC_NAMES)


@pytest.mark.skipif(not SPEC_FILE.exists(), reason="shared spec not present next to this checkout")
def test_names_match_the_shared_spec_file():
    text = SPEC_FILE.read_text(encoding="utf-8")
    section = text[text.index("### [scheduler]") :]
    line = next(ln for ln in section.splitlines() if ln.startswith("**Allowed values**"))
    assert set(re.findall(r"`([^`]+)`", line)) == set(SCHEDULER_NAMES)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_name_resolves(name):
    spec = resolve_scheduler(name)
    assert spec.name == name
    assert callable(spec.sampler) and callable(spec.schedule)
    assert spec.requires_seed_image == (name == "DPMSolverMultistepInverse")
    sig = spec.sigmas(N, SHIFT)
    assert sig.shape == (N + 1,) and sig[0] == 1 and sig[-1] == 0
    assert spec.description


SUFFIXES = ("Uniform", "Karras", "Exponential", "Beta")


def test_suffix_picks_the_schedule_and_stem_the_sampler():
    stems: dict[str, set] = {}
    for name, spec in SCHEDULERS.items():
        words = name.split()
        suffix = [w for w in words if w in SUFFIXES]
        stem = " ".join(w for w in words if w not in SUFFIXES)
        want = next((w.lower() for w in reversed(suffix) if w != "Uniform"), "default")
        if name.startswith("EDM"):
            want = "karras"  # EDM classes default to the Karras schedule
        assert spec.schedule_name == want, name
        stems.setdefault(stem, set()).add(spec.family.key)
    assert all(len(families) == 1 for families in stems.values()), stems  # the stem alone picks the sampler
    assert stems["DPM++"] == stems["DPM++ 2M"] == {"dpmpp_2m"}  # "DPM++" alone is 2M (samplers.md §4)
    assert stems["UniPC"] == stems["UniPC 2M"] == {"unipc_2"}
    assert stems["Euler"] == stems["DDIM"] == {"euler"}


CLASS_NAMES = {
    "FlowMatchEulerDiscreteScheduler": "euler",
    "Euler DiscreteScheduler": "euler",
    "EDMEulerScheduler": "euler",
    "DDIMScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_a",
    "LMSDiscreteScheduler": "lms",
    "IPNDMScheduler": "ipndm",
    "PNDMScheduler": "pndm",
    "DEISMultistepScheduler": "deis",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EDMDPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSinglestepScheduler": "dpmpp_2s_single",
    "DPMSolverMultistepInverse": "dpmpp_2m_inverse",
    "DDPMScheduler": "ddpm",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}


@pytest.mark.parametrize("name", list(CLASS_NAMES))
def test_class_names_map_to_their_algorithm(name):
    assert resolve_scheduler(name).family.key == CLASS_NAMES[name]


def test_stochastic_flags():
    sto = {"euler_a", "dpm_2_a", "ddpm", "lcm", "tcd", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"}
    for spec in SCHEDULERS.values():
        assert spec.stochastic == (spec.family.key in sto), spec.name


@pytest.mark.parametrize(
    "typed,best",
    [
        ("Euler A", "Euler a"),
        ("euler a", "Euler a"),
        ("dpm++ 2m karras", "DPM++ 2M Karras"),
        ("DPM++ 2M  Karras", "DPM++ 2M Karras"),
        ("DPM++2M Karras", "DPM++ 2M Karras"),
        ("unipc", "UniPC"),
        ("Heun karras", "Heun Karras"),
        ("DPMSolverMultiStepScheduler", "DPMSolverMultistepScheduler"),
        ("FlowMatchEuler", "FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_unknown_names_suggest_close_matches(typed, best):
    with pytest.raises(UnknownSchedulerError) as info:
        resolve_scheduler(typed)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.name == typed
    assert err.suggestions and err.suggestions[0] == best
    assert repr(best) in str(err)
    assert all(s in SCHEDULER_NAMES for s in err.suggestions)


@pytest.mark.parametrize("typed", ["zzzz", "", None, 3])
def test_unknown_names_without_matches(typed):
    with pytest.raises(UnknownSchedulerError) as info:
        resolve_scheduler(typed)
    assert info.value.suggestions == []


# ---------------------------------------------------------------------------------------------------------------
# Distinct samplers give distinct outputs; aliases identical ones
# ---------------------------------------------------------------------------------------------------------------


def toy_velocity(x: torch.Tensor, s: float) -> torch.Tensor:
    """A smooth nonlinear field (no closed form on purpose), so that different integrators really differ."""
    return x - 0.3 * torch.tanh(2 * x) * (1 + s) + 0.2 * torch.sin(3 * s + x.roll(1, -1))


X_INIT = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(0))
X0_IMAGE = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.5


def run_name(name: str, seed: int = 5) -> torch.Tensor:
    spec = resolve_scheduler(name)
    g = torch.Generator().manual_seed(seed)
    return spec.sample(toy_velocity, X_INIT.clone(), spec.sigmas(N, SHIFT), generator=g, x0=X0_IMAGE.clone())


@pytest.fixture(scope="module")
def outputs():
    return {name: run_name(name) for name in SCHEDULER_NAMES}


def test_all_outputs_finite(outputs):
    for name, out in outputs.items():
        assert out.shape == X_INIT.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all(), name


def test_aliases_identical_and_distinct_samplers_different(outputs):
    groups: dict[tuple, list[str]] = {}
    for name in SCHEDULER_NAMES:
        groups.setdefault(SCHEDULERS[name].key, []).append(name)
    for names in groups.values():
        for other in names[1:]:
            assert torch.equal(outputs[names[0]], outputs[other]), (names[0], other)
    reps = [names[0] for names in groups.values()]
    # samplers.md §4: Euler 4 schedules, Euler a 1, Heun 2, KDPM2 1, KDPM2 a 1, LMS 2, iPNDM 4, PNDM 1, DEIS 1,
    # DPM++ 2M 4, singlestep 1, 3M 4, 2M SDE 4, 3M SDE 1, SDE 4, inverse 1, UniPC 4, UniPC 3M 2, DDPM, LCM, TCD 1 each
    assert len(reps) == 45
    for a, b in itertools.combinations(reps, 2):
        diff = float((outputs[a] - outputs[b]).abs().max())
        assert diff > 1e-5, (a, b, diff)  # well above float32 rounding of O(1) values


def test_stochastic_names_depend_on_the_seed_and_deterministic_ones_do_not():
    for name in ("Euler a", "DPM++ SDE", "LCM", "DPM++ 2M SDE Karras", "TCDScheduler", "DDPMScheduler"):
        assert not torch.equal(run_name(name, seed=1), run_name(name, seed=2)), name
        assert torch.equal(run_name(name, seed=1), run_name(name, seed=1)), name
    for name in ("Euler", "DPM++ 2M Karras", "UniPC 3M", "LMS", "DPMSolverMultistepInverse"):
        assert torch.equal(run_name(name, seed=1), run_name(name, seed=2)), name


def test_inverse_requires_the_seed_image():
    spec = resolve_scheduler("DPMSolverMultistepInverse")
    with pytest.raises(ValueError, match="seed image"):
        spec.sample(toy_velocity, X_INIT.clone(), spec.sigmas(N, SHIFT))
    # the seed image, not x, is what it starts from
    a = spec.sample(toy_velocity, X_INIT.clone(), spec.sigmas(N, SHIFT), x0=X0_IMAGE.clone())
    b = spec.sample(toy_velocity, torch.zeros_like(X_INIT), spec.sigmas(N, SHIFT), x0=X0_IMAGE.clone())
    assert torch.equal(a, b)


def test_noise_draws_follow_the_generator_contract():
    """Noise is torch.randn(x.shape, generator=g, dtype=float32) in order of use: LCM's first draw is visible."""
    sig = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)
    x = X_INIT.clone()
    out_first = {}

    def grab(info):
        if info["i"] == 0:
            out_first["x"] = info["x"]

    S.sample_lcm(toy_velocity, x, sig, generator=torch.Generator().manual_seed(9), callback=grab)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    d0 = x - 1.0 * toy_velocity(x, 1.0)
    assert torch.allclose(out_first["x"], 0.4 * d0 + 0.6 * z, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The generated documentation
# ---------------------------------------------------------------------------------------------------------------


def test_committed_doc_is_up_to_date():
    assert DOC_PATH.exists(), "run `python -m zimage_core.scheduler_table`"
    assert DOC_PATH.read_text(encoding="utf-8") == render_markdown(), "run `python -m zimage_core.scheduler_table`"


def test_doc_lists_every_name_with_its_nfe():
    doc = render_markdown()
    for name in SCHEDULER_NAMES:
        row = next(ln for ln in doc.splitlines() if ln.startswith(f"| `{name}` |"))
        assert f"| {resolve_scheduler(name).nfe(8)} |" in row


# ---------------------------------------------------------------------------------------------------------------
# The callback contract, for every sampler family
# ---------------------------------------------------------------------------------------------------------------

FAMILY_REPS = {key: next(n for n in SCHEDULER_NAMES if SCHEDULERS[n].family.key == key) for key in FAMILIES}


def run_with(name: str, callback, sigmas=None) -> torch.Tensor:
    spec = resolve_scheduler(name)
    sig = spec.sigmas(N, SHIFT) if sigmas is None else sigmas
    g = torch.Generator().manual_seed(5)
    return spec.sample(toy_velocity, X_INIT.clone(), sig, generator=g, callback=callback, x0=X0_IMAGE.clone())


@pytest.mark.parametrize("key", list(FAMILIES))
def test_callback_info_and_passive_callbacks(key):
    name = FAMILY_REPS[key]
    plain = run_name(name)
    infos = []
    out = run_with(name, lambda info: infos.append(dict(info)))  # returns None: no change
    assert torch.equal(out, plain)
    sig = resolve_scheduler(name).sigmas(N, SHIFT).tolist()
    assert [info["i"] for info in infos] == list(range(N))
    if key not in ("dpmpp_sde", "dpmpp_2s_single"):  # these offset a first σ = 1 to 1 − 1e-4
        assert [info["sigma"] for info in infos] == sig[:-1]
    assert [info["sigma_next"] for info in infos] == sig[1:]
    assert all(isinstance(info["sigma"], float) for info in infos)
    assert torch.equal(infos[-1]["x"], out)
    assert all(info["denoised"].shape == X_INIT.shape for info in infos)
    assert torch.equal(run_with(name, lambda info: info["x"].clone()), plain)  # an equal tensor changes nothing


@pytest.mark.parametrize("key", list(FAMILIES))
def test_callback_replacement_is_used(key):
    name = FAMILY_REPS[key]
    plain = run_name(name)
    final = torch.full_like(X_INIT, 0.25)
    out = run_with(name, lambda info: final if info["i"] == N - 1 else None)
    assert torch.equal(out, final)  # what the last callback returns is the result

    seen = {}

    def blend_mid_run(info):
        if info["i"] == 3:
            seen["replaced"] = info["x"] * 0.5 + 0.1
            return seen["replaced"]
        if info["i"] == 4:
            seen["denoised_after"] = info["denoised"]

    out = run_with(name, blend_mid_run)
    assert torch.isfinite(out).all()
    assert float((out - plain).abs().max()) > 1e-3
    # the next model evaluation happened at the replaced latent (histories are kept, the state is not)
    s4 = float(resolve_scheduler(name).sigmas(N, SHIFT)[4])
    want = seen["replaced"] - s4 * toy_velocity(seen["replaced"], s4)
    assert torch.allclose(seen["denoised_after"], want, atol=1e-5)


def test_euler_denoised_is_the_data_prediction():
    sig = resolve_scheduler("Euler").sigmas(N, SHIFT)
    infos = []
    S.sample_euler(toy_velocity, X_INIT.clone(), sig, callback=lambda info: infos.append(info))
    x = X_INIT.clone()
    for info in infos:
        s = info["sigma"]
        assert torch.allclose(info["denoised"], x - s * toy_velocity(x, s), atol=1e-6)
        x = info["x"]


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_zero_steps_return_the_input(name):
    """strength = 0 leaves the schedule ``sigmas[n:] == [0]``: nothing to run, no model call."""
    spec = resolve_scheduler(name)
    sig = spec.sigmas(N, SHIFT)[N:]
    out = spec.sample(lambda x, s: pytest.fail("model called"), X_INIT.clone(), sig, x0=X0_IMAGE.clone())
    assert torch.equal(out, X0_IMAGE if spec.requires_seed_image else X_INIT)
