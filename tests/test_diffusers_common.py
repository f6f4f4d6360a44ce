"""Checks of diffusers' Z-Image pipeline tests (``tests/pipelines/z_image/test_z_image.py`` and
``test_z_image_img2img.py`` in diffusers' repository) that the drop-in suite did not have yet: the img2img
``strength`` parameter and its bounds (on diffusers' classes and on ours) and VAE tiling (ours against diffusers).
"""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import zimage_core.diffusers as zd


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("dcommon") / "pipe", seed=8)


@pytest.fixture(scope="module", params=["diffusers", "zimage"])
def impl(request):
    mod = diffusers if request.param == "diffusers" else zd
    return SimpleNamespace(name=request.param, T2I=mod.ZImagePipeline, I2I=mod.ZImageImg2ImgPipeline)


def load(cls, folder):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_vae_tiling_matches_diffusers(folder):
    """diffusers' test_vae_tiling, as parity: with the VAE's tiling on (tiles small enough that it really changes
    the decode of a 128x128 image), ours gives diffusers' images."""
    outs = []
    for cls in (diffusers.ZImagePipeline, zd.ZImagePipeline):
        pipe = load(cls, folder)
        kw = dict(prompt="a red circle", height=128, width=128, num_inference_steps=2, output_type="np")
        plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images[0]
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 64, 8  # several overlapping tiles
        tiled = pipe(**kw, generator=torch.Generator().manual_seed(0)).images[0]
        assert float(np.abs(plain - tiled).max()) > 1e-3  # tiling really ran
        outs.append(tiled)
    assert float(np.abs(outs[0] - outs[1]).max()) <= 1e-4


def test_img2img_strength(impl, folder):
    pipe = load(impl.I2I, folder)
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    kw = dict(prompt="a red circle", image=image, num_inference_steps=4, output_type="np")
    low = pipe(**kw, strength=0.3, generator=torch.Generator().manual_seed(0)).images[0]
    high = pipe(**kw, strength=0.8, generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.allclose(low, high, atol=1e-3)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            pipe(**kw, strength=bad)
