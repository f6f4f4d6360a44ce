"""Final layer's ``LayerNorm(x)·(1 + scale)`` (no affine, eps 1e-6 in Z-Image), one pass over ``x``.

Reference: ``zimage_kernels.reference.layer_norm_modulate`` (``F.layer_norm(x, (C,), eps=eps) * (1 + scale)``).

Numerics: mean and variance in fp32 (two passes over the row held in registers: ``mean``, then the mean of squared
deviations), ``(x - mean)·rsqrt(var + eps)`` in fp32 rounded to the activation dtype, ``1 + scale`` rounded, the
product rounded, as eager torch does. Eager CUDA's ``layer_norm`` uses Welford's update for the statistics, so the fp32
statistics can differ in the last bits (not bit-exact; within the 2x error rule).

Supported (else the torch reference runs): x ``[B, N, C]`` with unit stride along C, scale ``[B, 1, C]`` of x's
dtype (fp32, fp16, bf16). Runs once per forward on ``[B, N, 3840]``; interpreter-tested, GPU untested so far.
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
    round_to,
    row_block,
    supported_device,
    use_custom_op,
)


@triton.jit
def _layer_norm_modulate_kernel(
    Out, s_ob, s_on,  # [B, N, C] output
    X, s_xb, s_xn,  # [B, N, C] input
    Scale, s_sb,  # [B, 1, C] raw adaLN scale
    R, N, C, eps, inv_c,  # R = B·N rows
    BLOCK_R: tl.constexpr,  #
    BLOCK_C: tl.constexpr,  #
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // N
    n = rows % N
    dtype = Out.dtype.element_ty
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]

    x = tl.load(X + (b * s_xb + n * s_xn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) * inv_c
    d = tl.where(mask, x - mean[:, None], 0.0)  # padding lanes must not add mean^2 to the variance
    var = tl.sum(d * d, axis=1) * inv_c
    y = round_to(d * tl.math.rsqrt(var + eps)[:, None], dtype)
    s = tl.load(Scale + (b * s_sb)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + (b * s_ob + n * s_on)[:, None] + cols[None, :], (y * round_to(1.0 + s, dtype)).to(dtype), mask=mask)


def supports(x: torch.Tensor, scale: torch.Tensor) -> bool:
    if x.dim() != 3 or x.dtype not in FLOAT_DTYPES or not supported_device(x) or x.stride(-1) != 1:
        return False
    B, _, C = x.shape
    return scale.shape == (B, 1, C) and scale.dtype == x.dtype and scale.device == x.device and scale.stride(-1) == 1


def _launch(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    assert supports(x, scale), "layer_norm_modulate: unsupported inputs reached the Triton launcher"
    B, N, C = x.shape
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c = next_pow2(C)
    block_r, warps = row_block(B * N, block_c)
    with launcher_device(x):
        _layer_norm_modulate_kernel[(triton.cdiv(B * N, block_r),)](
            out, out.stride(0), out.stride(1),
            x, x.stride(0), x.stride(1),
            scale, scale.stride(0),
            B * N, N, C, float(eps), fp32_reciprocal(C),
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out


@torch.library.custom_op("zimage::layer_norm_modulate", mutates_args=())
def _layer_norm_modulate_op(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, scale, eps)


@_layer_norm_modulate_op.register_fake
def _(x, scale, eps):
    return x.new_empty(x.shape)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x)·(1 + scale)`` (no affine); x ``[B, N, C]``, scale raw ``[B, 1, C]``."""
    if not supports(x, scale):
        return reference.layer_norm_modulate(x, scale, eps)
    if use_custom_op():
        return _layer_norm_modulate_op(x, scale, eps)
    return _launch(x, scale, eps)
