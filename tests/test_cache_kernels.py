"""The step caches' two kernels: the L1-sums metric and the residual apply (torch reference, Triton, op switch)."""

import numpy as np
import pytest
import torch

from zimage_core.cache.state import relative_change
from zimage_kernels import get_ops as cache_ops  # the step-cache ops are ops of the one switch
from zimage_kernels import reference as ref

HAS_CUDA = torch.cuda.is_available()

# shapes: a non-power-of-two prime-ish one, a CFG-like [2, N, C], a tiny one, and one spanning many blocks
SHAPES = [(2, 37, 13), (1, 1, 1), (2, 300, 64), (5, 123, 123)]


def _np_sums(a, b, s=None):
    a64, b64 = a.double().numpy(), b.double().numpy()
    if s is not None:
        a64 = a64 - s.double().numpy()
    return np.abs(a64 - b64).sum(), np.abs(b64).sum()


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]


# ---- torch reference -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_l1_sums_matches_float64(shape, dtype):
    a, b, s, _ = _inputs(shape, dtype)
    got = ref.l1_sums(a, b)
    assert got.dtype == torch.float32 and got.shape == (2,)
    np.testing.assert_allclose(got.double().numpy(), _np_sums(a, b), rtol=1e-5)
    np.testing.assert_allclose(ref.l1_sums(a, b, a_sub=s).double().numpy(), _np_sums(a, b, s), rtol=1e-5)


def test_reference_l1_sums_is_fp32_even_for_low_precision_inputs():
    # 4096 values of 1/64 in bf16: a bf16 accumulator would stall at 4 (8 mantissa bits); fp32 gives 64
    a = torch.full((4096,), 1 / 64, dtype=torch.bfloat16)
    b = torch.zeros(4096, dtype=torch.bfloat16)
    assert ref.l1_sums(a, b).tolist() == [64.0, 0.0]


def test_reference_apply_residual():
    h, r, d, _ = _inputs((2, 5, 7), torch.float32)
    torch.testing.assert_close(ref.apply_residual(h, r), h + r, rtol=0, atol=0)
    torch.testing.assert_close(ref.apply_residual(h, r, d, 0.5), h + r + 0.5 * d, rtol=1e-6, atol=1e-6)
    hb, rb = h.bfloat16(), r.bfloat16()
    out = ref.apply_residual(hb, rb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (hb.float() + rb.float()).bfloat16(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shapes"):
        ref.apply_residual(h, r[:1])
    with pytest.raises(ValueError, match="shapes"):
        ref.l1_sums(h, r[:1])


@pytest.mark.parametrize(
    "num,den,expected", [(1.0, 4.0, 0.25), (0.0, 0.0, 0.0), (2.0, 0.0, float("inf")), (0.0, 3.0, 0.0)]
)
def test_relative_change_edge_cases(num, den, expected):
    assert relative_change(torch.tensor([num, den])) == expected


def test_op_switch_is_torch_on_cpu():
    assert cache_ops("auto", "cpu").name == "torch"
    assert cache_ops("torch", "cpu").l1_sums is ref.l1_sums
    with pytest.raises(ValueError):
        cache_ops("cuda-magic", "cpu")


# ---- Triton under the interpreter (CPU) --------------------------------------------------------------------------


def _triton():
    from zimage_kernels import step_cache as triton_kernels

    return triton_kernels


@pytest.mark.interpret
@pytest.mark.parametrize(
    "dtype,rtol",
    [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)],  # bf16 loads work without tl.dot
)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_triton_l1_sums_matches_reference(shape, dtype, rtol):
    tk = _triton()
    a, b, s, _ = _inputs(shape, dtype, seed=1)
    np.testing.assert_allclose(tk.l1_sums(a, b).double().numpy(), _np_sums(a, b), rtol=rtol)
    np.testing.assert_allclose(tk.l1_sums(a, b, a_sub=s).double().numpy(), _np_sums(a, b, s), rtol=rtol)


@pytest.mark.interpret
def test_triton_l1_sums_grid_stride_loop_and_reproducibility(monkeypatch):
    tk = _triton()
    monkeypatch.setattr(tk, "MAX_PROGRAMS", 3)  # force several iterations per program (and a ragged last one)
    a, b, s, _ = _inputs((7, 1000), torch.float32, seed=2)
    first = tk.l1_sums(a, b, a_sub=s)
    np.testing.assert_allclose(first.double().numpy(), _np_sums(a, b, s), rtol=1e-5)
    assert torch.equal(first, tk.l1_sums(a, b, a_sub=s))  # fixed partial order: bit-identical on a re-run
    with pytest.raises(ValueError, match="shapes"):
        tk.l1_sums(a, b[:1])


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 13), (3, 1100)])
def test_triton_apply_residual_matches_reference(shape, dtype):
    tk = _triton()
    h, r, d, _ = _inputs(shape, dtype, seed=3)
    for delta, coef in [(None, 0.0), (d, 0.37), (d, -1.5)]:
        got, want = tk.apply_residual(h, r, delta, coef), ref.apply_residual(h, r, delta, coef)
        assert got.dtype == dtype and got.shape == h.shape
        if dtype == torch.bfloat16:
            # the interpreter casts fp32 → bf16 by truncation (the GPU rounds to nearest): allow one bf16 ulp
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.interpret
def test_triton_apply_residual_non_contiguous_input():
    tk = _triton()
    h, r, _, _ = _inputs((6, 8), torch.float32, seed=4)
    ht = h.t()  # non-contiguous view
    torch.testing.assert_close(tk.apply_residual(ht, r.t().contiguous()), ht + r.t(), rtol=0, atol=0)


@pytest.mark.interpret
def test_op_switch_picks_triton_when_asked():
    ops = cache_ops("triton", "cpu")  # allowed on CPU only under TRITON_INTERPRET=1 (the interpret tier)
    assert ops.name == "triton"
    a, b, _, _ = _inputs((4, 33), torch.float32, seed=5)
    np.testing.assert_allclose(ops.l1_sums(a, b).double().numpy(), _np_sums(a, b), rtol=1e-5)


# ---- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 13), (2, 4608, 3840), (5, 123, 123)])
def test_gpu_kernels_match_reference(shape, dtype):
    tk = _triton()
    a, b, s, d = (t.cuda() for t in _inputs(shape, dtype, seed=6))
    got = tk.l1_sums(a, b, a_sub=s).double().cpu()
    want = ref.l1_sums(a, b, a_sub=s).double().cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert torch.equal(tk.l1_sums(a, b, a_sub=s), tk.l1_sums(a, b, a_sub=s))  # reproducible
    for delta, coef in [(None, 0.0), (d, 0.37)]:
        out, want = tk.apply_residual(a, b, delta, coef), ref.apply_residual(a, b, delta, coef)
        # one rounding of an fp32 value (FMA contraction may differ by an fp32 ulp before it)
        torch.testing.assert_close(out.float(), want.float(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-3, atol=0)
    assert cache_ops("auto", "cuda").name == "triton"
