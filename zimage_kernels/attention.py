"""Fused non-causal attention on ``[B, N, H, D]`` tensors with per-sample key lengths (FlashAttention-2 algorithm).

Reference: ``zimage_kernels.reference.attention`` (``F.scaled_dot_product_attention`` with a boolean key-padding mask
when
the batch is ragged). Algorithm: Dao, "FlashAttention-2" (arXiv 2307.08691), laid out after Triton's tutorial
``python/tutorials/06-fused-attention.py`` (triton-lang/triton@003da47): Q tile resident, K/V streamed, online
softmax with fp32 ``m_i``/``l_i``/accumulator, the softmax scale folded into ``exp2`` (``qk_scale = scale·log2 e``).

What is specific to Z-Image (docs/kernels.md, "Design notes"):

- Layout ``[B, N, H, D]`` with arbitrary batch/token/head strides and unit stride along D: q/k/v arrive as
  ``.unflatten`` views of a Linear output and are read in place (no ``.transpose().contiguous()`` copies).
- Key padding by per-sample valid lengths ``kv_lens`` (never a dense mask, which drops SDPA off its flash kernel):
  full K/V blocks run unmasked, only the one tail block (``n_full <= j < kv_len``) is masked. Keys past ``kv_len``
  are never loaded. Query rows past ``kv_len`` (batch padding) are computed like any other row, as in the reference.
  A sample with ``kv_len == 0`` gets zeros (eager SDPA's "safe softmax" result for fully masked rows).
- Two kernels: ``_attn_fwd_kernel`` (pointer loads; every CUDA GPU and the interpreter; head dims up to 256, padded
  to a power of two; fp32 uses IEEE-precision dots, not TF32), and ``_attn_fwd_tma_kernel`` for Hopper/Blackwell
  (sm >= 90; fp16/bf16, D in {32, 64, 128}): per-(batch, head) device-side tensor descriptors
  (``tl.make_tensor_descriptor``, TMA) whose shape is ``[kv_len, D]``, so TMA zero-fills the tail block, and
  optionally warp specialization (``tl.range(..., warp_specialize=True)``, triton >= 3.5) as an autotuned choice.
  ``ZIMAGE_ATTENTION_PATH={auto,tma,plain}`` forces one for ablations.
- Registered as ``torch.ops.zimage.attention`` (custom op with a fake implementation) for torch.compile/CUDA graphs.

Status: both kernels are tested against the reference under the Triton interpreter (fp32/fp16, ragged kv_lens,
lengths that are not multiples of the tile, head dims 32/64/128 and one padded head dim) and compile for sm_90a
ahead of time (``scripts/aot_compile.py``). Neither has run on a GPU yet: the bf16/real-shape/compile/graph tests in
``tests/test_kernels_gpu.py`` and the throughput numbers are still to be measured.

Unsupported (the torch reference runs instead): mixed dtypes, head dim > 256 or odd, a non-positive scale, q/k/v
whose batch or head counts differ, kv_lens not an int32/int64 ``[B]`` tensor on q's device.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import (
    FLOAT_DTYPES,
    INTERPRET,
    LOG2E,
    autotune,
    cuda_capability,
    ensure_allocator,
    launcher_device,
    next_pow2,
    supported_device,
    use_custom_op,
)

PATH_ENV = "ZIMAGE_ATTENTION_PATH"
IMPL_ENV = "ZIMAGE_ATTENTION_IMPL"  # "default" | "fa3" (opt-in Gluon kernel, zimage_kernels/attention_fa3.py)
TMA_HEAD_DIMS = (32, 64, 128)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, INPUT_PRECISION: tl.constexpr):
    """One K/V block of the online softmax: fold scores ``qk`` [M, N] (fp32, unscaled, -inf where masked) and the
    block's values ``v`` [N, D] into the running max ``m_i`` (base 2, scaled), sum ``l_i`` and accumulator."""
    # Row max on the unscaled scores times the (positive) scale: one multiply per row instead of per element.
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)  # rescales what was accumulated under the old max (0 on the first block)
    acc = acc * alpha[:, None]
    # P is rounded to the input dtype for the tensor-core PV product, as every flash kernel (and SDPA's) does.
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    # Updating l_i after the dot keeps fewer values live across it (register pressure; as the Triton tutorial).
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_ij


@triton.jit
def _attn_block(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, s_kn, s_vn, start_n, kv_len, qk_scale, offs_n, d_ok,
    MASK_KV: tl.constexpr, PAD_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Pointer-kernel block at keys ``start_n + offs_n``; MASK_KV only for the tail block."""
    if MASK_KV:
        kv_ok = (start_n + offs_n) < kv_len
        if PAD_D:
            ld_mask = kv_ok[:, None] & d_ok[None, :]
        else:
            ld_mask = kv_ok[:, None]
        k = tl.load(k_ptrs + start_n * s_kn, mask=ld_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * s_vn, mask=ld_mask, other=0.0)
    elif PAD_D:
        k = tl.load(k_ptrs + start_n * s_kn, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs + start_n * s_vn, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * s_kn)
        v = tl.load(v_ptrs + start_n * s_vn)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MASK_KV:
        qk = tl.where(kv_ok[None, :], qk, float("-inf"))
    return _online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, INPUT_PRECISION)


@triton.jit
def _store_lse(LSE, b, h, H, N_Q, offs_m, m_i, l_i):
    """Row log-sum-exp of the scaled scores, natural log, fp32 ``[B, H, N_Q]``; -inf for a row with no valid key.
    ``m_i`` is the running max in base 2 (scores times scale·log2 e), ``l_i`` the sum of exp2(score - m_i)."""
    lse = (m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))) * 0.6931471805599453  # ln 2: base 2 -> natural
    lse = tl.where(l_i > 0.0, lse, float("-inf"))
    tl.store(LSE + (b * H + h) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _load_kv_len(KV_LENS, b, N_KV, HAS_KV_LENS: tl.constexpr):
    if HAS_KV_LENS:
        kv_len = tl.load(KV_LENS + b).to(tl.int32)
        return tl.minimum(tl.maximum(kv_len, 0), N_KV)  # same as the reference's `arange(N) < kv_len` mask
    return N_KV


def _plain_configs(full: bool):
    if full:
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
            for bm in (64, 128)
            for bn in (32, 64, 128)
            for s in (2, 3, 4)
            for w in (4, 8)
        ]
    # Compiled for sm_90a (scripts/aot_compile.py): 128-row tiles need 8 warps at D = 128 (4 warps spill).
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=3, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=2, num_warps=4),
    ]


# Under the interpreter: tiles small enough that test lengths (~100-300) span several blocks plus a partial one.
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=1, num_warps=4)


def _prune_plain(configs, named_args, **kwargs):
    n_q = named_args["N_Q_BUCKET"]
    fp32 = named_args["Q"].dtype == torch.float32
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > max(n_q, 64):  # a tile mostly past the end of the sequence
            continue
        if fp32 and bm * bn > 64 * 64:  # fp32 tiles this size exceed shared memory at D = 128
            continue
        if bm == 128 and c.num_warps == 4 and named_args["Q"].shape[-1] > 64:  # spills (aot_compile.py, sm_90a)
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


@autotune(
    _plain_configs(False),
    key=["N_Q_BUCKET", "N_KV_BUCKET", "HEAD_DIM", "HAS_KV_LENS"],
    interpret_config=_INTERPRET_CONFIG,
    prune=_prune_plain,
    full_configs=_plain_configs(True),
)
@triton.jit
def _attn_fwd_kernel(
    Out, s_ob, s_on, s_oh,  # [B, N_Q, H, D] output, unit stride along D
    Q, s_qb, s_qn, s_qh,  # [B, N_Q, H, D]
    K, s_kb, s_kn, s_kh,  # [B, N_KV, H, D]
    V, s_vb, s_vn, s_vh,  # [B, N_KV, H, D]
    KV_LENS,  # [B] int32/int64 valid key lengths (ignored unless HAS_KV_LENS)
    LSE,  # [B, H, N_Q] fp32 log-sum-exp of each query row (written only when RETURN_LSE)
    N_Q, N_KV, H, qk_scale,  # qk_scale = softmax scale * log2(e)
    N_Q_BUCKET, N_KV_BUCKET,  # autotune keys only (powers of two): a new caption length must not re-tune
    HEAD_DIM: tl.constexpr,  #
    HEAD_DIM_PAD: tl.constexpr,  # next power of two >= max(HEAD_DIM, 16) (tl.arange / tl.dot need it)
    HAS_KV_LENS: tl.constexpr,  #
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32), None (default) for fp16/bf16
    RETURN_LSE: tl.constexpr,  #
    BLOCK_M: tl.constexpr,  #
    BLOCK_N: tl.constexpr,  #
):  # fmt: skip
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = (off_bh // H).to(tl.int64)  # int64 bases: B·N·H·D exceeds 2^31 elements at real shapes
    h = (off_bh % H).to(tl.int64)
    kv_len = _load_kv_len(KV_LENS, b, N_KV, HAS_KV_LENS)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    if PAD_D:
        q_mask = m_ok[:, None] & d_ok[None, :]
    else:
        q_mask = m_ok[:, None]
    # Offsets within one (batch, head) slice stay int32 (the launcher asserts the slice spans < 2^31 elements).
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :], mask=q_mask, other=0.0)
    k_ptrs = K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :]
    v_ptrs = V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    n_full = (kv_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full blocks: no key mask
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attn_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, s_kn, s_vn, start_n, kv_len, qk_scale, offs_n, d_ok,
            False, PAD_D, INPUT_PRECISION,
        )  # fmt: skip
    if n_full < kv_len:  # the one partial block: keys >= kv_len masked to -inf
        acc, l_i, m_i = _attn_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, s_kn, s_vn, n_full, kv_len, qk_scale, offs_n, d_ok,
            True, PAD_D, INPUT_PRECISION,
        )  # fmt: skip

    if RETURN_LSE:
        _store_lse(LSE, b, h, H, N_Q, offs_m, m_i, l_i)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # kv_len == 0: acc is 0, output 0
    out = acc / l_i[:, None]
    tl.store(
        Out + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask
    )


@triton.jit
def _attn_tma_block(acc, l_i, m_i, q, desc_k, desc_v, start_n, kv_len, qk_scale, offs_n, MASK_KV: tl.constexpr):
    """TMA-kernel block at keys ``start_n + offs_n``; K/V rows >= kv_len load as zeros (descriptor shape)."""
    k = desc_k.load([start_n, 0])
    qk = tl.dot(q, k.T)
    if MASK_KV:  # zero-filled keys must not count as logit 0
        qk = tl.where((start_n + offs_n)[None, :] < kv_len, qk, float("-inf"))
    v = desc_v.load([start_n, 0])
    return _online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, None)


def _tma_configs(full: bool):
    if full:
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_stages=s, num_warps=w)
            for bm in (64, 128)
            for bn in (64, 128)
            for s in (2, 3, 4)
            for w in (4, 8)
            for ws in (False, True)
        ]
    # Curated for H100/H200, hd128 bf16 non-causal (docs/kernels.md, "Design notes": BLOCK_M 128, BLOCK_N 64-128, 2-4
    # stages). Checked by compiling for sm_90a with triton 3.8 (scripts/aot_compile.py): none spills; shared memory
    # 131-229 KB (limit 227 KiB = 232448 B). Warp specialization only takes effect with 4 warps (8 warps compile to the
    # plain pipeline), and 128-row tiles without it need 8 warps (4 warps spill). WS and non-WS are both kept because WS
    # support on Hopper varies across triton releases (docs/kernels.md, "Design notes") and neither was timed yet.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "WARP_SPECIALIZE": False}, num_stages=2, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "WARP_SPECIALIZE": False}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "WARP_SPECIALIZE": False}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "WARP_SPECIALIZE": True}, num_stages=2, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "WARP_SPECIALIZE": True}, num_stages=3, num_warps=4),
    ]


_INTERPRET_TMA_CONFIG = triton.Config(
    {"BLOCK_M": 64, "BLOCK_N": 32, "WARP_SPECIALIZE": False}, num_stages=1, num_warps=4
)


def warp_specialize_available() -> bool:
    """``tl.range(warp_specialize=...)`` exists and Hopper autoWS is upstream (triton >= 3.5, PRs #8092/#8143)."""
    if "warp_specialize" not in inspect.signature(tl.range.__init__).parameters:
        return False
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 5)


def _prune_tma(configs, named_args, **kwargs):
    n_q = named_args["N_Q_BUCKET"]
    ws_ok = warp_specialize_available()
    keep = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if c.kwargs["WARP_SPECIALIZE"] and (not ws_ok or c.num_warps != 4):  # WS applies with 4 warps (see above)
            continue
        if bm > max(n_q, 64) or (not c.kwargs["WARP_SPECIALIZE"] and bm == 128 and c.num_warps == 4):  # spills
            continue
        keep.append(c)
    return keep or [c for c in configs if not c.kwargs["WARP_SPECIALIZE"]][:1]


@autotune(
    _tma_configs(False),
    key=["N_Q_BUCKET", "N_KV_BUCKET", "HEAD_DIM", "HAS_KV_LENS"],
    interpret_config=_INTERPRET_TMA_CONFIG,
    prune=_prune_tma,
    full_configs=_tma_configs(True),
)
@triton.heuristics({"EVEN_KV": lambda a: not a["HAS_KV_LENS"] and a["N_KV"] % a["BLOCK_N"] == 0})
@triton.jit
def _attn_fwd_tma_kernel(
    Out, s_ob, s_on, s_oh,  # [B, N_Q, H, D] output; all strides multiples of 16 bytes (TMA)
    Q, s_qb, s_qn, s_qh,  #
    K, s_kb, s_kn, s_kh,  #
    V, s_vb, s_vn, s_vh,  #
    KV_LENS,  #
    LSE,  #
    N_Q, N_KV, H, qk_scale,  #
    N_Q_BUCKET, N_KV_BUCKET,  #
    HEAD_DIM: tl.constexpr,  #
    HAS_KV_LENS: tl.constexpr,  #
    RETURN_LSE: tl.constexpr,  #
    BLOCK_M: tl.constexpr,  #
    BLOCK_N: tl.constexpr,  #
    WARP_SPECIALIZE: tl.constexpr,  #
    EVEN_KV: tl.constexpr,  # no key padding and N_KV a multiple of BLOCK_N: no mask at all (heuristic)
):  # fmt: skip
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = (off_bh // H).to(tl.int64)
    h = (off_bh % H).to(tl.int64)
    kv_len = _load_kv_len(KV_LENS, b, N_KV, HAS_KV_LENS)

    # One 2-D descriptor per (batch, head) slice: [tokens, D] with the token stride of the strided view. Out-of-range
    # rows load as zeros and are dropped on store, so ragged lengths need no load/store masks; the K/V descriptors
    # end at kv_len, so nothing past a sample's valid keys is read. Shapes >= 1 keep the descriptors well formed.
    desc_q = tl.make_tensor_descriptor(
        Q + b * s_qb + h * s_qh, shape=[N_Q, HEAD_DIM], strides=[s_qn, 1], block_shape=[BLOCK_M, HEAD_DIM]
    )
    desc_k = tl.make_tensor_descriptor(
        K + b * s_kb + h * s_kh, shape=[tl.maximum(kv_len, 1), HEAD_DIM], strides=[s_kn, 1],
        block_shape=[BLOCK_N, HEAD_DIM],
    )  # fmt: skip
    desc_v = tl.make_tensor_descriptor(
        V + b * s_vb + h * s_vh, shape=[tl.maximum(kv_len, 1), HEAD_DIM], strides=[s_vn, 1],
        block_shape=[BLOCK_N, HEAD_DIM],
    )  # fmt: skip
    desc_o = tl.make_tensor_descriptor(
        Out + b * s_ob + h * s_oh, shape=[N_Q, HEAD_DIM], strides=[s_on, 1], block_shape=[BLOCK_M, HEAD_DIM]
    )

    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = desc_q.load([start_m * BLOCK_M, 0])

    if WARP_SPECIALIZE:
        # One loop over every block, masked unless the keys are known to tile exactly (EVEN_KV): triton 3.8's
        # warp-specialization pass rejects a second loop (crash) and drops WS for a data-dependent `if` in the loop.
        for start_n in tl.range(0, kv_len, BLOCK_N, warp_specialize=True):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _attn_tma_block(
                acc, l_i, m_i, q, desc_k, desc_v, start_n, kv_len, qk_scale, offs_n, not EVEN_KV
            )
    else:
        # Full blocks unmasked, then the one partial block masked (docs/kernels.md, "Design notes").
        n_full = (kv_len // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _attn_tma_block(acc, l_i, m_i, q, desc_k, desc_v, start_n, kv_len, qk_scale, offs_n, False)
        if n_full < kv_len:
            acc, l_i, m_i = _attn_tma_block(acc, l_i, m_i, q, desc_k, desc_v, n_full, kv_len, qk_scale, offs_n, True)

    if RETURN_LSE:
        _store_lse(LSE, b, h, H, N_Q, start_m * BLOCK_M + tl.arange(0, BLOCK_M), m_i, l_i)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    desc_o.store([start_m * BLOCK_M, 0], (acc / l_i[:, None]).to(Out.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------


def _path_setting() -> str:
    path = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if path not in ("auto", "tma", "plain"):
        raise ValueError(f"${PATH_ENV} must be auto, tma or plain; got {path!r}")
    return path


def _impl_setting(impl: str | None) -> str:
    impl = (impl if impl is not None else os.environ.get(IMPL_ENV, "default")).strip().lower() or "default"
    if impl not in ("default", "fa3"):
        raise ValueError(f"attention impl (or ${IMPL_ENV}) must be default or fa3; got {impl!r}")
    return impl


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and 16-byte multiples for every stride but the last (which is 1)."""
    for t in tensors:
        esize = t.element_size()
        if t.data_ptr() % 16 or any((s * esize) % 16 for s in t.stride()[:-1]):
            return False
    return True


def tma_path_available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the TMA kernel can run these inputs on this device (output alignment is ours, always fine)."""
    return (
        q.device.type == "cuda"
        and cuda_capability(q.device)[0] >= 9
        and hasattr(tl, "make_tensor_descriptor")
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in TMA_HEAD_DIMS
        and _tma_compatible(q, k, v)
    )


def supports(q, k, v, kv_lens=None, scale=None) -> bool:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not supported_device(q):
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES or not (q.device == k.device == v.device):
        return False
    B, _, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D or k.shape[1] == 0:
        return False
    if D % 2 or D > MAX_HEAD_DIM or min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1:
        return False
    if scale is not None and not scale > 0:
        return False
    if kv_lens is not None:
        if kv_lens.shape != (B,) or kv_lens.dtype not in (torch.int32, torch.int64) or kv_lens.device != q.device:
            return False
    return True


_TMA_FAILED: set = set()  # (dtype, head_dim) whose TMA kernel failed to compile/launch here: auto uses "plain"


def _launch(
    q, k, v, kv_lens=None, scale=None, *, path: str | None = None, config: triton.Config | None = None, lse=False
):
    """Run one of the two kernels. path: 'tma' / 'plain' / None (auto: TMA where available, see PATH_ENV);
    config: a fixed ``triton.Config`` instead of autotuning (tests use it to cover several tile shapes);
    lse: also return the fp32 ``[B, H, N_Q]`` log-sum-exp of each query row (``(out, lse)``)."""
    assert supports(q, k, v, kv_lens, scale), "attention: unsupported inputs reached the Triton launcher"
    B, N_Q, H, D = q.shape
    N_KV = k.shape[1]
    path = path or _path_setting()
    if path == "auto":
        if tma_path_available(q, k, v) and (q.dtype, D) not in _TMA_FAILED:
            try:
                return _launch(q, k, v, kv_lens, scale, path="tma", config=config, lse=lse)
            except Exception as e:  # noqa: BLE001 - e.g. a compiler pass failure on an untested triton/GPU stack
                _TMA_FAILED.add((q.dtype, D))
                warnings.warn(
                    f"attention: the TMA kernel failed ({type(e).__name__}: {str(e)[:200]}); using the pointer "
                    f"kernel for {q.dtype} D={D} from now on (set {PATH_ENV}=tma to see the error)",
                    stacklevel=2,
                )
        path = "plain"
    out = torch.empty((B, N_Q, H, D), dtype=q.dtype, device=q.device)
    lse_out = torch.empty((B, H, N_Q), dtype=torch.float32, device=q.device) if lse else None
    if out.numel() == 0:
        return (out, lse_out) if lse else out
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        # one (batch, head) slice spans (N-1)·|s_n| + (D-1)·|s_d| + 1 elements: from shape and strides, no views
        n, _, _, d = t.shape
        _, s_n, _, s_d = t.stride()
        assert (n - 1) * abs(s_n) + (d - 1) * abs(s_d) < 2**31 - 1, f"attention: {name} slice spans >= 2^31 elements"
    if kv_lens is not None:
        kv_lens = kv_lens.contiguous()
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(D)) * LOG2E

    if path == "tma":
        if not INTERPRET:  # the interpreter runs the TMA kernel's logic for any dtype (tests use fp32 too)
            assert D in TMA_HEAD_DIMS and q.dtype != torch.float32, "the TMA kernel takes fp16/bf16 with D 32-128"
        ensure_allocator()
        kernel, extra = _attn_fwd_tma_kernel, {}
    else:
        kernel = _attn_fwd_kernel
        extra = {
            "HEAD_DIM_PAD": max(16, next_pow2(D)),
            "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 else None,
        }
    args = (
        out, out.stride(0), out.stride(1), out.stride(2),
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        kv_lens if kv_lens is not None else q,
        lse_out if lse else out,
        N_Q, N_KV, H, qk_scale,
        next_pow2(N_Q), next_pow2(N_KV),
    )  # fmt: skip
    # FMAs are attention's speed (no bit-exactness target): fusion on explicitly, triton 3.10 turns the default off
    meta = dict(HEAD_DIM=D, HAS_KV_LENS=kv_lens is not None, RETURN_LSE=lse, enable_fp_fusion=True, **extra)

    def grid(META):
        return (triton.cdiv(N_Q, META["BLOCK_M"]), B * H)

    with launcher_device(q):
        if config is None:
            kernel[grid](*args, **meta)
        else:
            kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return (out, lse_out) if lse else out


@torch.library.custom_op("zimage::attention_lse", mutates_args=())
def _attention_lse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, kv_lens, scale, lse=True)


@_attention_lse_op.register_fake
def _(q, k, v, kv_lens, scale):
    B, N_Q, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N_Q), dtype=torch.float32)


@torch.library.custom_op("zimage::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    return _launch(q, k, v, kv_lens, scale)


@_attention_op.register_fake
def _(q, k, v, kv_lens, scale):
    return q.new_empty(q.shape)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    impl: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Non-causal softmax attention; q ``[B, N_q, H, D]``, k/v ``[B, N_kv, H, D]``; keys ``j >= kv_lens[b]``
    ignored; ``scale`` defaults to ``1/sqrt(D)``. Returns a new contiguous ``[B, N_q, H, D]`` tensor in q's dtype.
    Same result as ``zimage_kernels.reference.attention`` (fp32 accumulation).

    ``return_lse``: return ``(out, lse)`` with ``lse`` the fp32 ``[B, H, N_q]`` natural log-sum-exp of each query
    row's scaled scores over its valid keys (``-inf`` when it has none), what ring attention needs to merge partial
    results (``zimage_kernels.reference.attention_lse``).

    ``impl``: ``"default"`` (the kernels above) or ``"fa3"`` (the FA3-structured Gluon kernel of
    ``zimage_kernels/attention_fa3.py``, eager calls on sm_90 only; inputs it does not take, and calls under
    torch.compile,
    use the default path); ``None`` reads ``$ZIMAGE_ATTENTION_IMPL`` (default ``default``)."""
    if _impl_setting(impl) == "fa3" and not use_custom_op() and q.device.type == "cuda":
        from . import attention_fa3

        if attention_fa3.supports(q, k, v, kv_lens, scale):
            return attention_fa3._launch(q, k, v, kv_lens, scale, lse=return_lse)
    if return_lse:
        if not supports(q, k, v, kv_lens, scale):
            return reference.attention_lse(q, k, v, kv_lens=kv_lens, scale=scale)
        if use_custom_op():
            return _attention_lse_op(q, k, v, kv_lens, scale)
        return _launch(q, k, v, kv_lens, scale, lse=True)
    if not supports(q, k, v, kv_lens, scale):
        return reference.attention(q, k, v, kv_lens=kv_lens, scale=scale)
    if use_custom_op():
        return _attention_op(q, k, v, kv_lens, scale)
    return _launch(q, k, v, kv_lens, scale)
