"""Torch references of the two step-cache kernels (the source of truth the Triton kernels are tested against).

- :func:`l1_sums` — the decision metric's two sums in one pass: ``Σ|(a − a_sub) − b|`` and ``Σ|b|``, accumulated in
  fp32 from bf16/fp16/fp32 inputs. The relative L1 change of FBCache/DBCache/TeaCache is their ratio (the element
  counts cancel, so "mean|a−b| / mean|b|" of the references equals this ratio). ``a_sub`` lets FBCache/DBCache
  measure a *residual* (block output − block input) without materialising it on steps that end up reusing.
- :func:`apply_residual` — ``hidden + residual (+ coef · delta)`` computed in fp32 and rounded once to the hidden
  dtype: plain reuse of a cached residual, or its order-1 Taylor extrapolation (``delta`` = difference of the last
  two cached residuals, ``coef`` = elapsed / spacing, a host float).
"""

from __future__ import annotations

import torch


def l1_sums(a: torch.Tensor, b: torch.Tensor, a_sub: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 tensor ``[Σ|(a − a_sub) − b|, Σ|b|]`` over all elements (shapes must match)."""
    if a.shape != b.shape or (a_sub is not None and a_sub.shape != a.shape):
        raise ValueError(f"l1_sums: shapes differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    af = a.float()  # fp32 accumulation from low-precision inputs
    if a_sub is not None:
        af = af - a_sub.float()
    bf = b.float()
    return torch.stack([(af - bf).abs().sum(), bf.abs().sum()])


def apply_residual(
    hidden: torch.Tensor, residual: torch.Tensor, delta: torch.Tensor | None = None, coef: float = 0.0
) -> torch.Tensor:
    """``hidden + residual + coef·delta`` in fp32, rounded once to ``hidden.dtype`` (a new tensor)."""
    if hidden.shape != residual.shape or (delta is not None and delta.shape != hidden.shape):
        raise ValueError(f"apply_residual: shapes differ: {tuple(hidden.shape)} vs {tuple(residual.shape)}")
    out = hidden.float() + residual.float()
    if delta is not None and coef != 0.0:
        out = out + coef * delta.float()
    return out.to(hidden.dtype)


def relative_change(sums: torch.Tensor) -> float:
    """Host float ``Σ|a−b| / Σ|b|`` from :func:`l1_sums` (the one device sync per decision).

    0/0 → 0.0 (nothing changed); x/0 with x > 0 → inf (everything changed); NaN stays NaN (never a cache hit).
    """
    num, den = (float(v) for v in sums.tolist())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
