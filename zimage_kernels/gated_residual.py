"""Fused post-norm gated residual: ``x + tanh(gate)·RMSNorm(y)·w`` in one pass over ``x`` and ``y``.

Reference: ``zimage_kernels.reference.gated_residual`` (Z-Image's sandwich norm: ``x + tanh(gate_msa) *
attention_norm2(a)``,
the same with the FFN, and ``x + norm(y)`` in the unmodulated context refiner). sglang's CuTeDSL
``fused_norm_tanh_mul_add`` and bf16-native ``zimage_rmsnorm_tanh_residual`` (PRs #18762, #29742) fuse the same
expression; this kernel is written from the reference, not from their code.

Numerics: the RMSNorm part is exactly ``rms_norm_modulate``'s (fp32 statistics, cast to the weight dtype before the
weight multiply). Then, as eager torch does in the activation dtype: ``tanh(gate)`` rounded (computed once per call
on the ``[B, 1, C]`` gate by eager ``torch.tanh`` in the launcher, so it is eager's value), the product rounded, the
residual sum rounded.

Supported (else the torch reference runs): x and y ``[B, N, C]`` with unit stride along C, weight ``[C]``, gate
``[B, 1, C]`` or None, all of one dtype (fp32, fp16, bf16). Interpreter-tested in fp32/fp16; GPU paths untested on
hardware so far.
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
def _gated_residual_kernel(
    Out, s_ob, s_on,  # [B, N, C] output
    X, s_xb, s_xn,  # [B, N, C] residual stream
    Y, s_yb, s_yn,  # [B, N, C] branch output (attention or FFN), normalised here
    W,  # [C] norm weight
    Gate, s_gb,  # [B, 1, C] tanh(adaLN gate), rounded to the activation dtype (ignored unless HAS_GATE)
    R, N, C, eps, inv_c,  # R = B·N rows
    BLOCK_R: tl.constexpr,  #
    BLOCK_C: tl.constexpr,  #
    HAS_GATE: tl.constexpr,  #
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // N
    n = rows % N
    dtype = Out.dtype.element_ty
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]

    y = tl.load(Y + (b * s_yb + n * s_yn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    yn = rms_norm_rows(y, w, eps, inv_c, dtype)
    if HAS_GATE:
        g = tl.load(Gate + (b * s_gb)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        yn = round_to(g * yn, dtype)
    x = tl.load(X + (b * s_xb + n * s_xn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + (b * s_ob + n * s_on)[:, None] + cols[None, :], (x + yn).to(dtype), mask=mask)


def supports(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None) -> bool:
    if x.dim() != 3 or x.dtype not in FLOAT_DTYPES or not supported_device(x):
        return False
    B, _, C = x.shape
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device or x.stride(-1) != 1 or y.stride(-1) != 1:
        return False
    if weight.shape != (C,) or weight.dtype != x.dtype or weight.device != x.device:
        return False
    if gate is not None and (gate.shape != (B, 1, C) or gate.dtype != x.dtype or gate.stride(-1) != 1):
        return False
    return True


def _launch(x, y, weight, gate, eps):
    assert supports(x, y, weight, gate), "gated_residual: unsupported inputs reached the Triton launcher"
    B, N, C = x.shape
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    weight = weight.contiguous()
    if gate is not None:
        # tanh once per call on [B, 1, C] (eager torch's own tanh: same rounding as the reference), not once per row
        # of the [B, N, C] tile: per row it cost 34 MUFU and ~40 more instructions per element
        # (zimage_kernels/compiled.py)
        gate = torch.tanh(gate)
    block_c = next_pow2(C)
    block_r, warps = row_block(B * N, block_c)
    with launcher_device(x):
        _gated_residual_kernel[(triton.cdiv(B * N, block_r),)](
            out, out.stride(0), out.stride(1),
            x, x.stride(0), x.stride(1),
            y, y.stride(0), y.stride(1),
            weight,
            gate if gate is not None else x, gate.stride(0) if gate is not None else 0,
            B * N, N, C, float(eps), fp32_reciprocal(C),
            BLOCK_R=block_r, BLOCK_C=block_c, HAS_GATE=gate is not None, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out


@torch.library.custom_op("zimage::gated_residual", mutates_args=())
def _gated_residual_op(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return _launch(x, y, weight, gate, eps)


@_gated_residual_op.register_fake
def _(x, y, weight, gate, eps):
    return x.new_empty(x.shape)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``x + tanh(gate)·RMSNorm(y)·weight`` (``x + RMSNorm(y)·weight`` when gate is None); ``[B, N, C]`` tensors,
    weight ``[C]``, gate raw ``[B, 1, C]``. Same result as ``zimage_kernels.reference.gated_residual``."""
    if not supports(x, y, weight, gate):
        return reference.gated_residual(x, y, weight, gate, eps)
    if use_custom_op():
        return _gated_residual_op(x, y, weight, gate, eps)
    return _launch(x, y, weight, gate, eps)
