"""The sampling step loop never waits for the device: no host read of a device tensor, no host-to-device copy.

On this CPU-only machine the ``meta`` device stands in for the GPU: the model, the caption context and the latents
live there, so a host read of a device tensor (``.item()``, ``if tensor:``, ``float(tensor)``) cannot return a value
and raises, and every copy between host and device is counted (``zimage_core.nosync.HostSyncCounter``). The GPU tier
checks the same property the hard way, by capturing a sampling step in a CUDA graph (tests/test_gpu_pipeline.py).
"""

import contextlib

import pytest
import torch

from zimage_core import nosync
from zimage_core.denoiser import Denoiser, GenerationStats
from zimage_core.model import CaptionContext
from zimage_core.scheduler_table import resolve_scheduler

LONG = "a very long and detailed prompt about " + "a small red fox in a snowy forest at dawn, " * 6


@pytest.fixture
def meta_denoiser(tiny_pipe, monkeypatch):
    pipe = tiny_pipe
    ctx = pipe.transformer.encode_context(pipe.encode_prompts([LONG, ""], 128))
    assert ctx.lens[0] != ctx.lens[1]  # a ragged CFG batch: kv_lens is a device tensor
    saved = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.transformer.to("meta")
    # autocast has no meta backend; the model only uses it to switch autocast off
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())

    def meta(c):
        return CaptionContext([f.to("meta") for f in c.feats], [f.to("meta") for f in c.freqs], c.lens)

    stats = GenerationStats(scheduler="FlowMatchEulerDiscreteScheduler", shift=3.0, t_start=0, steps=4, cfg_scale=5.0)
    den = Denoiser.build(
        pipe.transformer,
        meta(ctx.select([0])),
        meta(ctx.select([1])),
        guidance=4.0,
        cfg_normalization=1.0,
        cfg_truncation=1.0,
        stats=stats,
    )
    yield den, stats
    pipe.transformer.to_empty(device="cpu")
    pipe.transformer.load_state_dict(saved)


def test_counter_sees_the_syncs_it_must_catch():
    """The probe itself: the three kinds of sync the step loop had are each reported."""
    x = torch.ones(3, device="meta")
    with nosync.count_host_syncs() as c:
        torch.tensor([1, 2], dtype=torch.int32, device="meta")  # pageable host data copied to the device
        torch.tensor(0.5).to("meta")
        with pytest.raises(RuntimeError):  # a host `if` on a device value
            bool(x.sum() > 1)
    assert len(c.events) == 3, c.events
    with nosync.count_host_syncs() as c:
        nosync.device_timestep(torch.tensor(0.25), 2, torch.device("meta"))  # a fill kernel: no copy
        torch.as_tensor(x, device="meta")  # already there: no copy
    assert c.events == []


def test_cfg_combine_where_equals_the_branching_clamp():
    """The torch.where clamp gives the same bits as ``if ‖pred‖ > max: pred *= max/‖pred‖`` (both branches)."""
    g = torch.Generator().manual_seed(0)
    for spread in (0.1, 10.0):  # small difference: within the bound; large: clamped
        pos = torch.randn(16, 1, 8, 8, generator=g)
        neg = pos + spread * torch.randn(16, 1, 8, 8, generator=g)
        pred = pos + 3.0 * (pos - neg)
        max_norm = torch.linalg.vector_norm(pos) * 1.0
        want = pred * (max_norm / torch.linalg.vector_norm(pred)) if torch.linalg.vector_norm(pred) > max_norm else pred
        assert torch.equal(nosync.cfg_combine(pos, neg, 3.0, 1.0), want)
    assert torch.equal(nosync.cfg_combine(pos, neg, 3.0, 0.0), pred)


def test_kv_lens_tensor_is_made_once_per_length_tuple():
    a = nosync.kv_lens_tensor([4128, 4096], torch.device("cpu"))
    assert a is nosync.kv_lens_tensor((4128, 4096), torch.device("cpu"))
    assert a.dtype == torch.int32 and a.tolist() == [4128, 4096]


def test_sampling_loop_has_no_host_sync_per_step(meta_denoiser):
    den, stats = meta_denoiser
    spec = resolve_scheduler("FlowMatchEulerDiscreteScheduler")
    sigmas = spec.sigmas(4, 3.0)
    x = torch.randn(1, 16, 16, 16, device="meta")
    den(x, sigmas[0])  # the first call builds per-device tables (RoPE, kv_lens) once per process
    n0 = stats["forwards"]
    with nosync.count_host_syncs() as c:
        out = spec.sample(den, x, sigmas, generator=torch.Generator().manual_seed(0), callback=None, x0=None)
    assert stats["forwards"] - n0 == 4  # every step ran, with CFG (one batched forward per step)
    assert out.device.type == "meta"
    assert c.events == [], c.events
