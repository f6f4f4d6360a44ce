"""Triton kernels of the step caches: the decision metric's two L1 sums in one pass, and the residual apply.

Provenance: written for this project; the algorithm is the relative-L1 test of ParaAttention/cache-dit/TeaCache
and the fused residual add of their cache hits. References: ``reference.l1_sums`` / ``reference.apply_residual``.

- ``_l1_sums_kernel``: a fixed number of programs (≤ ``MAX_PROGRAMS``) walk the flattened tensors grid-stride, each
  accumulating ``|(a − a_sub) − b|`` and ``|b|`` in fp32 registers, and write one partial pair; the host-side sum of
  the partials is a fixed-order torch reduction, so the metric is bit-reproducible run to run (no atomics: a flip
  of the last ulp could flip a decision taken at the threshold).
- ``_apply_residual_kernel``: ``out = hidden + residual (+ coef·delta)`` in fp32, rounded once to the output dtype.

Inputs may be bf16, fp16 or fp32; offsets are int64 so tensors beyond 2^31 elements are fine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
MAX_PROGRAMS = 512  # enough to fill an H100 (132 SMs × a few) for ~35M-element tensors; fixed => reproducible


@triton.jit
def _l1_sums_kernel(
    Part_ptr,  # fp32 [n_programs, 2] output: per-program (Σ|a−a_sub−b|, Σ|b|)
    A_ptr,
    B_ptr,
    S_ptr,  # a_sub (ignored unless HAS_SUB)
    n_elements,
    n_iters,
    BLOCK: tl.constexpr,
    HAS_SUB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    stride = n_programs * BLOCK
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(n_iters):
        mask = offs < n_elements
        a = tl.load(A_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # fp32 accumulation from bf16/fp16
        b = tl.load(B_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SUB:
            a = a - tl.load(S_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_d += tl.abs(a - b)
        acc_b += tl.abs(b)
        offs += stride
    tl.store(Part_ptr + pid * 2, tl.sum(acc_d, axis=0))
    tl.store(Part_ptr + pid * 2 + 1, tl.sum(acc_b, axis=0))


@triton.jit
def _apply_residual_kernel(
    Out_ptr,
    H_ptr,
    R_ptr,
    D_ptr,  # delta (ignored unless HAS_DELTA)
    n_elements,
    coef,  # fp32 scalar
    BLOCK: tl.constexpr,
    HAS_DELTA: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_elements
    out = tl.load(H_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(R_ptr + offs, mask=mask, other=0.0).to(
        tl.float32
    )  # fp32 add, one rounding at the store
    if HAS_DELTA:
        out = out + coef * tl.load(D_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out_ptr + offs, out.to(Out_ptr.dtype.element_ty), mask=mask)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1)


def l1_sums(a: torch.Tensor, b: torch.Tensor, a_sub: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of :func:`zimage_kernels.reference.l1_sums` (fp32 ``[Σ|a−a_sub−b|, Σ|b|]``)."""
    if a.shape != b.shape or (a_sub is not None and a_sub.shape != a.shape):
        raise ValueError(f"l1_sums: shapes differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    n = a.numel()
    if n == 0:
        return torch.zeros(2, dtype=torch.float32, device=a.device)
    fa, fb = _flat(a), _flat(b)
    fs = _flat(a_sub) if a_sub is not None else fa
    n_programs = min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)
    n_iters = triton.cdiv(n, n_programs * BLOCK)
    part = torch.empty((n_programs, 2), dtype=torch.float32, device=a.device)
    _l1_sums_kernel[(n_programs,)](part, fa, fb, fs, n, n_iters, BLOCK=BLOCK, HAS_SUB=a_sub is not None)
    return part.sum(0)  # fixed-order reduction of ≤ MAX_PROGRAMS partials


def apply_residual(
    hidden: torch.Tensor, residual: torch.Tensor, delta: torch.Tensor | None = None, coef: float = 0.0
) -> torch.Tensor:
    """Triton version of :func:`zimage_kernels.reference.apply_residual`."""
    if hidden.shape != residual.shape or (delta is not None and delta.shape != hidden.shape):
        raise ValueError(f"apply_residual: shapes differ: {tuple(hidden.shape)} vs {tuple(residual.shape)}")
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    n = hidden.numel()
    if n == 0:
        return out
    has_delta = delta is not None and coef != 0.0
    fr = _flat(residual)
    fd = _flat(delta) if has_delta else fr
    _apply_residual_kernel[(triton.cdiv(n, BLOCK),)](
        out.view(-1), _flat(hidden), fr, fd, n, float(coef), BLOCK=BLOCK, HAS_DELTA=has_delta
    )
    return out
