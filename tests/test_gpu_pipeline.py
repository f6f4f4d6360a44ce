"""GPU tier: the full transformer forward and a full sampling step under CUDA graphs and torch.compile, at the real
Z-Image width (3840, 30 heads of 128, FFN 10240) with random weights and fewer main layers (time), 1024² with a
ragged CFG batch (captions of 128 and 32 padded tokens).

- CUDA-graph capture of ``forward_with_context`` and replay on new inputs: bit-identical to eager (same kernels).
- CUDA-graph capture of one sampling step (the denoiser with CFG and CFG normalization, then the Euler update): the
  capture itself fails on any host sync (``.item()``, a blocking copy), which is the claim of zimage_core/nosync.py;
  the replay equals eager bit for bit.
- ``ZImage.optimize()``'s regional torch.compile: close to eager (Inductor reorders fp32 arithmetic).
- Determinism: two eager forwards are bit-identical.

Skipped without CUDA (tests/conftest.py); run by scripts/gpu_check.sh. NOT YET RUN ON HARDWARE.
"""

import pytest
import torch

from zimage_core import compile as compile_mod
from zimage_core.config import ZImageConfig
from zimage_core.denoiser import Denoiser, GenerationStats
from zimage_core.model import ZImageTransformer

pytestmark = pytest.mark.gpu

DEV = "cuda"
LAYERS = 4
LATENT = (16, 1, 128, 128)  # 1024² image: 64 x 64 = 4096 image tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ZImageConfig(n_layers=LAYERS)
    with torch.device(DEV):
        m = ZImageTransformer(cfg, kernel_backend="triton").to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


@pytest.fixture(scope="module")
def context(model):
    g = torch.Generator(DEV).manual_seed(1)
    feats = [torch.randn(n, 2560, device=DEV, generator=g).to(torch.bfloat16) for n in (120, 20)]
    with torch.no_grad():
        ctx = model.encode_context(feats)
    assert ctx.lens == [128, 32]
    return ctx


def _latents(seed):
    g = torch.Generator(DEV).manual_seed(seed)
    return torch.randn(2, *LATENT, device=DEV, generator=g)


def _capture(fn, warmup=2):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):  # autotuning, RoPE tables, kv_lens: all made before capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@torch.no_grad()
def test_full_forward_cuda_graph_replay_equals_eager(model, context):
    static_x = _latents(0).to(torch.bfloat16)
    static_t = torch.full((2,), 0.3, device=DEV)

    def fwd():
        return torch.stack(model.forward_with_context(list(static_x.unbind(0)), static_t, context))

    graph, out = _capture(fwd)
    static_x.copy_(_latents(1))
    static_t.fill_(0.7)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fwd())


@torch.no_grad()
def test_sampling_step_with_cfg_normalization_captures_in_a_cuda_graph(model, context):
    pos, neg = context.select([0]), context.select([1])
    stats = GenerationStats(scheduler="FlowMatchEulerDiscreteScheduler", shift=3.0, t_start=0, steps=1, cfg_scale=5.0)
    den = Denoiser.build(model, pos, neg, guidance=4.0, cfg_normalization=1.0, cfg_truncation=1.0, stats=stats)
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.7)
    static_x = _latents(2)[:1, :, 0].clone()  # the sampler's latents: fp32 [B, C, h, w]

    def step():  # one Euler step of the flow: x + (σ_next − σ)·v
        return static_x + (sigma_next - sigma) * den(static_x, sigma)

    graph, out = _capture(step)  # raises if anything in the step synchronises with the host
    static_x.copy_(_latents(3)[:1, :, 0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


@torch.no_grad()
def test_regional_compile_matches_eager(model, context):
    x = list(_latents(4).to(torch.bfloat16).unbind(0))
    t = torch.full((2,), 0.5, device=DEV)
    want = torch.stack(model.forward_with_context(x, t, context)).float()
    try:
        compile_mod.compile_blocks(model)
        got = torch.stack(model.forward_with_context(x, t, context)).float()
    finally:
        compile_mod.uncompile_blocks(model)
    rel = (got - want).norm() / want.norm()
    assert torch.isfinite(got).all() and rel < 2e-2, rel


@torch.no_grad()
def test_forward_is_deterministic(model, context):
    x = list(_latents(5).to(torch.bfloat16).unbind(0))
    t = torch.full((2,), 0.4, device=DEV)
    a = torch.stack(model.forward_with_context(x, t, context))
    b = torch.stack(model.forward_with_context(x, t, context))
    assert torch.equal(a, b)
