"""The velocity cache (``zimage_core/cache/velocity.py``): reuse the sampler's velocity on the steps a static mask
leaves out, and take back the drift at the next compute. Checked against a hand-written Euler loop on a synthetic
velocity field, on the sampler seam (Heun: no correction), and on the trained default model against copying."""

import pathlib
from types import SimpleNamespace

import pytest
import torch

from zimage_core.cache import StepMask, VelocityCacheConfig, preset_config
from zimage_core.cache.velocity import drift
from zimage_core.samplers import sample_euler, sample_heun
from zimage_core.sampling import run_sampler

SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.55, 0.3, 0.0], dtype=torch.float64)
A = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
B = torch.tensor([1.5, 0.25, -3.0], dtype=torch.float64)


def field(x, sigma):
    """A velocity that depends on σ and on x (so a drift of x changes it)."""
    return A + B * float(sigma) + 0.3 * x


def spec(sampler):
    return SimpleNamespace(
        sample=lambda d, x, s, generator=None, callback=None, x0=None: sampler(d, x, s, callback=callback)
    )


def run(cfg, sampler=sample_euler):
    state = cfg.new_state(num_steps=len(SIGMAS) - 1)
    x, _ = run_sampler(spec(sampler), field, torch.zeros(3, dtype=torch.float64), SIGMAS, cache_state=state)
    return x, state


def by_hand(computed: set[int], alpha: float, q: float) -> torch.Tensor:
    """Euler with the velocity of the last computed step on the others; after each computed step c that follows
    reused ones, subtract α·Σ_{p<s<c} Δσ_s·((s − p)/(c − p))^q·(v_p − v_c)."""
    sig = SIGMAS.tolist()
    x = torch.zeros(3, dtype=torch.float64)
    v_p, p, reused = None, None, []
    for i in range(len(sig) - 1):
        ds = sig[i + 1] - sig[i]
        if i in computed:
            v = field(x, sig[i])
            x = x + ds * v
            if reused:
                d = sum(dsi * ((s - p) / (i - p)) ** q for s, dsi in reused)
                x = x - alpha * d * (v_p - v)
            v_p, p, reused = v, i, []
        else:
            x = x + ds * v_p
            reused.append((i, ds))
    return x


@pytest.mark.parametrize("alpha,q", [(0.0, 1.0), (0.5, 1.0), (1.0, 2.0)])
def test_matches_the_hand_written_loop(alpha, q):
    # static mask: step 0 (first), every 3rd from the anchor -> 0, 3; the last step (4) always computes
    cfg = VelocityCacheConfig(mask=StepMask(warmup=1, every=3, policy="static"), correction=alpha, correction_power=q)
    x, state = run(cfg)
    torch.testing.assert_close(x, by_hand({0, 3, 4}, alpha, q), rtol=0, atol=1e-12)
    summary = state.summary()
    assert summary["computed_steps"] == [0, 3, 4] and summary["reused_steps"] == [1, 2]
    assert summary["corrections"] == (1 if alpha > 0 else 0)


def test_the_correction_changes_the_result_and_copying_is_not_the_uncached_run():
    mask = StepMask(warmup=1, every=3, policy="static")
    x0, _ = run(VelocityCacheConfig(mask=mask, correction=0.0))
    x5, _ = run(VelocityCacheConfig(mask=mask, correction=0.5))
    full, _ = run(VelocityCacheConfig(mask=StepMask(warmup=10, policy="static")))  # every step computes
    ref = by_hand({0, 1, 2, 3, 4}, 0.0, 1.0)
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(x0, x5) and not torch.allclose(x0, ref)


def test_drift_factor_by_hand():
    # reused steps 1, 2 between computed 0 and 3, Δσ −0.1 and −0.15, q = 1: −0.1·1/3 − 0.15·2/3
    assert drift([(1, -0.1), (2, -0.15)], 0, 3, 1.0) == pytest.approx(-0.1 / 3 - 0.3 / 3)
    assert drift([(1, -0.1), (2, -0.15)], 0, 3, 2.0) == pytest.approx(-0.1 / 9 - 0.15 * 4 / 9)
    assert drift([], 0, 1, 1.0) == 0


def test_several_evaluations_per_step_copy_without_correction():
    cfg = VelocityCacheConfig(mask=StepMask(warmup=1, every=3, policy="static"), correction=0.5)
    _, state = run(cfg, sample_heun)
    s = state.summary()
    assert s["corrections"] == 0 and s["correction"].startswith("off")
    assert s["reused_forwards"] > 0


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"mask": StepMask(warmup=1, every=3)}, "static step mask"),
        ({"mask": None}, "static step mask"),
        ({"correction": 1.5}, r"\[0, 1\]"),
        ({"correction_power": 0.0}, "> 0"),
        ({"calibrator": "taylorseer1"}, "no calibrator"),
    ],
)
def test_refuses_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        VelocityCacheConfig(**kw)


@pytest.fixture(scope="module")
def pipe():
    from zimage_core.pipeline import ZImage

    return ZImage.default()


def _psnr(a, b) -> float:
    import numpy as np

    from zimage_bench.cache import psnr

    return psnr(*(np.asarray(r.images[0].convert("RGB"), dtype=np.float64) for r in (a, b)))


def test_max_preset_on_the_default_model_beats_copying(pipe):
    """``max`` (8 of 50 steps compute: 6.25x) on the 8 held-out captions of zimage_bench/prompts-heldout8.txt: the drift
    correction is better than copying the velocity (α = 0) on their mean PSNR against the uncached image."""
    caps = pathlib.Path(__file__).parents[1] / "zimage_bench" / "prompts-heldout8.txt"
    captions = caps.read_text().splitlines()
    gen = dict(steps=50, cfg_scale=3.0, width=128, height=128)
    cfg = preset_config("max", pipe=pipe)
    copy = VelocityCacheConfig(mask=cfg.mask, correction=0.0)
    gains = []
    for k, c in enumerate(captions):
        ref = pipe.generate(c, seed=k, **gen)
        r = pipe.generate(c, seed=k, cache=cfg, **gen)
        (s,) = r.stats["cache"]
        assert s["computed_steps"] == [0, 7, 14, 21, 28, 35, 42, 49] and s["corrections"] == 7
        assert s["main_layer_sequence_evals_uncached"] / s["main_layer_sequence_evals"] == pytest.approx(6.25)
        gains.append(_psnr(r, ref) - _psnr(pipe.generate(c, seed=k, cache=copy, **gen), ref))
    assert sum(gains) / len(gains) > 1.0, gains


def test_max_preset_with_image_to_image_and_inpainting(pipe):
    """The velocity cache on a run that starts later (image-to-image) and with the inpainting blend after its
    correction: the first step of the run computes, the kept region stays the seed image's."""
    import numpy as np
    from PIL import Image

    seed = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    cfg = preset_config("max", pipe=pipe)
    gen = dict(steps=20, cfg_scale=3.0, width=64, height=64, seed=1, seed_image=seed, strength=0.6)
    r = pipe.generate("a blue circle", cache=cfg, **gen)
    (s,) = r.stats["cache"]
    first = 20 - int(0.6 * 20)  # the run starts at step 8
    assert s["computed_steps"][0] == first and s["computed_steps"][-1] == 19 and s["reused_steps"]
    assert s["corrections"] >= 1
    ri = pipe.generate("a blue circle", cache=cfg, mask_image=mask, **gen)
    a = np.asarray(ri.images[0].convert("RGB"), dtype=np.float64)
    assert np.isfinite(a).all() and abs(a[:8, :8].mean(axis=(0, 1)) - (200, 30, 30)).max() < 40  # kept corner
