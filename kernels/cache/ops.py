"""The op switch for the cache kernels, following ``kernels.backend``: Triton on CUDA, torch elsewhere.

``cache_ops(backend, device)`` takes the same backend names as the model (``'auto' | 'torch' | 'triton'`` or None
for ``$ZIMAGE_KERNELS``); the step caches pass the model's resolved ``Ops.name`` so both always agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backend import resolve_backend
from . import reference


@dataclass(frozen=True)
class CacheOps:
    name: str
    l1_sums: Callable  # (a, b, a_sub=None) -> fp32 [2]
    apply_residual: Callable  # (hidden, residual, delta=None, coef=0.0) -> hidden.dtype


TORCH_CACHE_OPS = CacheOps("torch", reference.l1_sums, reference.apply_residual)


def cache_ops(backend: str | None, device: torch.device | str) -> CacheOps:
    if resolve_backend(backend, device) == "torch":
        return TORCH_CACHE_OPS
    from . import triton_kernels as tk  # lazy: importing triton costs time

    return CacheOps("triton", tk.l1_sums, tk.apply_residual)
