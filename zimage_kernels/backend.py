"""The op switch: which implementation (pure torch or Triton) the model's fused ops run on.

Resolution order: an explicit ``backend=`` argument, else the ``ZIMAGE_KERNELS`` environment variable, else
``auto``. ``auto`` picks Triton on CUDA tensors (when Triton is importable) and torch everywhere else. Triton on
CPU tensors only works under the Triton interpreter (``TRITON_INTERPRET=1``), which the ``interpret`` test tier uses.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import fp8, reference
from .ops import Ops

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "ZIMAGE_KERNELS"


TORCH_OPS = Ops(
    name="torch",
    attention=reference.attention,
    qk_norm_rope=reference.qk_norm_rope,
    rms_norm_modulate=reference.rms_norm_modulate,
    gated_residual=reference.gated_residual,
    swiglu=reference.swiglu,
    layer_norm_modulate=reference.layer_norm_modulate,
    rms_norm_modulate_fp8=fp8.rms_norm_modulate_fp8,
    swiglu_fp8=fp8.swiglu_fp8,
    quantize_rows=fp8.quantize_rows,
    fp8_linear=fp8.fp8_linear,
)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def validate_backend(backend: str | None) -> str:
    backend = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {backend!r}")
    return backend


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The concrete backend ('torch' or 'triton') for tensors on ``device``."""
    backend = validate_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"kernel backend 'triton' needs CUDA tensors (got device {device}); on CPU set TRITON_INTERPRET=1 "
                "(slow, for tests) or use backend 'torch'"
            )
    return backend


def get_ops(backend: str | None = None, device: torch.device | str = "cpu") -> Ops:
    """The :class:`Ops` for ``backend`` (see :func:`resolve_backend`) on ``device``."""
    name = resolve_backend(backend, device)
    if name == "torch":
        return TORCH_OPS
    from .triton_ops import TRITON_OPS  # imported lazily: importing triton costs time and needs the package

    return TRITON_OPS
