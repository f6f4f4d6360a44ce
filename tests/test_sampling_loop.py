"""One sampling loop (``zimage_core.sampling.run_sampler``) for ``ZImage`` (and so the service) and the drop-in.

The numbers of both paths are checked against diffusers elsewhere (tests/test_pipeline_parity.py,
tests/test_diffusers_parity.py, tests/test_diffusers_controlnet.py); here: both paths really run this loop, and its
extensions behave as their definitions say (inpainting blend, step order, model-call count, replaced latents).
"""

from __future__ import annotations

import pytest
import torch

from zimage_core import sampling
from zimage_core.scheduler_table import resolve_scheduler


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("loop") / "pipe", seed=2)


def test_zimage_and_the_dropin_run_the_same_loop(folder, monkeypatch):
    from zimage_core.diffusers import ZImageInpaintPipeline, ZImagePipeline
    from zimage_core.pipeline import ZImage

    seen = []
    real = sampling.run_sampler

    def spy(*args, **kwargs):
        seen.append(kwargs.get("inpaint") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "run_sampler", spy)
    core = ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)
    core.generate("a red circle", width=64, height=64, steps=2, seed=1, output_type="latent", number_results=2)
    assert seen == [False, False]  # one run per result
    pipe = ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", height=64, width=64, num_inference_steps=2, output_type="latent")
    assert seen == [False, False, False]
    from PIL import Image

    inp = ZImageInpaintPipeline.from_pretrained(folder)
    inp.set_progress_bar_config(disable=True)
    inp(
        "a red circle",
        image=Image.new("RGB", (64, 64), (10, 200, 30)),
        mask_image=Image.new("L", (64, 64), 255),
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="latent",
    )
    assert seen == [False, False, False, True]


def test_inpaint_blend_definition():
    g = torch.Generator().manual_seed(0)
    x, noise, x0 = (torch.randn(1, 4, 2, 2, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, :] = 1  # top row repainted
    ip = sampling.Inpaint(mask, noise, x0)
    mid = ip.blend(x, 0.25)
    torch.testing.assert_close(mid[..., 0, :], x[..., 0, :], rtol=0, atol=0)
    torch.testing.assert_close(mid[..., 1, :], 0.25 * noise[..., 1, :] + 0.75 * x0[..., 1, :])
    for last in (ip.blend(x, 0.0), ip.blend(x, 0.1, last=True)):  # after the last step: the seed image itself
        torch.testing.assert_close(last[..., 1, :], x0[..., 1, :], rtol=0, atol=0)


def test_loop_order_count_and_replacement():
    """Euler on a linear denoiser (v = x): x_{i+1} = x_i + (σ_{i+1} − σ_i)·x_i; a replaced x is what continues."""
    spec = resolve_scheduler("Default")  # Euler
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    events = []

    class Cache:
        def observe(self, fn):
            def wrapped(x, s):
                events.append(("observe", float(s)))
                return fn(x, s)

            return wrapped

        def end_step(self, i):
            events.append(("cache", i))

    class Control:
        def end_step(self, i):
            events.append(("control", i))

    def on_step(info):
        events.append(("step", info["i"]))
        return torch.full_like(info["x"], 2.0) if info["i"] == 0 else None

    x, calls = sampling.run_sampler(
        spec,
        lambda x, s: x,
        torch.ones(3),
        sigmas,
        cache_state=Cache(),
        control_state=Control(),
        on_step=on_step,
    )
    assert calls == 2
    assert events == [("observe", 1.0), ("cache", 0), ("control", 0), ("step", 0)] + [
        ("observe", 0.5),
        ("cache", 1),
        ("control", 1),
        ("step", 1),
    ]
    torch.testing.assert_close(x, torch.full((3,), 2.0 * (1 - 0.5)))  # replaced by 2, then one step of −0.5·x


def test_every_path_builds_its_denoiser_and_states_in_the_core(folder, monkeypatch):
    """``ZImage`` and the drop-in build their denoiser, cache state and ControlNet state only through
    ``sampling.SamplingRun``: with the core's ``Denoiser`` and ``ControlState`` replaced by recording ones, every model
    call of each path goes through a recorded denoiser, and a callback that replaces the embeddings rebuilds it."""
    from zimage_core import denoiser as den_mod
    from zimage_core.cache import FBCacheConfig
    from zimage_core.diffusers import ZImagePipeline
    from zimage_core.pipeline import ZImage

    built, calls = [], []

    class Recording(den_mod.Denoiser):
        def __call__(self, x, sigma):
            calls.append(id(self))
            return super().__call__(x, sigma)

    real = den_mod.Denoiser.build

    def build(*args, **kwargs):
        d = real(*args, **kwargs)
        built.append((Recording(**vars(d)), kwargs))
        return built[-1][0]

    monkeypatch.setattr(sampling, "Denoiser", type("D", (), {"build": staticmethod(build)}))
    core = ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)
    res = core.generate(
        "a red circle", width=64, height=64, steps=3, seed=1, output_type="latent", number_results=2,
        cache=FBCacheConfig(threshold=0.0),
    )  # fmt: skip
    assert len(built) == 2 and len(calls) == res.stats.forwards == 6  # one run per result, every call recorded
    states = [kw["hooks"][-1] for _, kw in built]  # the cache state, innermost hook
    assert all(hasattr(s, "summary") for s in states) and states[0] is not states[1]  # a fresh one per result
    assert len(res.stats.cache) == 2

    built.clear(), calls.clear()
    pipe = ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def replace(p, i, t, tensors):
        return {"prompt_embeds": [e * 0.5 for e in tensors["prompt_embeds"]]} if i == 0 else {}

    pipe(
        "a red circle", height=64, width=64, num_inference_steps=3, guidance_scale=0.0, output_type="latent",
        callback_on_step_end=replace, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )  # fmt: skip
    assert len(built) == 2  # built once, rebuilt after the callback replaced the embeddings
    assert calls == [id(built[0][0])] + [id(built[1][0])] * 2
    assert pipe._last_stats.forwards == 3
