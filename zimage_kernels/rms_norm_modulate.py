"""Fused pre-norm with adaLN scale: ``RMSNorm(x)·w·(1 + scale)`` in one pass over ``x``.

Reference: ``zimage_kernels.reference.rms_norm_modulate`` (diffusers 0.42.1 ``RMSNorm`` followed by Z-Image's
``* (1 + scale_msa)``). Eager torch runs it as about eight kernels; this is one read of ``x`` and one write.

Numerics (bit-faithful to eager torch's CUDA trajectory by construction, see docs/kernels.md, "Design notes"):
fp32 sum of squares times ``fl32(1/C)`` (CUDA ``mean`` multiplies by the reciprocal), ``rsqrt(var + eps)``, fp32
``x * rsqrt``, round to the weight dtype, times the weight (rounded), ``1 + scale`` rounded, the product rounded.
Every rounding that eager torch does in bf16/fp16 is done here too (``round_to``). The only expected difference is the
order of the fp32 sum of squares (a tree reduction here), which can move a result by one bf16 ulp in rare ties.

Supported (else the torch reference runs): x ``[B, N, C]`` with unit stride along C (any B/N strides), weight ``[C]``,
scale ``[B, 1, C]`` or None; x, weight and scale all of one dtype (fp32, fp16 or bf16). Tested under the Triton
interpreter (fp32/fp16); the GPU tier (bf16, bit-exactness vs eager) is written but was not run on hardware yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import (
    FLOAT_DTYPES,
    fp32_reciprocal,
    launcher_device,
    next_pow2,
    rms_norm_rows,
    round_to,
    row_block,
    supported_device,
    use_custom_op,
)


@triton.jit
def _rms_norm_modulate_kernel(
    Out, s_ob, s_on,  # [B, N, C] output, unit stride along C
    X, s_xb, s_xn,  # [B, N, C] input, unit stride along C
    W,  # [C] norm weight
    Scale, s_sb,  # [B, 1, C] raw adaLN scale (ignored unless HAS_SCALE)
    R, N, C, eps, inv_c,  # R = B·N rows
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # next_pow2(C)
    HAS_SCALE: tl.constexpr,  #
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: B·N·C exceeds 2^31
    b = rows // N
    n = rows % N
    dtype = Out.dtype.element_ty
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]

    x = tl.load(X + (b * s_xb + n * s_xn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = rms_norm_rows(x, w, eps, inv_c, dtype)  # padding lanes are 0: they add nothing to the mean of squares
    if HAS_SCALE:
        s = tl.load(Scale + (b * s_sb)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * round_to(1.0 + s, dtype)  # (1 + scale) is its own eager op: rounded before the product
    tl.store(Out + (b * s_ob + n * s_on)[:, None] + cols[None, :], y.to(dtype), mask=mask)


def supports(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether the Triton kernel handles these inputs (else the reference runs)."""
    if x.dim() != 3 or x.dtype not in FLOAT_DTYPES or not supported_device(x) or x.stride(-1) != 1:
        return False
    B, _, C = x.shape
    if weight.shape != (C,) or weight.dtype != x.dtype or weight.device != x.device:
        return False
    if scale is not None and (scale.shape != (B, 1, C) or scale.dtype != x.dtype or scale.stride(-1) != 1):
        return False
    return True


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    assert supports(x, weight, scale), "rms_norm_modulate: unsupported inputs reached the Triton launcher"
    B, N, C = x.shape
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    weight = weight.contiguous()
    block_c = next_pow2(C)
    block_r, warps = row_block(B * N, block_c)
    with launcher_device(x):
        _rms_norm_modulate_kernel[(triton.cdiv(B * N, block_r),)](
            out, out.stride(0), out.stride(1),
            x, x.stride(0), x.stride(1),
            weight,
            scale if scale is not None else x, scale.stride(0) if scale is not None else 0,
            B * N, N, C, float(eps), fp32_reciprocal(C),
            BLOCK_R=block_r, BLOCK_C=block_c, HAS_SCALE=scale is not None, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out


@torch.library.custom_op("zimage::rms_norm_modulate", mutates_args=())
def _rms_norm_modulate_op(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return _launch(x, weight, scale, eps)


@_rms_norm_modulate_op.register_fake
def _(x, weight, scale, eps):
    return x.new_empty(x.shape)


def rms_norm_modulate(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``RMSNorm(x)·weight·(1 + scale)``; x ``[B, N, C]``, weight ``[C]``, scale raw ``[B, 1, C]`` or None.

    Same result as ``zimage_kernels.reference.rms_norm_modulate`` (see the module docstring for the cast points).
    """
    if not supports(x, weight, scale):
        return reference.rms_norm_modulate(x, weight, scale, eps)
    if use_custom_op():
        return _rms_norm_modulate_op(x, weight, scale, eps)
    return _launch(x, weight, scale, eps)
