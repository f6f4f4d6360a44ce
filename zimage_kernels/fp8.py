"""FP8 (e4m3) W8A8: the torch references of the quantizing ops and the GEMM dispatch.

Format (one copy of each constant lives here):

- weights: ``float8_e4m3fn`` ``[out, in]`` with one fp32 scale per output channel (``w ≈ q · scale[:, None]``);
- activations: quantized per token (per row of ``[..., K]``), dynamically: ``scale = max(amax(row), tiny) / 448``,
  ``q = clamp(x / scale, ±448)`` rounded to e4m3 (round to nearest even, as torch's cast);
- GEMM: ``y = (q_x · q_wᵀ) · s_x[:, None] · s_w[None, :] (+ bias)``, accumulated in fp32 (``torch._scaled_mm`` with
  row-wise scales where it exists, the Triton kernel of ``fp8_triton.py`` otherwise).

The fused producers (``rms_norm_modulate_fp8``, ``swiglu_fp8``) are defined here as "the bf16/fp32 op, then
:func:`quantize_rows`", so the Triton kernels, which never write the unquantized tensor, are tested against exactly
that composition. This module imports no Triton; ``backend.Ops`` picks the implementation.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import reference

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_FLOOR = 1e-12  # amax floor: an all-zero row gets a tiny finite scale (q = 0), never 0/0
GEMM_ENV = "ZIMAGE_FP8_GEMM"  # auto | scaled_mm | triton | dequant: which FP8 GEMM runs (ablations, tests)
GEMM_CHOICES = ("auto", "scaled_mm", "triton", "dequant")


class Fp8Act(NamedTuple):
    """A per-token quantized activation: ``q`` e4m3 ``[..., K]`` and fp32 ``scale`` ``[..., 1]`` (x ≈ q·scale)."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def quantize_rows(x: torch.Tensor) -> Fp8Act:
    """Per-row (last dim) dynamic e4m3 quantization of ``x`` (any float dtype), in fp32."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(amax, min=SCALE_FLOOR) / E4M3_MAX
    q = torch.clamp(xf / scale, -E4M3_MAX, E4M3_MAX).to(E4M3)
    return Fp8Act(q, scale)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q e4m3 [out, in], scale fp32 [out])``: per-output-channel quantization of a linear weight."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("quantize_weight: the weight holds non-finite values (NaN/inf)")
    q, s = quantize_rows(w)
    return q, s.reshape(-1)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float().reshape(-1, 1)).to(dtype)


# ---- fused producers: torch references ---------------------------------------------------------------------------


def rms_norm_modulate_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float) -> Fp8Act:
    """``quantize_rows(rms_norm_modulate(x, weight, scale, eps))``: the pre-norm feeding q/k/v or w1/w3."""
    return quantize_rows(reference.rms_norm_modulate(x, weight, scale, eps))


def swiglu_fp8(a: torch.Tensor, b: torch.Tensor) -> Fp8Act:
    """``quantize_rows(silu(a)·b)``: the SwiGLU gate feeding w2 (the product rounded to a's dtype first, as eager)."""
    return quantize_rows(reference.swiglu(a, b))


# ---- the GEMM ----------------------------------------------------------------------------------------------------


def gemm_choice() -> str:
    choice = (os.environ.get(GEMM_ENV) or "auto").strip().lower()
    if choice not in GEMM_CHOICES:
        raise ValueError(f"${GEMM_ENV} must be one of {GEMM_CHOICES}, got {choice[:40]!r}")
    return choice


def scaled_mm_supported(device: torch.device, k: int, n: int, out_dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` runs row-wise-scaled e4m3 here: CPU (any shape, measured with torch 2.13), or a
    CUDA device of compute capability ≥ 9.0 with K and N multiples of 16 and a bf16 output (its row-wise rule)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    return (
        torch.cuda.get_device_capability(device) >= (9, 0)
        and k % 16 == 0
        and n % 16 == 0
        and out_dtype == torch.bfloat16
    )


def gemm_dequant(a: Fp8Act, wq, ws, bias, out_dtype) -> torch.Tensor:
    """The definition: fp32 product of the dequantized operands (reference and last-resort fallback)."""
    x = a.dequantize().reshape(-1, a.q.shape[-1])
    y = x @ dequantize_weight(wq, ws).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*a.q.shape[:-1], wq.shape[0])


def gemm_scaled_mm(a: Fp8Act, wq, ws, bias, out_dtype) -> torch.Tensor:
    qa = a.q.reshape(-1, a.q.shape[-1])
    sa = a.scale.reshape(-1, 1).float()
    y = torch._scaled_mm(
        qa.contiguous(),
        wq.t(),  # [K, N] column-major view of the row-major [N, K] weight: what _scaled_mm wants for B
        scale_a=sa.contiguous(),
        scale_b=ws.float().reshape(1, -1),
        bias=None if bias is None else bias.to(out_dtype),
        out_dtype=out_dtype,
    )
    return y.reshape(*a.q.shape[:-1], wq.shape[0])


def fp8_linear(
    a: Fp8Act,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    triton_gemm=None,
) -> torch.Tensor:
    """``(a.q·a.scale) @ (wq·ws)ᵀ + bias`` in ``out_dtype``: ``torch._scaled_mm`` where it runs, else
    ``triton_gemm`` (the Triton kernel, passed by the Triton op set), else the dequantized fp32 product."""
    choice = gemm_choice()
    k, n = wq.shape[1], wq.shape[0]
    if choice == "dequant":
        return gemm_dequant(a, wq, ws, bias, out_dtype)
    if choice == "triton" and triton_gemm is not None:
        return triton_gemm(a, wq, ws, bias, out_dtype)
    if (choice != "triton" or triton_gemm is None) and scaled_mm_supported(a.q.device, k, n, out_dtype):
        return gemm_scaled_mm(a, wq, ws, bias, out_dtype)
    if triton_gemm is not None:
        return triton_gemm(a, wq, ws, bias, out_dtype)
    return gemm_dequant(a, wq, ws, bias, out_dtype)
