"""Every scheduler name of the API runs end to end on the small model: finite images, the table's NFE, and names
that map to different samplers give different images while aliases give identical ones."""

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_core.errors import RequestError
from zimage_core.scheduler_table import SCHEDULER_NAMES, resolve_scheduler

STEPS = 6  # at 4 steps DPM++ 3M is 2M exactly (order ramp-up, then lower-order final steps)


@pytest.fixture(scope="module")
def runs(tiny_pipe):
    out = {}
    for name in SCHEDULER_NAMES:
        spec = resolve_scheduler(name)
        kw = {}
        if spec.requires_seed_image:
            kw = dict(seed_image=Image.new("RGB", (64, 64), (180, 40, 40)), strength=1.0)
        res = tiny_pipe.generate(
            "a red circle", seed=3, steps=STEPS, cfg_scale=1.0, scheduler=name, width=64, height=64, **kw
        )
        out[name] = (spec, res)
    return out


def test_every_name_gives_a_finite_image_with_the_tables_nfe(runs):
    assert len(runs) == len(SCHEDULER_NAMES) >= 75
    for name, (spec, res) in runs.items():
        assert torch.isfinite(res.latents).all(), name
        arr = np.asarray(res.images[0])
        assert arr.shape == (64, 64, 3) and arr.max() > 0, name
        assert res.stats["nfe_per_result"] == spec.nfe(STEPS), name


def test_different_samplers_differ_and_aliases_agree(runs):
    by_key = {}
    for name, (spec, res) in runs.items():
        by_key.setdefault(spec.key, []).append((name, res.latents))
    for group in by_key.values():  # aliases: identical
        for name, lat in group[1:]:
            assert torch.equal(lat, group[0][1]), (name, group[0][0])
    reps = [(k, g[0][1]) for k, g in by_key.items()]
    for i in range(len(reps)):
        for j in range(i + 1, len(reps)):
            assert not torch.equal(reps[i][1], reps[j][1]), (reps[i][0], reps[j][0])


def test_unknown_name_lists_close_matches(tiny_pipe):
    with pytest.raises(RequestError) as e:
        tiny_pipe.generate("x y", scheduler="dpm++ 2m karras", steps=1)
    assert e.value.field == "scheduler" and "DPM++ 2M Karras" in str(e.value)


def test_inverse_needs_a_seed_image(tiny_pipe):
    with pytest.raises(RequestError, match="seed image"):
        tiny_pipe.generate("x y", scheduler="DPMSolverMultistepInverse", steps=2)
