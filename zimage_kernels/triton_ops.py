"""The Triton implementation of the op switch: every op of ``zimage_kernels.Ops`` backed by its Triton kernel.

Each public function checks whether its kernel supports the given tensors (device, dtypes, shapes; see each file's
docstring) and otherwise runs the torch reference, so the model never fails on an unsupported case:

- attention: falls back for mixed dtypes, odd head dims or head dims > 256, non-positive scales, kv_lens that are
  not an int32/int64 ``[B]`` tensor on q's device;
- qk_norm_rope: mixed dtypes (q/k vs weights), odd head dims, freqs_cis not complex64 ``[B or 1, N, D/2]``;
- rms_norm_modulate / gated_residual / layer_norm_modulate: inputs that are not ``[B, N, C]`` with unit stride along
  C, or whose weight / scale / gate dtype differs from the activation dtype (the reference then promotes);
- l1_sums / apply_residual (step caches, ``zimage_kernels/step_cache.py``): always the kernel (bf16, fp16, fp32);
- rms_norm_modulate_fp8 / swiglu_fp8 / quantize_rows (``fp8_triton.py``): as their unquantized ops;
- fp8_linear: ``torch._scaled_mm`` where it runs (sm_90+, K and N multiples of 16, bf16 out), else the Triton GEMM;
- swiglu: different shapes or dtypes of ``a`` and ``b``, or views that cannot be seen as ``[rows, F]`` rows.
"""

from __future__ import annotations

from . import fp8_triton
from .attention import attention
from .gated_residual import gated_residual
from .layer_norm_modulate import layer_norm_modulate
from .ops import Ops
from .qk_norm_rope import qk_norm_rope
from .rms_norm_modulate import rms_norm_modulate
from .swiglu import swiglu

TRITON_OPS = Ops(
    name="triton",
    attention=attention,
    qk_norm_rope=qk_norm_rope,
    rms_norm_modulate=rms_norm_modulate,
    gated_residual=gated_residual,
    swiglu=swiglu,
    layer_norm_modulate=layer_norm_modulate,
    rms_norm_modulate_fp8=fp8_triton.rms_norm_modulate_fp8,
    swiglu_fp8=fp8_triton.swiglu_fp8,
    quantize_rows=fp8_triton.quantize_rows,
    fp8_linear=fp8_triton.fp8_linear,
)
