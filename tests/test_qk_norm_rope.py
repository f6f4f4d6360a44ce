"""Fused per-head QK-RMSNorm + interleaved RoPE against the reference (Triton interpreter, fp32 and fp16)."""

import pytest
import torch

from tests.test_fused_elementwise import assert_follows_eager
from tests.tolerance import assert_close_to_ref, exact
from zimage_core.model import RopeTables, coordinate_grid
from zimage_kernels import qk_norm_rope as qnr
from zimage_kernels import reference

DTYPES = [torch.float32, torch.float16]


def _inputs(B, N, H, D, dtype, *, fused_qkv=False, freqs="random"):
    if fused_qkv:  # q and k as views into one [B, N, 3·H·D] projection: token stride 3·H·D
        qkv = (torch.randn(B, N, 3 * H * D) * 2).to(dtype)
        q, k = qkv[..., : H * D].unflatten(-1, (H, D)), qkv[..., H * D : 2 * H * D].unflatten(-1, (H, D))
    else:  # what the model passes: `.unflatten` of a Linear output
        q = (torch.randn(B, N, H * D) * 2).to(dtype).unflatten(-1, (H, D))
        k = (torch.randn(B, N, H * D) * 0.5).to(dtype).unflatten(-1, (H, D))
    qw, kw = (torch.randn(D) * 0.5 + 1).to(dtype), (torch.randn(D) * 0.5 + 1).to(dtype)
    if freqs == "random":
        f = torch.polar(torch.ones(B, N, D // 2), torch.rand(B, N, D // 2) * 50)
    elif freqs == "broadcast":
        f = torch.polar(torch.ones(1, N, D // 2), torch.rand(1, N, D // 2) * 50)
    else:
        f = None
    return q, k, qw, kw, f


def _check(q, k, qw, kw, f, eps=1e-5):
    got = qnr._launch(q, k, qw, kw, f, eps)
    want = reference.qk_norm_rope(q, k, qw, kw, f, eps)
    ref = exact("qk_norm_rope", q, k, qw, kw, f, eps)
    for name, g, w, r in zip("qk", got, want, ref):
        assert g.is_contiguous() and g.shape == w.shape
        assert_close_to_ref(g, r, w, name)
    return got, want


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 128, 96, 16])
def test_head_dims(dtype, D):
    _check(*_inputs(2, 7, 3, D, dtype))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_head_layout(dtype):
    """30 heads (padded to 32 lanes) x 128, fused-QKV strides, one token row per program."""
    _check(*_inputs(1, 3, 30, 128, dtype, fused_qkv=True))


@pytest.mark.interpret
@pytest.mark.parametrize("freqs", ["broadcast", None])
def test_broadcast_freqs_and_norm_only(freqs):
    _check(*_inputs(2, 5, 2, 32, torch.float16, freqs=freqs))


@pytest.mark.interpret
def test_model_rope_tables():
    """Z-Image's actual 3-axis tables (axes 8/12/12 of the tiny config), image and caption positions."""
    tables = RopeTables(256.0, (8, 12, 12), (256, 32, 32))
    pos = torch.cat([coordinate_grid((1, 3, 4), (33, 0, 0), "cpu"), coordinate_grid((20, 1, 1), (1, 0, 0), "cpu")])
    f = tables(pos)[None].expand(2, -1, -1).contiguous()  # [2, 32, 16]
    q, k, qw, kw, _ = _inputs(2, 32, 2, 32, torch.float32)
    _check(q, k, qw, kw, f)


@pytest.mark.interpret
def test_fp16_follows_eager_roundings():
    q, k, qw, kw, f = _inputs(2, 16, 4, 128, torch.float16)
    got = qnr._launch(q, k, qw, kw, f, 1e-5)
    want = reference.qk_norm_rope(q, k, qw, kw, f, 1e-5)
    for g, w in zip(got, want):
        assert_follows_eager(g, w)


@pytest.mark.interpret
def test_public_function_uses_the_kernel(monkeypatch):
    calls = []
    real = qnr._launch
    monkeypatch.setattr(qnr, "_launch", lambda *a: calls.append(1) or real(*a))
    qnr.qk_norm_rope(*_inputs(1, 4, 2, 32, torch.float32), 1e-5)
    assert calls == [1]


def test_unsupported_inputs_fall_back():
    q, k, qw, kw, f = _inputs(1, 4, 2, 32, torch.float16)
    assert qnr.supports(q, k, qw, kw, f)
    assert not qnr.supports(q, k, qw.float(), kw.float(), f)  # weight dtype differs: reference promotes
    assert not qnr.supports(q, k, qw, kw, f.to(torch.complex128))
    assert not qnr.supports(q, k[:, :3], qw, kw, f)
    got = qnr.qk_norm_rope(q, k, qw.float(), kw.float(), f, 1e-5)
    want = reference.qk_norm_rope(q, k, qw.float(), kw.float(), f, 1e-5)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))
