"""FP8 (e4m3) Triton kernels: the quantizing producers and the W8A8 GEMM (definitions in ``fp8.py``).

- ``rms_norm_modulate_fp8``: ``RMSNorm(x)·w·(1 + scale)`` (the cast points of ``rms_norm_modulate.py``), the row's
  amax and its e4m3 codes + fp32 scale, in one pass over ``x``: the bf16 pre-norm is never written.
- ``swiglu_fp8``: ``silu(a)·b`` rounded to the activation dtype as eager does, then per-row e4m3; two sweeps over
  the row (amax, then codes), the second mostly from L2; the bf16 product is never written.
- ``quantize_rows``: per-row e4m3 of any ``[..., K]`` tensor (the attention output before ``to_out``, and any
  FP8 layer's bf16 input); reads the tensor once per sweep, writes one byte per element.
- ``fp8_gemm``: ``(q_a·q_bᵀ)·s_a[:, None]·s_b[None, :] (+ bias)``, e4m3 operands, fp32 accumulation (wgmma with e4m3
  operands on sm_90), scales and bias applied once in the epilogue. Used where ``torch._scaled_mm`` does not run.

Quantization numerics equal the reference's: fp32 amax, ``scale = max(amax, 1e-12) / 448`` and ``q = x / scale``
with IEEE division, clamped to ±448 before the cast (Triton's cast does not saturate). Supported (else the reference
runs): fp32/fp16/bf16 activations on CUDA; fp32/fp16 under the interpreter (its bf16 is wrong, see ``_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fp8
from ._triton import (
    FLOAT_DTYPES,
    INTERPRET,
    exp,
    fp32_reciprocal,
    launcher_device,
    next_pow2,
    rms_norm_rows,
    round_to,
    row_block,
    row_view,
    supported_device,
    use_custom_op,
)
from .fp8 import E4M3, E4M3_MAX, SCALE_FLOOR, Fp8Act

MAX_BLOCK_K = 2048  # column chunk of the two-sweep row kernels


@triton.jit
def _e4m3(q, ROUND_FIRST: tl.constexpr):
    """Clamped fp32 codes -> e4m3. The interpreter's cast mis-rounds values that round up across a power of two
    (124.3 -> 64 instead of 128, triton 3.8), so under the interpreter the codes are first rounded to e4m3's three
    mantissa bits (round to nearest even) in integer arithmetic and the cast is exact; on a GPU the cast is the
    hardware's ``cvt.rn.satfinite`` and this branch is compiled out."""
    if ROUND_FIRST:
        bits = q.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF
        q = bits.to(tl.float32, bitcast=True)
    return q.to(tl.float8e4nv)


@triton.jit
def _quantize(y, amax, QMAX: tl.constexpr, FLOOR: tl.constexpr):
    """fp32 rows ``y`` [R, C] and their amax [R] -> (clamped fp32 codes to cast to e4m3, fp32 scale [R])."""
    scale = tl.math.div_rn(tl.maximum(amax, FLOOR), QMAX)
    q = tl.math.div_rn(y, scale[:, None])
    return tl.minimum(tl.maximum(q, -QMAX), QMAX), scale


@triton.jit
def _rms_norm_modulate_fp8_kernel(
    Q, S,  # [R, C] e4m3 codes (contiguous), [R] fp32 scales
    X, s_xb, s_xn,  # [B, N, C] input, unit stride along C
    W,  # [C] norm weight
    Scale, s_sb,  # [B, 1, C] raw adaLN scale (ignored unless HAS_SCALE)
    R, N, C, eps, inv_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SCALE: tl.constexpr,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, ROUND_FIRST: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // N
    n = rows % N
    dtype = X.dtype.element_ty
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(X + (b * s_xb + n * s_xn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = rms_norm_rows(x, w, eps, inv_c, dtype)
    if HAS_SCALE:
        s = tl.load(Scale + (b * s_sb)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = round_to(y * round_to(1.0 + s, dtype), dtype)  # the eager bf16 tensor the reference quantizes
    y = tl.where(mask, y, 0.0)
    q, scale = _quantize(y, tl.max(tl.abs(y), axis=1), QMAX, FLOOR)
    tl.store(Q + rows[:, None] * C + cols[None, :], _e4m3(q, ROUND_FIRST), mask=mask)
    tl.store(S + rows, scale, mask=rows < R)


@triton.jit
def _swiglu_fp8_kernel(
    Q, S,  # [R, F] e4m3 codes (contiguous), [R] fp32 scales
    A, s_a, B, s_b,  # [R, F] gate / value rows, unit column stride
    R, F,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr, ROUND_FIRST: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    dtype = A.dtype.element_ty
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):  # sweep 1: the row's amax
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (cols < F)[None, :]
        a = tl.load(A + (rows * s_a)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + (rows * s_b)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = round_to(round_to(tl.math.div_rn(a, 1.0 + exp(-a)), dtype) * b, dtype)
        amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, FLOOR), QMAX)
    for f0 in range(0, F, BLOCK_F):  # sweep 2: the codes
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (cols < F)[None, :]
        a = tl.load(A + (rows * s_a)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + (rows * s_b)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = round_to(round_to(tl.math.div_rn(a, 1.0 + exp(-a)), dtype) * b, dtype)
        q = tl.minimum(tl.maximum(tl.math.div_rn(y, scale[:, None]), -QMAX), QMAX)
        tl.store(Q + rows[:, None] * F + cols[None, :], _e4m3(q, ROUND_FIRST), mask=mask)
    tl.store(S + rows, scale, mask=rmask)


@triton.jit
def _quantize_rows_kernel(
    Q, S,  # [R, K] e4m3 codes (contiguous), [R] fp32 scales
    X, s_x,  # [R, K] rows, unit column stride
    R, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, QMAX: tl.constexpr, FLOOR: tl.constexpr, ROUND_FIRST: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols < K)[None, :]
        x = tl.load(X + (rows * s_x)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, FLOOR), QMAX)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols < K)[None, :]
        x = tl.load(X + (rows * s_x)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -QMAX), QMAX)
        tl.store(Q + rows[:, None] * K + cols[None, :], _e4m3(q, ROUND_FIRST), mask=mask)
    tl.store(S + rows, scale, mask=rmask)


@triton.jit
def _fp8_gemm_kernel(
    C, s_cm,  # [M, N] output
    A, s_am,  # [M, K] e4m3 activation codes, unit stride along K
    Bw, s_bn,  # [N, K] e4m3 weight codes (row-major: K-major, as wgmma wants e4m3 B)
    SA, SB,  # [M] fp32 activation scales, [N] fp32 weight scales
    Bias,  # [N] (ignored unless HAS_BIAS)
    M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)  # grouped launch order: GROUP_M row tiles share each weight tile from L2
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * s_am + rk[None, :]
    b_ptrs = Bw + rn[:, None] * s_bn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(rn < N)[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(SA + rm, mask=rm < M, other=0.0)
    sb = tl.load(SB + rn, mask=rn < N, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(C + rm[:, None] * s_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------------------------


def _empty_act(shape, device) -> Fp8Act:
    return Fp8Act(torch.empty(shape, dtype=E4M3, device=device), torch.empty((*shape[:-1], 1), device=device))


def _launch_rms_norm_modulate_fp8(x, weight, scale, eps: float) -> Fp8Act:
    B, N, C = x.shape
    out = _empty_act((B, N, C), x.device)
    if x.numel() == 0:
        return out
    block_c = next_pow2(C)
    block_r, warps = row_block(B * N, block_c)
    with launcher_device(x):
        _rms_norm_modulate_fp8_kernel[(triton.cdiv(B * N, block_r),)](
            out.q, out.scale,
            x, x.stride(0), x.stride(1),
            weight.contiguous(),
            scale if scale is not None else x, scale.stride(0) if scale is not None else 0,
            B * N, N, C, float(eps), fp32_reciprocal(C),
            BLOCK_R=block_r, BLOCK_C=block_c, HAS_SCALE=scale is not None, QMAX=E4M3_MAX, FLOOR=SCALE_FLOOR,
            ROUND_FIRST=INTERPRET,
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out


def rms_norm_modulate_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float) -> Fp8Act:
    """Same result as ``fp8.rms_norm_modulate_fp8`` (the reference) in one pass over ``x``."""
    from .rms_norm_modulate import supports

    if not supports(x, weight, scale):
        return fp8.rms_norm_modulate_fp8(x, weight, scale, eps)
    if use_custom_op():
        return Fp8Act(*_rms_norm_modulate_fp8_op(x, weight, scale, eps))
    return _launch_rms_norm_modulate_fp8(x, weight, scale, eps)


def _row_launch(t: torch.Tensor):
    R, K = t.shape
    block_k = min(MAX_BLOCK_K, next_pow2(K))
    block_r, warps = row_block(R, block_k)
    return (triton.cdiv(R, block_r),), block_r, block_k, warps


def _launch_swiglu_fp8(a: torch.Tensor, b: torch.Tensor) -> Fp8Act:
    out = _empty_act(a.shape, a.device)
    if a.numel() == 0:
        return out
    a2, b2 = row_view(a), row_view(b)
    grid, block_r, block_f, warps = _row_launch(a2)
    with launcher_device(a):
        _swiglu_fp8_kernel[grid](
            out.q, out.scale, a2, a2.stride(0), b2, b2.stride(0), a2.shape[0], a2.shape[1],
            BLOCK_R=block_r, BLOCK_F=block_f, QMAX=E4M3_MAX, FLOOR=SCALE_FLOOR, ROUND_FIRST=INTERPRET, num_warps=warps,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out


def swiglu_fp8(a: torch.Tensor, b: torch.Tensor) -> Fp8Act:
    """Same result as ``fp8.swiglu_fp8`` (the reference); the bf16 product is never written."""
    from .swiglu import supports

    if not supports(a, b):
        return fp8.swiglu_fp8(a, b)
    if use_custom_op():
        return Fp8Act(*_swiglu_fp8_op(a, b))
    return _launch_swiglu_fp8(a, b)


def _launch_quantize_rows(x: torch.Tensor) -> Fp8Act:
    x2 = row_view(x)
    if x2 is None:
        x2 = x.reshape(-1, x.shape[-1])  # a copy (e.g. attention's permuted output); stride 1 along K
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
    out = _empty_act(x.shape, x.device)
    if x.numel() == 0:
        return out
    grid, block_r, block_k, warps = _row_launch(x2)
    with launcher_device(x):
        _quantize_rows_kernel[grid](
            out.q, out.scale, x2, x2.stride(0), x2.shape[0], x2.shape[1],
            BLOCK_R=block_r, BLOCK_K=block_k, QMAX=E4M3_MAX, FLOOR=SCALE_FLOOR, ROUND_FIRST=INTERPRET, num_warps=warps,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out


def quantize_rows(x: torch.Tensor) -> Fp8Act:
    """Same result as ``fp8.quantize_rows`` (the reference) for ``[..., K]`` activations."""
    if x.dim() == 0 or x.dtype not in FLOAT_DTYPES or not supported_device(x):
        return fp8.quantize_rows(x)
    if use_custom_op():
        return Fp8Act(*_quantize_rows_op(x))
    return _launch_quantize_rows(x)


def gemm_config(device: torch.device) -> dict:
    """Tile config: 128×128×128, 8 warps, 4 stages on a GPU (e4m3 tiles of 16 KiB: 128 KiB of shared memory);
    small tiles under the interpreter."""
    if INTERPRET or device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)


def _launch_fp8_gemm(q: torch.Tensor, sa: torch.Tensor, wq, ws, bias, out_dtype) -> torch.Tensor:
    K = q.shape[-1]
    qa = q.reshape(-1, K)
    if qa.stride(-1) != 1:
        qa = qa.contiguous()
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    M, N = qa.shape[0], wq.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=qa.device)
    if out.numel() == 0:
        return out.reshape(*q.shape[:-1], N)
    sa = sa.reshape(-1).float().contiguous()
    sb = ws.reshape(-1).float().contiguous()
    cfg = gemm_config(qa.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    with launcher_device(qa):
        _fp8_gemm_kernel[grid](
            out, out.stride(0), qa, qa.stride(0), wq, wq.stride(0), sa, sb,
            bias if bias is not None else sb, M, N, K, HAS_BIAS=bias is not None, **cfg,
        )  # fmt: skip
    return out.reshape(*q.shape[:-1], N)


def fp8_gemm(a: Fp8Act, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, out_dtype) -> torch.Tensor:
    """``(a.q·a.scale) @ (wq·ws)ᵀ + bias`` in ``out_dtype`` with fp32 accumulation (the Triton kernel)."""
    if not supported_device(a.q) or wq.dtype != E4M3 or a.q.dtype != E4M3:
        return fp8.gemm_dequant(a, wq, ws, bias, out_dtype)
    if use_custom_op():
        return _fp8_gemm_op(a.q, a.scale, wq, ws, bias, out_dtype)
    return _launch_fp8_gemm(a.q, a.scale, wq, ws, bias, out_dtype)


def fp8_linear(a: Fp8Act, wq, ws, bias, out_dtype) -> torch.Tensor:
    """The Triton op set's GEMM: ``torch._scaled_mm`` where it runs, else :func:`fp8_gemm` (``fp8.fp8_linear``)."""
    return fp8.fp8_linear(a, wq, ws, bias, out_dtype, triton_gemm=fp8_gemm)


# ---- custom ops: what torch.compile sees (opaque to Inductor, with fake implementations) -----------------------------


@torch.library.custom_op("zimage::rms_norm_modulate_fp8", mutates_args=())
def _rms_norm_modulate_fp8_op(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_launch_rms_norm_modulate_fp8(x, weight, scale, eps))


@torch.library.custom_op("zimage::swiglu_fp8", mutates_args=())
def _swiglu_fp8_op(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_launch_swiglu_fp8(a, b))


@torch.library.custom_op("zimage::quantize_rows", mutates_args=())
def _quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_launch_quantize_rows(x))


def _fake_act(x):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


_rms_norm_modulate_fp8_op.register_fake(lambda x, weight, scale, eps: _fake_act(x))
_swiglu_fp8_op.register_fake(lambda a, b: _fake_act(a))
_quantize_rows_op.register_fake(_fake_act)


@torch.library.custom_op("zimage::fp8_gemm", mutates_args=())
def _fp8_gemm_op(
    q: torch.Tensor,
    scale: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _launch_fp8_gemm(q, scale, wq, ws, bias, out_dtype)


@_fp8_gemm_op.register_fake
def _(q, scale, wq, ws, bias, out_dtype):
    return q.new_empty((*q.shape[:-1], wq.shape[0]), dtype=out_dtype)
