"""Fused attention against the reference: both kernels (pointer and TMA/descriptor) under the Triton interpreter.

fp32 and fp16 only (the interpreter's bf16 ``tl.dot`` is wrong); ≤ 300 tokens and ≤ 2 heads (interpreter cost grows
with (N/BLOCK)^2). bf16, real shapes, compile and CUDA graphs are in ``tests/test_kernels_gpu.py``.
"""

import math

import pytest
import torch
import triton

from tests.tolerance import assert_close_to_ref, exact
from zimage_kernels import attention as attn
from zimage_kernels import reference

DTYPES = [torch.float32, torch.float16]
PATHS = ["plain", "tma"]


def _qkv(B, N, H, D, dtype, *, n_kv=None, spread=1.0, layout="unflatten"):
    n_kv = N if n_kv is None else n_kv
    if layout == "unflatten":  # views of Linear outputs, as the model passes them (token stride H·D)
        q = (torch.randn(B, N, H * D) * spread).to(dtype).unflatten(-1, (H, D))
        k = (torch.randn(B, n_kv, H * D) * spread).to(dtype).unflatten(-1, (H, D))
        v = torch.randn(B, n_kv, H * D).to(dtype).unflatten(-1, (H, D))
    elif layout == "fused_qkv":  # chunks of one [B, N, 3·H·D] projection: token stride 3·H·D, offset bases
        qkv = torch.randn(B, N, 3 * H * D).to(dtype)
        q, k, v = (t.unflatten(-1, (H, D)) for t in qkv.chunk(3, dim=-1))
    elif layout == "bhnd":  # [B, H, N, D] storage seen as [B, N, H, D]: head stride N·D, token stride D
        q, k, v = (torch.randn(B, H, N, D).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        raise ValueError(layout)
    return q, k, v


def _check(q, k, v, kv_lens=None, scale=None, **launch):
    out = attn._launch(q, k, v, kv_lens, scale, **launch)
    pt = reference.attention(q, k, v, kv_lens=kv_lens, scale=scale)
    ref = exact("attention", q, k, v, kv_lens=kv_lens, scale=scale)
    assert out.is_contiguous() and out.dtype == q.dtype
    return assert_close_to_ref(out, ref, pt, f"attention {launch}")


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_ragged_batch(path, dtype, D):
    """CFG-style batch: the second sample's keys end at 77 (not a multiple of the 32-wide tile); N = 150 is not a
    multiple of the 64-row tile either."""
    q, k, v = _qkv(2, 150, 2, D, dtype)
    _check(q, k, v, torch.tensor([150, 77], dtype=torch.int32), path=path)


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_kv_lens_and_long_sequence(path, dtype):
    q, k, v = _qkv(1, 288, 2, 64, dtype)
    _check(q, k, v, path=path)


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "lens",
    [[0, 96], [1, 96], [32, 64], [96, 95], [200, -3]],
    ids=["empty", "one", "tile-multiples", "full-and-one-short", "clamped"],
)
def test_kv_len_edges(path, lens):
    """kv_len 0 gives zeros (eager's safe softmax), 1 attends to one key, tile multiples leave no tail block;
    lengths beyond N or below 0 clamp like the reference's mask."""
    q, k, v = _qkv(2, 96, 1, 32, torch.float32)
    kv_lens = torch.tensor(lens, dtype=torch.int64)
    _check(q, k, v, kv_lens, path=path)
    if lens[0] == 0:
        assert torch.equal(attn._launch(q, k, v, kv_lens, None, path=path)[0], torch.zeros_like(q[0]))


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["fused_qkv", "bhnd"])
def test_strided_layouts(path, layout):
    """Strided views are read in place; the result equals the one from contiguous copies bit for bit."""
    q, k, v = _qkv(2, 70, 2, 64, torch.float16, layout=layout)
    assert not q.is_contiguous()
    kv_lens = torch.tensor([70, 40])
    got = attn._launch(q, k, v, kv_lens, None, path=path)
    want = attn._launch(q.contiguous(), k.contiguous(), v.contiguous(), kv_lens, None, path=path)
    assert torch.equal(got, want)
    _check(q, k, v, kv_lens, path=path)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 48, 96])
def test_padded_head_dims(dtype, D):
    """Head dims that are not a power of two (the small test models use 16 and 96) on the pointer kernel."""
    q, k, v = _qkv(2, 50, 2, D, dtype)
    _check(q, k, v, torch.tensor([50, 33]), path="plain")


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
def test_cross_lengths_scale_and_peaky_scores(path):
    """N_q != N_kv, an explicit scale and large logits (the online max must keep exp2 in range)."""
    q, k, v = _qkv(2, 40, 2, 32, torch.float16, n_kv=130, spread=4.0)
    _check(q, k, v, torch.tensor([130, 65]), scale=0.5, path=path)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "bm,bn,path", [(16, 16, "plain"), (128, 64, "plain"), (32, 128, "plain"), (16, 16, "tma"), (128, 32, "tma")]
)
def test_tile_shapes(bm, bn, path):
    """The result does not depend on the tile shape: other tiles than the interpreter's default config."""
    q, k, v = _qkv(2, 100, 1, 32, torch.float32)
    kw = {"BLOCK_M": bm, "BLOCK_N": bn}
    if path == "tma":
        kw["WARP_SPECIALIZE"] = bm == 128  # ignored by the interpreter; exercises the flag's plumbing
    _check(q, k, v, torch.tensor([100, 51]), path=path, config=triton.Config(kw, num_warps=4, num_stages=2))


@pytest.mark.interpret
def test_public_function_uses_the_kernel(monkeypatch):
    calls = []
    real = attn._launch
    monkeypatch.setattr(attn, "_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = _qkv(1, 20, 1, 32, torch.float32)
    attn.attention(q, k, v, kv_lens=torch.tensor([11]))
    assert calls == [1]


@pytest.mark.interpret
def test_path_env_var(monkeypatch):
    q, k, v = _qkv(1, 20, 1, 32, torch.float32)
    outs = {}
    for path in ("plain", "tma"):
        monkeypatch.setenv(attn.PATH_ENV, path)
        outs[path] = attn.attention(q, k, v)
    torch.testing.assert_close(outs["plain"], outs["tma"], rtol=1e-6, atol=1e-6)
    monkeypatch.setenv(attn.PATH_ENV, "bogus")
    with pytest.raises(ValueError, match=attn.PATH_ENV):
        attn.attention(q, k, v)


# ---- cpu tier: no launches ---------------------------------------------------------------------------------------


def test_unsupported_inputs_fall_back_to_the_reference():
    q, k, v = _qkv(1, 8, 1, 32, torch.float32)
    cases = {
        "mixed dtypes": (q, k.half(), v, None, None),
        "odd head dim": (q[..., :31], k[..., :31], v[..., :31], None, None),
        "head dim > 256": (*(torch.randn(1, 4, 1, 260),) * 3, None, None),
        "negative scale": (q, k, v, None, -1.0),
        "float kv_lens": (q, k, v, torch.tensor([3.0]), None),
    }
    for name, (q_, k_, v_, kl, sc) in cases.items():
        assert not attn.supports(q_, k_, v_, kl, sc), name
        try:
            want = reference.attention(q_, k_, v_, kv_lens=kl, scale=sc)
        except RuntimeError as e:  # the reference rejects it (mixed dtypes, float lengths): so does the op
            with pytest.raises(type(e)):
                attn.attention(q_, k_, v_, kv_lens=kl, scale=sc)
            continue
        assert torch.equal(attn.attention(q_, k_, v_, kv_lens=kl, scale=sc), want), name


def test_tma_path_needs_hopper_and_alignment():
    q, k, v = _qkv(1, 8, 1, 64, torch.float16)
    assert not attn.tma_path_available(q, k, v)  # CPU tensors: never the TMA path outside explicit tests
    assert attn._tma_compatible(q, k, v)
    assert not attn._tma_compatible(torch.randn(3, 5, 7).half()[..., :4])  # 14-byte row stride


def test_softmax_scale_is_folded_into_exp2():
    assert math.isclose(attn.LOG2E, 1 / math.log(2), rel_tol=1e-15)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "n,lens", [(128, None), (100, None), (100, [100, 37])], ids=["even-no-mask", "odd-length", "ragged"]
)
def test_warp_specialized_loop(n, lens):
    """The TMA kernel's warp-specialized variant (one loop, mask on every block unless EVEN_KV) computes the same
    attention; the interpreter ignores the WS flag itself, so this checks the variant's logic, not its schedule."""
    q, k, v = _qkv(2, n, 2, 64, torch.float16)
    kv_lens = None if lens is None else torch.tensor(lens)
    cfg = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "WARP_SPECIALIZE": True}, num_warps=4, num_stages=2)
    _check(q, k, v, kv_lens, path="tma", config=cfg)


def test_auto_path_falls_back_to_the_pointer_kernel_when_tma_fails(monkeypatch):
    """On a stack where the TMA kernel cannot compile, 'auto' warns once and keeps working on the pointer kernel."""
    q, k, v = _qkv(1, 20, 1, 32, torch.float32)
    monkeypatch.setattr(attn, "tma_path_available", lambda *a: True)
    monkeypatch.setattr(attn, "_TMA_FAILED", set())
    real = attn._launch

    def launch(*a, path=None, **kw):
        if path == "tma":
            raise RuntimeError("PassManager::run failed")
        return real(*a, path=path, **kw)

    monkeypatch.setattr(attn, "_launch", launch)
    monkeypatch.setattr(attn, "_attn_fwd_kernel", _Recorder(attn._attn_fwd_kernel))
    with pytest.warns(UserWarning, match="pointer kernel"):
        real(q, k, v, None, None, path="auto")
    assert attn._TMA_FAILED == {(torch.float32, 32)}
    assert attn._attn_fwd_kernel.calls == 1


class _Recorder:
    """Stands in for a kernel object: counts launches (no Triton launch happens in this cpu-tier test)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls += 1

        return run
