"""Our sampling core against diffusers' own Z-Image pipelines on the same small components (fp32, CPU)."""

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_core.components import build_random_pipeline
from zimage_core.pipeline import ZImage

SHIFT = 3.0  # the folder's scheduler_config shift; diffusers uses it, we pass it explicitly


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("pipe") / "random", seed=3)


@pytest.fixture(scope="module")
def ours(folder):
    return ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(folder):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


CASES = {
    "cfg_off": dict(cfg_scale=1.0),
    "cfg_on": dict(cfg_scale=4.0),
    "negative_prompt": dict(cfg_scale=3.5, negative_prompt="blurry, low quality"),
    "truncation": dict(cfg_scale=4.0, cfg_truncation=0.5),
    "normalization": dict(cfg_scale=6.0, cfg_normalization=1.0),
    "norm_and_trunc": dict(cfg_scale=5.0, cfg_normalization=0.8, cfg_truncation=0.6, negative_prompt="dark"),
    "multi_result": dict(cfg_scale=3.0, number_results=3),
    "non_square": dict(cfg_scale=2.0, width=96, height=160),
}


@pytest.mark.parametrize("case", list(CASES))
def test_text_to_image_latents_match_diffusers(ours, theirs, case):
    kw = dict(
        width=64, height=64, steps=5, number_results=1, negative_prompt=None, cfg_truncation=1.0, cfg_normalization=0.0
    )
    kw.update(CASES[case])
    res = ours.generate("a red circle on a blue background", seed=11, shift=SHIFT, output_type="latent", **kw)
    want = theirs(
        prompt="a red circle on a blue background",
        negative_prompt=kw["negative_prompt"],
        width=kw["width"],
        height=kw["height"],
        num_inference_steps=kw["steps"],
        guidance_scale=kw["cfg_scale"] - 1.0,  # diffusers' formulation: g = CFGScale − 1
        cfg_normalization=kw["cfg_normalization"],
        cfg_truncation=kw["cfg_truncation"],
        num_images_per_prompt=kw["number_results"],
        generator=gens(11, kw["number_results"]),
        output_type="latent",
    ).images
    assert res.latents.shape == want.shape
    assert torch.isfinite(res.latents).all()
    assert rel_err(res.latents, want) <= 1e-5


def test_truncation_really_switches_cfg_off(ours):
    a = ours.generate("x y", seed=2, steps=4, cfg_scale=4.0, shift=SHIFT, width=64, height=64, output_type="latent")
    # shift 3, 4 steps: t = 1 − σ = [0, 0.1, 0.25, 0.5]; CFG while t <= 0.2 -> 2 + 2 + 1 + 1 sequences
    b = ours.generate(
        "x y",
        seed=2,
        steps=4,
        cfg_scale=4.0,
        cfg_truncation=0.2,
        shift=SHIFT,
        width=64,
        height=64,
        output_type="latent",
    )
    assert a.stats["sequences"] == 8 and b.stats["sequences"] == 6
    assert not torch.equal(a.latents, b.latents)


def test_each_result_reproduces_alone(ours):
    multi = ours.generate("a cat", seed=100, number_results=3, steps=3, cfg_scale=3.0, width=64, height=64)
    assert multi.seeds == [100, 101, 102]
    for i, s in enumerate(multi.seeds):
        alone = ours.generate("a cat", seed=s, steps=3, cfg_scale=3.0, width=64, height=64)
        assert torch.equal(alone.latents[0], multi.latents[i])
        assert np.array_equal(np.asarray(alone.images[0]), np.asarray(multi.images[i]))


def _test_image(size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).resize(size, Image.NEAREST)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(folder, ours, strength):
    from diffusers import ZImageImg2ImgPipeline

    pipe = ZImageImg2ImgPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = _test_image()
    res = ours.generate(
        "a house",
        seed=5,
        steps=5,
        cfg_scale=3.0,
        shift=SHIFT,
        seed_image=image,
        strength=strength,
        output_type="latent",
        diffusers_compat=True,
        cfg_normalization=0,
    )
    want = pipe(
        prompt="a house",
        image=image,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=2.0,
        generator=gens(5, 1),
        output_type="latent",
        height=64,
        width=64,
    ).images
    assert rel_err(res.latents, want) <= 1e-5


def test_inpaint_matches_diffusers(folder, ours):
    from diffusers import ZImageInpaintPipeline

    pipe = ZImageInpaintPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = _test_image(seed=1)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask)
    res = ours.generate(
        "a dog",
        seed=9,
        steps=6,
        cfg_scale=2.5,
        shift=SHIFT,
        seed_image=image,
        mask_image=mask,
        strength=1.0,
        output_type="latent",
        diffusers_compat=True,
        cfg_normalization=0,
    )
    want = pipe(
        prompt="a dog",
        image=image,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=6,
        guidance_scale=1.5,
        generator=gens(9, 1),
        output_type="latent",
        height=64,
        width=64,
    ).images
    assert rel_err(res.latents, want) <= 1e-5


def test_default_mode_start_step_and_noise(ours):
    """Our default img2img: start step N − floor(N·strength) and the same initial noise as t2i."""
    image = _test_image()
    res = ours.generate("a", seed=3, steps=10, strength=0.35, seed_image=image, output_type="latent", cfg_scale=1)
    assert res.stats["t_start"] == 10 - 3 and res.stats["steps"] == 3
    compat = ours.generate(
        "a", seed=3, steps=10, strength=0.35, seed_image=image, output_type="latent", cfg_scale=1, diffusers_compat=True
    )
    assert compat.stats["t_start"] == int(10 - 10 * 0.35)  # diffusers: int(N − N·s) = 6


def test_batched_results_match_solo_runs_closely(ours, theirs):
    """batch_results=True: one batched trajectory, each result from its own seed; equal to solo runs up to rounding,
    and to diffusers' batched num_images_per_prompt within the parity bar."""
    kw = dict(
        seed=40, steps=4, cfg_scale=3.0, width=64, height=64, shift=SHIFT, cfg_normalization=0, output_type="latent"
    )
    batched = ours.generate("two birds", number_results=3, batch_results=True, **kw)
    solo = ours.generate("two birds", number_results=3, **kw)
    assert batched.stats["batched"] and not solo.stats["batched"]
    assert batched.stats["forwards"] == 4 and solo.stats["forwards"] == 12
    assert rel_err(batched.latents, solo.latents) <= 1e-6
    want = theirs(
        prompt="two birds",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=2.0,
        num_images_per_prompt=3,
        generator=gens(40, 3),
        output_type="latent",
    ).images
    assert rel_err(batched.latents, want) <= 1e-5
    stochastic = ours.generate("two birds", number_results=2, batch_results=True, scheduler="Euler a", **kw)
    assert not stochastic.stats["batched"]  # stochastic samplers always run result by result


@pytest.mark.parametrize("model", ["runware:z-image@0", "z-image-turbo"])
@pytest.mark.parametrize("folder_shift", [3.0, 4.5])
def test_checkpoint_scheduler_decides_the_shift(tmp_path, folder, model, folder_shift):
    """No ``shift`` argument: the folder's scheduler_config.json decides it (a preset never overrides it), so every
    preset gives diffusers' latents on the same folder."""
    import json
    import shutil

    from diffusers import ZImagePipeline

    from zimage_core.pipeline import MODEL_PRESETS

    assert all(d.shift is None for d in MODEL_PRESETS.values())
    copy = shutil.copytree(folder, tmp_path / "f")
    cfg_path = copy / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(shift=folder_shift, use_dynamic_shifting=False)
    cfg_path.write_text(json.dumps(cfg))
    mine = ZImage.from_pretrained(copy, device="cpu", dtype=torch.float32)
    preset = mine.defaults(model)
    res = mine.generate("a red circle", seed=5, steps=4, width=64, height=64, model=model, output_type="latent")
    assert res.stats["shift"] == folder_shift
    pipe = ZImagePipeline.from_pretrained(copy, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        prompt="a red circle",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=preset.cfg_scale - 1.0,
        cfg_normalization=preset.cfg_normalization,
        cfg_truncation=preset.cfg_truncation,
        generator=gens(5, 1),
        output_type="latent",
    ).images
    assert rel_err(res.latents, want) <= 1e-5
