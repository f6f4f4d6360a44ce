"""FP8 Triton kernels (``zimage_kernels/fp8_triton.py``) against their torch references, under the interpreter.

The references (``zimage_kernels.fp8``) are "the unquantized op, then per-row e4m3"; they are themselves checked
against fp64 arithmetic in ``tests/test_fp8.py``. The GEMM is checked against the fp64 product of the dequantized
operands (the definition), not against ``torch._scaled_mm``.
"""

import pytest
import torch

from zimage_kernels import fp8, fp8_triton, reference
from zimage_kernels.backend import get_ops

pytestmark = pytest.mark.interpret

DTYPES = [torch.float32, torch.float16]


def _x(shape, dtype, scale=1.0, offset=0.0):
    return (torch.randn(shape) * scale + offset).to(dtype)


def assert_act_matches(got: fp8.Fp8Act, ref: fp8.Fp8Act):
    """Same scales (up to one fp16 ulp of the row amax: the kernel's fp32 reductions run in another order) and
    codes equal on >= 99% of elements, the rest within one e4m3 step (the interpreter's cast rounds e4m3
    subnormals differently from torch's)."""
    assert got.q.dtype == fp8.E4M3 and got.q.shape == ref.q.shape
    assert got.scale.shape == ref.scale.shape and got.scale.dtype == torch.float32
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-3, atol=0)
    gq, rq = got.q.float(), ref.q.float()
    assert (gq == rq).float().mean() >= 0.99
    step = torch.maximum(rq.abs() * 2.0**-3, torch.full_like(rq, 2.0**-9))
    assert ((gq - rq).abs() <= step + 1e-12).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 96), (1, 3, 3840)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_rms_norm_modulate_fp8(dtype, shape, with_scale):
    B, N, C = shape
    x, w = _x(shape, dtype, 2.0), _x((C,), dtype, 0.5, 1.0)
    scale = _x((B, 1, C), dtype, 0.5) if with_scale else None
    got = fp8_triton.rms_norm_modulate_fp8(x, w, scale, 1e-5)
    assert_act_matches(got, fp8.rms_norm_modulate_fp8(x, w, scale, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 200), (2, 4200)])  # 4200: three 2048-column chunks, a masked tail
def test_swiglu_fp8(dtype, shape):
    a, b = _x(shape, dtype, 3.0), _x(shape, dtype, 2.0)
    assert_act_matches(fp8_triton.swiglu_fp8(a, b), fp8.swiglu_fp8(a, b))


def test_swiglu_fp8_on_column_slices():
    """w1|w3 fused outputs: a and b are column slices with a row stride of 2F."""
    ab = _x((7, 2 * 96), torch.float32, 3.0)
    a, b = ab[:, :96], ab[:, 96:]
    assert_act_matches(fp8_triton.swiglu_fp8(a, b), fp8.swiglu_fp8(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_attention_output(dtype):
    """The attention output ([B, N, H, D], a permuted view from SDPA) flattened to [B, N, H·D] rows."""
    q = _x((2, 40, 4, 32), dtype)
    out = reference.attention(q, q * 0.5, q + 1)  # [B, N, H, D] permuted view
    rows = out.flatten(2)
    assert_act_matches(fp8_triton.quantize_rows(rows), fp8.quantize_rows(rows))


def test_quantize_rows_zero_and_huge_rows():
    """A zero row gets codes 0 and a tiny finite scale; values far beyond 448 saturate through the scale (no inf)."""
    x = torch.zeros(3, 64)
    x[1] = torch.linspace(-1e6, 1e6, 64)
    x[2, 5] = 3e-30
    got = fp8_triton.quantize_rows(x)
    assert_act_matches(got, fp8.quantize_rows(x))
    assert torch.isfinite(got.q.float()).all() and (got.q[0].float() == 0).all()
    assert got.q[1].float().abs().max() == fp8.E4M3_MAX


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mnk", [(37, 70, 100), (16, 32, 32), (1, 48, 64)])
def test_fp8_gemm_equals_the_product_of_the_dequantized_operands(mnk, out_dtype, bias):
    M, N, K = mnk
    a = fp8.quantize_rows(torch.randn(M, K) * 3)
    wq, ws = fp8.quantize_weight(torch.randn(N, K) * 0.05)
    b = torch.randn(N) if bias else None
    got = fp8_triton.fp8_gemm(a, wq, ws, b, out_dtype)
    ref = (a.q.double() * a.scale.double()) @ (wq.double() * ws.double()[:, None]).t()
    if bias:
        ref = ref + b.double()
    assert got.dtype == out_dtype and got.shape == (M, N)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_triton_ops_dispatch_to_the_kernels(monkeypatch):
    """The Triton op set's entries are the fp8_triton launchers, and its GEMM runs the Triton kernel when asked."""
    ops = get_ops("triton", "cpu")
    assert ops.rms_norm_modulate_fp8 is fp8_triton.rms_norm_modulate_fp8
    assert ops.swiglu_fp8 is fp8_triton.swiglu_fp8 and ops.quantize_rows is fp8_triton.quantize_rows
    calls = []
    monkeypatch.setattr(fp8_triton, "fp8_gemm", lambda *a: calls.append(a) or fp8.gemm_dequant(*a))
    monkeypatch.setenv(fp8.GEMM_ENV, "triton")
    a = fp8.quantize_rows(torch.randn(4, 32))
    wq, ws = fp8.quantize_weight(torch.randn(16, 32))
    ops.fp8_linear(a, wq, ws, None, torch.float32)
    assert len(calls) == 1


@pytest.mark.parametrize("gemm", ["auto", "triton"])
def test_quantized_block_compiles_fullgraph_with_the_fp8_ops_opaque(monkeypatch, gemm):
    """A quantized transformer block under torch.compile(fullgraph=True): the FP8 producers (and the Triton GEMM
    when chosen) are opaque custom ops in the graph, and the result equals eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from tests.helpers import diffusers_transformer
    from zimage_core.model import BlockInputs, ZImageTransformer

    monkeypatch.setenv(fp8.GEMM_ENV, gemm)
    model = ZImageTransformer.from_diffusers(diffusers_transformer("hd32")).eval()
    model.set_kernel_backend("triton").quantize("fp8")
    block = model.layers[0]
    cfg = model.config
    x = torch.randn(2, 32, cfg.dim)
    freqs = torch.polar(torch.ones(2, 32, cfg.head_dim // 2), torch.rand(2, 32, cfg.head_dim // 2)).to(torch.complex64)
    inp = BlockInputs(get_ops("triton", "cpu"), None, freqs, torch.randn(2, cfg.adaln_dim))
    with torch.no_grad():
        eager = block(x, inp)
        counter = CompileCounterWithBackend("aot_eager")
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=counter, fullgraph=True)(x, inp)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    want = {"zimage.rms_norm_modulate_fp8.default", "zimage.swiglu_fp8.default", "zimage.quantize_rows.default"}
    if gemm == "triton":
        want.add("zimage.fp8_gemm.default")
    assert want <= targets, targets


def test_fp8_custom_ops_pass_opcheck():
    x, w, s = torch.randn(2, 5, 64), torch.randn(64), torch.randn(2, 1, 64)
    a, b = torch.randn(6, 96), torch.randn(6, 96)
    q = fp8.quantize_rows(torch.randn(6, 64))
    wq, ws = fp8.quantize_weight(torch.randn(32, 64))
    cases = {
        "rms_norm_modulate_fp8": (x, w, s, 1e-5),
        "swiglu_fp8": (a, b),
        "quantize_rows": (x,),
        "fp8_gemm": (q.q, q.scale, wq, ws, torch.randn(32), torch.float32),
    }
    for name, args in cases.items():
        # fake implementations against the real ones (opcheck's schema test multiplies outputs: no e4m3 mul on CPU)
        torch.library.opcheck(getattr(torch.ops.zimage, name), args, test_utils=("test_faketensor",))
