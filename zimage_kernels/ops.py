"""``Ops``: one implementation of every switchable op. Its own module so that the Triton table
(``triton_ops.py``) and the switch (``backend.py``, which imports that table lazily) both build on it without
importing each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import reference


@dataclass(frozen=True)
class Ops:
    """One implementation of every switchable op (signatures as in ``zimage_kernels.reference``)."""

    name: str
    attention: Callable
    qk_norm_rope: Callable
    rms_norm_modulate: Callable
    gated_residual: Callable
    swiglu: Callable
    layer_norm_modulate: Callable
    # FP8 W8A8 (``zimage_kernels.fp8``): quantizing producers -> ``Fp8Act``, and the e4m3 GEMM
    rms_norm_modulate_fp8: Callable
    swiglu_fp8: Callable
    quantize_rows: Callable
    fp8_linear: Callable

    # The step caches' two ops (no custom-op registration: they run outside any compiled region, between layers).
    @property
    def l1_sums(self) -> Callable:
        """``(a, b, a_sub=None) -> fp32 [Σ|a − a_sub − b|, Σ|b|]``: a step cache's decision metric in one pass."""
        return _step_cache_module(self.name).l1_sums

    @property
    def apply_residual(self) -> Callable:
        """``(hidden, residual, delta=None, coef=0.0) -> hidden.dtype``: a step cache's reuse of a residual."""
        return _step_cache_module(self.name).apply_residual


def _step_cache_module(name: str):
    if name == "torch":
        return reference
    from . import step_cache  # lazy: importing triton costs time

    return step_cache
