"""Error metrics between a candidate and a reference, computed in float64 on flattened tensors.

- ``max_abs``  = max |a − b|
- ``rel_l2``   = ‖a − b‖₂ / ‖b‖₂  (b is the reference)
- ``cosine``   = ⟨a, b⟩ / (‖a‖₂ ‖b‖₂)
- ``psnr``     = 10·log10(range² / mean((a − b)²)) in dB, on float images (before any 8-bit quantisation);
  ``inf`` when the images are identical.
"""

from __future__ import annotations

import math

import torch


def _flat(x) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        return torch.cat([_flat(t) for t in x])
    return torch.as_tensor(x).detach().reshape(-1).to("cpu", torch.float64)


def max_abs(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float((a - b).abs().max()) if a.numel() else 0.0


def rel_l2(a, b) -> float:
    a, b = _flat(a), _flat(b)
    num, den = float((a - b).norm()), float(b.norm())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def cosine(a, b) -> float:
    a, b = _flat(a), _flat(b)
    den = float(a.norm() * b.norm())
    if den == 0:
        return 1.0 if float((a - b).norm()) == 0 else 0.0
    return float(a @ b) / den


def psnr(a, b, data_range: float = 1.0, cap: float = math.inf) -> float:
    """PSNR in dB, computed in float64 (never on wrapped uint8); identical inputs give ``cap`` (default inf)."""
    a, b = _flat(a), _flat(b)
    mse = float(((a - b) ** 2).mean())
    if mse == 0:
        return cap
    return min(cap, 10.0 * math.log10(data_range**2 / mse))


def finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def compare(a, b) -> dict:
    """{"max_abs", "rel_l2", "cosine", "finite"} of candidate a against reference b."""
    return {"max_abs": max_abs(a, b), "rel_l2": rel_l2(a, b), "cosine": cosine(a, b), "finite": finite(a)}
