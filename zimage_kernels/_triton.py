"""Shared Triton utilities: interpreter detection, the autotune wrapper, launch-size helpers, custom-op plumbing and
the few math helpers whose GPU and interpreter implementations differ.

Why each piece exists:

- ``autotune``: ``@triton.autotune`` with more than one config crashes on a GPU-less host ("0 active drivers"), so
  under ``TRITON_INTERPRET=1`` it keeps exactly one config (the one the kernel file names for the interpreter). On a
  GPU the kernel files pass a short curated list; ``ZIMAGE_AUTOTUNE=full`` switches to the full search space
  (autotuning compiles every config on the first call of each key, which costs minutes with the full space).
- ``tanh`` / ``exp``: the fused ops reproduce eager torch's CUDA math (``tanhf``/``expf`` from CUDA's math library,
  which is libdevice), so on the GPU they call libdevice. The interpreter cannot run libdevice (extern calls raise or
  return None), so there they use tl.math formulas; that only changes the last fp32 bit, far below fp16 rounding.
- ``enable_fp_fusion=False`` on every launch of the bit-faithful elementwise kernels: with fusion on, LLVM/ptxas
  contract e.g. ``round(t·y) + x`` into one ``fma.rn.bf16``, skipping the rounding of the product that eager torch
  (separate kernels) performs. Attention keeps fusion on (no bit-exactness target, FMAs are its speed).
- ``custom_op``: registration as a ``torch.library`` custom op with an explicit fake implementation (``triton_op``'s
  automatic fake fails under the interpreter, see docs/kernels.md, "Design notes"). In eager mode the public
  functions call the launcher directly: a custom-op call costs tens of microseconds of Python dispatch per call,
  about the run time of one fused elementwise op at Z-Image shapes. Under ``torch.compile`` they go through the op
  so that Dynamo treats the kernel as opaque.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

# Read once, like triton itself: TRITON_INTERPRET must be set before triton is imported (tests/conftest.py does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # 1 / ln 2: exp(x·scale) = exp2(x·scale·log2 e)
AUTOTUNE_ENV = "ZIMAGE_AUTOTUNE"  # "full": search the whole config space on a GPU; anything else: curated list

if not INTERPRET:
    from triton.language.extra import libdevice


def full_autotune() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "").strip().lower() == "full"


def _bench_or_skip(kernel_call, quantiles):
    """Autotune timing that turns a config which fails to compile or launch into +inf instead of an exception.

    Triton's autotuner only skips out-of-resources / ptxas failures; a crash in a compiler pass (e.g. triton 3.8's
    warp-specialization pass on some loop shapes, see zimage_kernels/attention.py) would otherwise abort the first call
    of
    the op. If every config fails, the launch after autotuning raises the real error.
    """
    import triton.testing

    try:
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    except Exception as e:  # noqa: BLE001 - any failing config is skipped, with a warning naming the error
        warnings.warn(f"autotune: skipping a config that failed: {type(e).__name__}: {str(e)[:200]}", stacklevel=2)
        return [float("inf")] * len(quantiles)


def autotune(configs, key, *, interpret_config=None, prune=None, full_configs=None):
    """``triton.autotune`` that keeps a single config under the interpreter.

    configs: the curated GPU list; full_configs: the search space used when ``ZIMAGE_AUTOTUNE=full``;
    interpret_config: the one config used under ``TRITON_INTERPRET=1`` (default: the first of ``configs``);
    prune: ``early_config_prune(configs, named_args, **kwargs)``, applied on the GPU only.
    """
    if INTERPRET:
        return triton.autotune([interpret_config or configs[0]], key=key)
    if full_configs is not None and full_autotune():
        configs = full_configs
    prune_by = {"early_config_prune": prune} if prune is not None else None
    return triton.autotune(list(configs), key=key, prune_configs_by=prune_by, do_bench=_bench_or_skip)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1); plain Python (triton.next_power_of_2 goes through a JIT-function call)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_block(n_rows: int, block_c: int) -> tuple[int, int]:
    """(rows per program, num_warps) for a kernel that handles ``[rows, block_c]`` tiles of a row-wise op.

    On the GPU a program holds about 2048-4096 elements: one row at Z-Image's width (3840 -> 4096 lanes), several
    short rows otherwise (per-head norms, small test models). Warps: enough that each thread holds ~8-16 elements
    (one or two 16-byte vectors of bf16), at most 16. Under the interpreter every program costs milliseconds of
    Python, so programs take up to 16k elements (whole small tensors in one program).
    """
    budget = 16384 if INTERPRET else 2048
    rows = max(1, min(next_pow2(n_rows), budget // block_c))
    return rows, max(1, min(16, rows * block_c // 512))


def fp32_reciprocal(n: int) -> float:
    """``fl32(1/n)``: eager CUDA's ``mean`` multiplies the fp32 sum by this factor (``MeanOps``) instead of dividing."""
    import numpy as np

    return float(np.float32(1.0) / np.float32(n))


def cuda_capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def check_int32_indexable(t: torch.Tensor, name: str) -> None:
    """Kernels index *within* a row block in int32 (batch/head/row bases are int64); assert that cannot overflow."""
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0) + 1
    assert span < 2**31, f"{name}: {tuple(t.shape)} with strides {t.stride()} spans >= 2^31 elements"


def row_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a ``[R, C]`` view with unit column stride, or None if that needs a copy."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def launcher_device(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current for the launch (no-op on CPU / the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


def supported_device(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under the interpreter, whose bf16 is wrong (``tl.dot``
    gives garbage, fp32->bf16 casts truncate instead of rounding): bf16 on the interpreter runs the reference."""
    if t.device.type == "cuda":
        return True
    return INTERPRET and t.device.type == "cpu" and t.dtype != torch.bfloat16


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_custom_op() -> bool:
    """True while Dynamo traces: go through the registered op so the kernel stays opaque to the compiler."""
    return torch.compiler.is_compiling()


def _scratch_alloc(size: int, alignment: int, stream):
    # Device-side tensor descriptors (tl.make_tensor_descriptor) need a small global scratch buffer per launch; torch's
    # caching allocator serves it (on the current device and stream, so CUDA-graph capture uses the graph's pool).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.empty(size, dtype=torch.int8, device=device)


def ensure_allocator() -> None:
    """Install the scratch allocator. Set on every launch that needs it: triton keeps it in a ContextVar, and a
    thread that did not set it (a server's worker thread) would otherwise launch without one."""
    triton.set_allocator(_scratch_alloc)


# ---------------------------------------------------------------------------------------------------------------
# Math helpers (fp32 in, fp32 out)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh_libdevice(x):
    return libdevice.tanh(x)


@triton.jit
def _tanh_portable(x):
    # tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}); no overflow for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = tl.math.div_rn(1.0 - e, 1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _exp_libdevice(x):
    return libdevice.exp(x)  # expf, as eager CUDA's silu uses (tl.exp is the faster ex2.approx-based version)


@triton.jit
def _exp_portable(x):
    return tl.exp(x)


tanh = _tanh_portable if INTERPRET else _tanh_libdevice
exp = _exp_portable if INTERPRET else _exp_libdevice


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` and back: reproduces one eager op that writes a ``DTYPE`` tensor."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def rms_norm_rows(x, w, eps, inv_c, DTYPE: tl.constexpr):
    """Eager RMSNorm of fp32 rows ``x`` [R, C] (padding lanes 0) with fp32 weight ``w`` [C], in fp32 holding
    ``DTYPE`` values: fp32 mean of squares (sum times ``fl32(1/C)``), ``x * rsqrt(var + eps)`` rounded to the weight
    dtype, times the weight, rounded. Shared by ``rms_norm_modulate`` and ``gated_residual`` so the two norms agree."""
    var = tl.sum(x * x, axis=1) * inv_c
    y = round_to(x * tl.math.rsqrt(var + eps)[:, None], DTYPE)
    return round_to(y * w[None, :], DTYPE)
