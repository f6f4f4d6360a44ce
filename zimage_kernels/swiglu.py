"""SwiGLU gate of Z-Image's feed-forward: ``silu(a)·b`` with ``a = w1 x`` and ``b = w3 x`` (hidden size 10240).

Reference: ``zimage_kernels.reference.swiglu`` (``F.silu(a) * b``). Eager torch runs two kernels and writes ``silu(a)``
to
memory in between; this is one read of ``a`` and ``b`` and one write.

Numerics, as eager CUDA computes them: ``silu`` in fp32 as ``a / (1 + expf(-a))`` with an IEEE division
(``div_rn``; Triton's default fp32 ``/`` is the approximate ``div.full``) and libdevice ``expf`` (``tl.exp`` is the
faster ``ex2.approx`` form), rounded to the activation dtype, then the product rounded. On the GPU this should be
bit-identical to eager torch; the GPU tier asserts it (not yet run on hardware).

Supported (else the torch reference runs): ``a`` and ``b`` of one shape and dtype (fp32, fp16, bf16), each viewable
as ``[rows, F]`` with unit stride along F (contiguous tensors, or column slices of a fused ``w1|w3`` output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import (
    FLOAT_DTYPES,
    exp,
    launcher_device,
    next_pow2,
    round_to,
    row_block,
    row_view,
    supported_device,
    use_custom_op,
)

MAX_BLOCK_F = 2048  # 10240 = 5 x 2048: no masked lanes at Z-Image's width


@triton.jit
def _swiglu_kernel(
    Out, s_o,  # [R, F] output rows
    A, s_a,  # [R, F] gate input (w1 x)
    B, s_b,  # [R, F] value input (w3 x)
    R, F,  #
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_F: tl.constexpr,  # columns per program
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: R·F exceeds 2^31
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < R)[:, None] & (cols < F)[None, :]
    dtype = Out.dtype.element_ty
    a = tl.load(A + (rows * s_a)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + (rows * s_b)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    silu = round_to(tl.math.div_rn(a, 1.0 + exp(-a)), dtype)  # F.silu writes its own tensor: rounded
    tl.store(Out + (rows * s_o)[:, None] + cols[None, :], (silu * b).to(dtype), mask=mask)


def supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype not in FLOAT_DTYPES or a.device != b.device:
        return False
    return supported_device(a) and row_view(a) is not None and row_view(b) is not None


def _launch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert supports(a, b), "swiglu: unsupported inputs reached the Triton launcher"
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    a2, b2, o2 = row_view(a), row_view(b), out.view(-1, a.shape[-1])  # [R, F] each
    R, F = a2.shape
    block_f = min(MAX_BLOCK_F, next_pow2(F))
    block_r, warps = row_block(R, block_f)
    with launcher_device(a):
        _swiglu_kernel[(triton.cdiv(R, block_r), triton.cdiv(F, block_f))](
            o2, o2.stride(0), a2, a2.stride(0), b2, b2.stride(0), R, F,
            BLOCK_R=block_r, BLOCK_F=block_f, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out


@torch.library.custom_op("zimage::swiglu", mutates_args=())
def _swiglu_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _launch(a, b)


@_swiglu_op.register_fake
def _(a, b):
    return a.new_empty(a.shape)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a)·b`` elementwise (same result as ``zimage_kernels.reference.swiglu``)."""
    if not supports(a, b):
        return reference.swiglu(a, b)
    if use_custom_op():
        return _swiglu_op(a, b)
    return _launch(a, b)
