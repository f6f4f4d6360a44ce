"""Every ``scheduler`` name of the API → (sampler, sigma schedule, knobs): one table that is code and documentation.

The stem of a name picks the sampler, a ``Karras`` / ``Exponential`` / ``Beta`` / ``Uniform`` suffix the schedule
(the mapping and its reasons: ``docs/schedulers.md``, which is generated from this module)::

    python -m zimage_core.scheduler_table            # rewrite docs/schedulers.md
    python -m zimage_core.scheduler_table --check    # exit 1 if it is out of date

Use from a pipeline::

    spec = resolve_scheduler(name)                   # UnknownSchedulerError (a ValueError) lists close matches
    sigmas = spec.sigmas(steps, shift)[img2img_start(steps, strength):]   # or the full schedule
    x = spec.sample(denoise, x, sigmas, generator=g, callback=cb, x0=image_latents)

``x0`` (the clean seed-image latent) is required when ``spec.requires_seed_image`` (only
``DPMSolverMultistepInverse``: it inverts ``x0`` to ``sigmas[0]`` and samples back, ignoring ``x``) and ignored
otherwise.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import samplers as S
from .errors import show
from .schedules import SCHEDULES

__all__ = [
    "FAMILIES",
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "SamplerFamily",
    "SchedulerSpec",
    "UnknownSchedulerError",
    "render_markdown",
    "resolve_scheduler",
]

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "schedulers.md"


@dataclass(frozen=True)
class SamplerFamily:
    """A sampler function with fixed knobs: what several API names share."""

    key: str
    sampler: Callable[..., torch.Tensor]
    knobs: Mapping[str, object]
    nfe: tuple[int, int]  # model evaluations for N steps = nfe[0]·N + nfe[1] (schedules ending in 0)
    stochastic: bool
    order: int | None  # nominal order (None: not an ODE solver)
    label: str  # short name for the doc table
    section: str  # samplers.md section
    order_note: str = ""
    requires_seed_image: bool = False


# fmt: off
_F = SamplerFamily
FAMILIES: dict[str, SamplerFamily] = {f.key: f for f in [
    _F("euler", S.sample_euler, {}, (1, 0), False, 1, "Euler", "3.1"),
    _F("euler_a", S.sample_euler_ancestral, {"eta": 1.0, "s_noise": 1.0}, (1, 0), True, 1,
       "Euler ancestral (RF), η = 1", "3.5"),
    _F("heun", S.sample_heun, {}, (2, -1), False, 2, "Heun", "3.3"),
    _F("dpm_2", S.sample_dpm_2, {}, (2, -1), False, 2, "KDPM2 (DPM-Solver-2 in σ)", "3.4"),
    _F("dpm_2_a", S.sample_dpm_2_ancestral, {"eta": 1.0, "s_noise": 1.0}, (2, -1), True, 2,
       "KDPM2 ancestral (RF), η = 1", "3.6"),
    _F("lms", S.sample_lms, {"order": 4}, (1, 0), False, 4, "LMS, order 4", "3.17"),
    _F("ipndm", S.sample_ipndm, {}, (1, 0), False, 4, "iPNDM", "3.18", "2 on non-uniform grids"),
    _F("pndm", S.sample_pndm, {}, (1, 0), False, 4, "PNDM (PLMS)", "3.19", "2 on non-uniform grids"),
    _F("deis", S.sample_deis, {"order": 2}, (1, 0), False, 2, "DEIS, order 2", "3.16"),
    _F("dpmpp_2m", S.sample_dpmpp_2m, {}, (1, 0), False, 2, "DPM++ 2M", "3.10"),
    _F("dpmpp_2s_single", S.sample_dpmpp_2s_singlestep, {}, (1, 0), False, 2,
       "DPM++ 2S, schedule-paired (DPMSolverSinglestep)", "3.14"),
    _F("dpmpp_3m", S.sample_dpmpp_3m, {}, (1, 0), False, 3, "DPM++ 3M", "3.11", "2 measured: published coefficients"),
    _F("dpmpp_2m_sde", S.sample_dpmpp_2m_sde, {"eta": 1.0, "s_noise": 1.0}, (1, 0), True, 2,
       "DPM++ 2M SDE, η = 1", "3.12"),
    _F("dpmpp_3m_sde", S.sample_dpmpp_3m_sde, {"eta": 1.0, "s_noise": 1.0}, (1, 0), True, 3,
       "DPM++ 3M SDE, η = 1", "3.12", "2 measured"),
    _F("dpmpp_sde", S.sample_dpmpp_sde, {"eta": 1.0, "s_noise": 1.0}, (2, -1), True, 2,
       "DPM++ SDE (single-step), η = 1", "3.13"),
    _F("dpmpp_2m_inverse", S.sample_dpmpp_2m_inverse, {}, (2, 0), False, 2,
       "inverse DPM++ 2M, then DPM++ 2M", "3.20", requires_seed_image=True),
    _F("unipc_2", S.sample_unipc, {"order": 2, "variant": "bh2"}, (1, 0), False, 3, "UniPC K = 2, bh2", "3.15"),
    _F("unipc_3", S.sample_unipc, {"order": 3, "variant": "bh2"}, (1, 0), False, 4, "UniPC K = 3, bh2", "3.15"),
    _F("ddpm", S.sample_ddpm, {}, (1, 0), True, 1, "DDPM posterior step", "3.7"),
    _F("lcm", S.sample_lcm, {}, (1, 0), True, None, "LCM (x̂0, full re-noise)", "3.8"),
    _F("tcd", S.sample_tcd, {"gamma": 0.3}, (1, 0), True, None, "TCD, γ = 0.3", "3.9"),
]}

# name, sampler family, schedule, note. Order and notes follow samplers.md §4.
_TABLE: list[tuple[str, str, str, str]] = [
    ("Default",                           "euler",            "default",     "the model's own sampler and schedule"),
    ("FlowMatchEulerDiscreteScheduler",   "euler",            "default",     "diffusers' class, bit-exact"),
    ("Euler",                             "euler",            "default",     ""),
    ("Euler DiscreteScheduler",           "euler",            "default",     ""),
    ("Euler Karras",                      "euler",            "karras",      ""),
    ("Euler Exponential",                 "euler",            "exponential", ""),
    ("Euler Beta",                        "euler",            "beta",        ""),
    ("EDMEulerScheduler",                 "euler",            "karras",      "EDM's default schedule is Karras"),
    ("DDIM",                              "euler",            "default",     "DDIM η = 0 is the Euler step (§3.2)"),
    ("DDIMScheduler",                     "euler",            "default",     "DDIM η = 0 is the Euler step (§3.2)"),
    ("Euler a",                           "euler_a",          "default",     ""),
    ("EulerAncestralDiscreteScheduler",   "euler_a",          "default",     ""),
    ("Heun",                              "heun",             "default",     ""),
    ("HeunDiscreteScheduler",             "heun",             "default",     ""),
    ("Heun Karras",                       "heun",             "karras",      ""),
    ("KDPM2DiscreteScheduler",            "dpm_2",            "default",     ""),
    ("KDPM2AncestralDiscreteScheduler",   "dpm_2_a",          "default",     ""),
    ("LMS",                               "lms",              "default",     ""),
    ("LMSDiscreteScheduler",              "lms",              "default",     ""),
    ("LMS Karras",                        "lms",              "karras",      ""),
    ("IPNDMScheduler",                    "ipndm",            "default",     ""),
    ("IPNDM Uniform",                     "ipndm",            "default",     ""),
    ("IPNDM Uniform Karras",              "ipndm",            "karras",      ""),
    ("IPNDM Uniform Exponential",         "ipndm",            "exponential", ""),
    ("IPNDM Uniform Beta",                "ipndm",            "beta",        ""),
    ("PNDMScheduler",                     "pndm",             "default",     ""),
    ("DEISMultistepScheduler",            "deis",             "default",     ""),
    ("DPM++",                             "dpmpp_2m",         "default",     "DPM++ alone is 2M (§4)"),
    ("DPM++ Uniform",                     "dpmpp_2m",         "default",     ""),
    ("DPM++ Karras",                      "dpmpp_2m",         "karras",      ""),
    ("DPM++ Uniform Karras",              "dpmpp_2m",         "karras",      ""),
    ("DPM++ Exponential",                 "dpmpp_2m",         "exponential", ""),
    ("DPM++ Uniform Exponential",         "dpmpp_2m",         "exponential", ""),
    ("DPM++ Beta",                        "dpmpp_2m",         "beta",        ""),
    ("DPM++ Uniform Beta",                "dpmpp_2m",         "beta",        ""),
    ("DPM++ 2M",                          "dpmpp_2m",         "default",     ""),
    ("DPM++ 2M Uniform",                  "dpmpp_2m",         "default",     ""),
    ("DPM++ 2M Karras",                   "dpmpp_2m",         "karras",      ""),
    ("DPM++ 2M Exponential",              "dpmpp_2m",         "exponential", ""),
    ("DPM++ 2M Beta",                     "dpmpp_2m",         "beta",        ""),
    ("DPMSolverMultistepScheduler",       "dpmpp_2m",         "default",     "diffusers' default: order 2"),
    ("EDMDPMSolverMultistepScheduler",    "dpmpp_2m",         "karras",      "EDM's default schedule is Karras"),
    ("DPMSolverSinglestepScheduler",      "dpmpp_2s_single",  "default",     "orders [1, 2, 1, 2, …] on the σ list"),
    ("DPM++ 3M",                          "dpmpp_3m",         "default",     ""),
    ("DPM++ 3M Uniform",                  "dpmpp_3m",         "default",     ""),
    ("DPM++ 3M Karras",                   "dpmpp_3m",         "karras",      ""),
    ("DPM++ 3M Exponential",              "dpmpp_3m",         "exponential", ""),
    ("DPM++ 3M Beta",                     "dpmpp_3m",         "beta",        ""),
    ("DPM++ 2M SDE",                      "dpmpp_2m_sde",     "default",     ""),
    ("DPM++ 2M SDE Uniform",              "dpmpp_2m_sde",     "default",     ""),
    ("DPM++ 2M SDE Karras",               "dpmpp_2m_sde",     "karras",      ""),
    ("DPM++ 2M SDE Exponential",          "dpmpp_2m_sde",     "exponential", ""),
    ("DPM++ 2M SDE Beta",                 "dpmpp_2m_sde",     "beta",        ""),
    ("DPM++ 3M SDE Uniform",              "dpmpp_3m_sde",     "default",     ""),
    ("DPM++ SDE",                         "dpmpp_sde",        "default",     "stochastic, as in k-diffusion (§3.13)"),
    ("DPM++ SDE Karras",                  "dpmpp_sde",        "karras",      ""),
    ("DPM++ SDE Exponential",             "dpmpp_sde",        "exponential", ""),
    ("DPM++ SDE Beta",                    "dpmpp_sde",        "beta",        ""),
    ("DPMSolverMultistepInverse",         "dpmpp_2m_inverse", "default",     "needs seedImage (x0)"),
    ("UniPC",                             "unipc_2",          "default",     ""),
    ("UniPC Uniform",                     "unipc_2",          "default",     ""),
    ("UniPC Karras",                      "unipc_2",          "karras",      ""),
    ("UniPC Uniform Karras",              "unipc_2",          "karras",      ""),
    ("UniPC Uniform Exponential",         "unipc_2",          "exponential", ""),
    ("UniPC Uniform Beta",                "unipc_2",          "beta",        ""),
    ("UniPC 2M",                          "unipc_2",          "default",     ""),
    ("UniPC 2M Uniform",                  "unipc_2",          "default",     ""),
    ("UniPC 2M Karras",                   "unipc_2",          "karras",      ""),
    ("UniPC 3M",                          "unipc_3",          "default",     ""),
    ("UniPC 3M Uniform",                  "unipc_3",          "default",     ""),
    ("UniPC 3M Karras",                   "unipc_3",          "karras",      ""),
    ("DDPMScheduler",                     "ddpm",             "default",     ""),
    ("LCM",                               "lcm",              "default",     ""),
    ("LCMScheduler",                      "lcm",              "default",     ""),
    ("TCDScheduler",                      "tcd",              "default",     ""),
]
# fmt: on


@dataclass(frozen=True)
class SchedulerSpec:
    """What one API ``scheduler`` name runs: a sampler with its knobs on a sigma schedule."""

    name: str
    family: SamplerFamily
    schedule_name: str
    note: str = ""
    schedule: Callable[[int, float], torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "schedule", SCHEDULES[self.schedule_name])

    # -- the family's properties, flattened for callers --------------------------------------------------------
    @property
    def sampler(self) -> Callable[..., torch.Tensor]:
        return self.family.sampler

    @property
    def knobs(self) -> dict[str, object]:
        return dict(self.family.knobs)

    @property
    def stochastic(self) -> bool:
        return self.family.stochastic

    @property
    def order(self) -> int | None:
        return self.family.order

    @property
    def requires_seed_image(self) -> bool:
        return self.family.requires_seed_image

    @property
    def description(self) -> str:
        text = f"{self.family.label} on the {self.schedule_name} schedule (docs/samplers.md §{self.family.section})"
        return f"{text}; {self.note}" if self.note else text

    @property
    def key(self) -> tuple:
        """Identity of what runs: names with equal keys are aliases and give identical outputs."""
        return self.family.key, self.schedule_name

    def nfe(self, n: int) -> int:
        """Model evaluations for ``n`` steps (a schedule of n intervals ending in 0)."""
        a, b = self.family.nfe
        return a * n + b

    def sigmas(self, n: int, shift: float) -> torch.Tensor:
        return self.schedule(n, shift)

    def sample(self, denoise, x, sigmas, *, generator=None, callback=None, x0=None) -> torch.Tensor:
        """Run the sampler. ``x0``: clean seed-image latent, required (and used instead of ``x``) by the inverse."""
        if self.requires_seed_image:
            if x0 is None:
                raise ValueError(
                    f"{self.name} inverts an input image to noise and needs the seed image latent (x0); "
                    "use DPMSolverMultistepScheduler to generate"
                )
            x = x0
        return self.sampler(denoise, x, sigmas, generator=generator, callback=callback, **self.family.knobs)


SCHEDULERS: dict[str, SchedulerSpec] = {
    name: SchedulerSpec(name, FAMILIES[family], schedule, note) for name, family, schedule, note in _TABLE
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


class UnknownSchedulerError(ValueError):
    """An unknown ``scheduler`` name; ``suggestions`` holds close matches from :data:`SCHEDULER_NAMES`."""

    def __init__(self, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f" Did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(f"unknown scheduler {show(name)}.{hint} Allowed: the {len(SCHEDULER_NAMES)} names of the API.")


def _suggestions(name, n: int = 5, cutoff: float = 0.6) -> list[str]:
    """Close matches: case and spacing ignored; a name the input is a prefix of ranks high (difflib otherwise)."""
    key = " ".join(str(name).split()).casefold() if isinstance(name, str) and len(name) <= 100 else ""
    if not key:
        return []
    scored = []
    for cand in SCHEDULER_NAMES:
        c = cand.casefold()
        score = max(
            difflib.SequenceMatcher(None, key, c).ratio(),
            difflib.SequenceMatcher(None, key.replace(" ", ""), c.replace(" ", "")).ratio(),
        )
        if c.replace(" ", "") == key.replace(" ", ""):
            score = 2.0
        elif c.startswith(key):
            score = max(score, 1.0 + len(key) / len(c) / 2)
        if score >= cutoff:
            scored.append((-score, cand))
    return [cand for _, cand in sorted(scored)[:n]]


def resolve_scheduler(name: str) -> SchedulerSpec:
    """The spec of an API ``scheduler`` name (exact spelling); :class:`UnknownSchedulerError` otherwise."""
    spec = SCHEDULERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise UnknownSchedulerError(name, _suggestions(name))
    return spec


# ---------------------------------------------------------------------------------------------------------------
# Generated documentation
# ---------------------------------------------------------------------------------------------------------------


def _nfe_formula(spec: SchedulerSpec) -> str:
    a, b = spec.family.nfe
    head = "N" if a == 1 else f"{a}N"
    return head if b == 0 else f"{head} − {-b}" if b < 0 else f"{head} + {b}"


def _order_text(fam: SamplerFamily) -> str:
    if fam.order is None:
        return "–"
    return f"{fam.order} ({fam.order_note})" if fam.order_note else str(fam.order)


def _first_line(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0].replace("|", "\\|")


def render_markdown() -> str:
    """docs/schedulers.md, generated from :data:`SCHEDULERS` and :data:`FAMILIES`."""
    lines = [
        "# Schedulers",
        "",
        "<!-- Generated by `python -m zimage_core.scheduler_table` from zimage_core/scheduler_table.py; do not edit."
        " -->",
        "",
        "Every value of the request field `scheduler` and what it runs. The stem of a name picks the sampler, a",
        "`Karras` / `Exponential` / `Beta` / `Uniform` suffix the sigma schedule; every sampler runs in its",
        "flow-matching form on flow sigmas (σ ∈ [0, 1], x_σ = (1 − σ)·x0 + σ·noise). Section numbers refer to",
        "[samplers.md](samplers.md). NFE is the number of transformer evaluations (per CFG batch) for N steps; with",
        "image-to-image N is the number of steps actually run. Names with the same sampler and schedule are aliases:",
        "they give identical images for the same seed.",
        "",
        "Schedules (all in flow σ, shifted by the model's shift s, exactly N steps then 0; σ_max = 1,",
        "σ_min = shift(1/N)):",
        "",
        "- `default` (also `Uniform`): `shift(linspace(1, 1/N, N))`, Z-Image's own schedule;",
        "- `karras`: Karras et al. ρ = 7 spacing between σ_max and σ_min;",
        "- `exponential`: log-linear spacing between σ_max and σ_min;",
        "- `beta`: Beta(0.6, 0.6) quantile spacing between σ_max and σ_min.",
        "",
        "| name | sampler | schedule | order | NFE (N steps) | NFE at N = 8 | stochastic | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in SCHEDULERS.values():
        fam = spec.family
        lines.append(
            f"| `{spec.name}` | {fam.label} (§{fam.section}) | {spec.schedule_name} | {_order_text(fam)} | "
            f"{_nfe_formula(spec)} | {spec.nfe(8)} | {'yes' if spec.stochastic else 'no'} | {spec.note} |"
        )
    lines += [
        "",
        "`DPMSolverMultistepInverse` needs a seed image: it inverts the encoded image deterministically from σ = 0 to",
        "the first σ of the strength-truncated schedule and samples back with DPM++ 2M (2 evaluations per step run).",
        "Requests naming it without `seedImage` are rejected.",
        "",
        "## Sampler functions",
        "",
        "| sampler | function | knobs | |",
        "|---|---|---|---|",
    ]
    for fam in FAMILIES.values():
        knobs = ", ".join(f"{k}={v}" for k, v in fam.knobs.items()) or "–"
        lines.append(
            f"| {fam.label} | `zimage_core.samplers.{fam.sampler.__name__}` | {knobs} | {_first_line(fam.sampler)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    path = Path(paths[0]) if paths else DOC_PATH
    text = render_markdown()
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            print(f"{path} is out of date: run `python -m zimage_core.scheduler_table`", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
