"""Fused per-head RMSNorm of q and k with Z-Image's interleaved-pair RoPE, both tensors in one launch.

Reference: ``zimage_kernels.reference.qk_norm_rope`` (diffusers' ``norm_q``/``norm_k`` = ``RMSNorm(head_dim)``, then
``apply_rotary_emb`` as complex multiplication on adjacent pairs ``(x[2i], x[2i+1])`` in fp32/complex64). Z-Image's
3-axis RoPE (axes_dims 32/48/48) is already folded into ``freqs_cis`` (one complex factor per pair), so the kernel
does not care about the axes. vllm-omni PR #7597 and sglang PR #21440 ship the same fusion (one launch for q and k);
this kernel is written from the reference.

Layout: one program per token ``(b, n)`` (several tokens when heads are small) holds all heads of q and of k in
flat ``[T, H, D]`` tiles (16-byte vector accesses; the pairs are split in registers after a reshape, which keeps
each pair in one thread: no shuffles) and loads each token's ``cos/sin`` row once for both. Per-head norms favour
row-batched kernels over one program per (token, head) (sglang PR #20632's measurements).

Numerics, following eager torch's cast points: fp32 sum of squares times ``fl32(1/D)``, ``x * rsqrt(var + eps)``
rounded to the weight dtype, times the weight (rounded), then the rotation in fp32 on those rounded values
(``re = a·cos − b·sin``, ``im = a·sin + b·cos``) and one final rounding. Eager's complex multiply may fuse or order
the fp32 products differently, so RoPE outputs are expected within one rounding of eager, not bit-identical.

Supported (else the torch reference runs): q, k ``[B, N, H, D]`` of one shape and dtype (fp32/fp16/bf16), any
strides with unit stride along D (views of a Linear output), D even; weights ``[D]`` of that dtype; ``freqs_cis``
complex64 ``[B or 1, N, D/2]`` or None (norm only). Outputs are new contiguous ``[B, N, H, D]`` tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import (
    FLOAT_DTYPES,
    check_int32_indexable,
    fp32_reciprocal,
    launcher_device,
    next_pow2,
    round_to,
    row_block,
    supported_device,
    use_custom_op,
)


@triton.jit
def _norm_rope_heads(
    dst, s_oh,  # [T] output token base pointers; head stride
    src, s_h,  # [T] input token base pointers; head stride
    W, cos, sin,  # weight pointer [D]; cos/sin [T, D/2] fp32
    heads, dims, d_ok, mask, eps, inv_d,  # [H]; [D] offsets within a head; [D] lane valid; [T, H, D]
    BLOCK_T: tl.constexpr,  #
    BLOCK_H: tl.constexpr,  #
    BLOCK_D: tl.constexpr,  #
    DTYPE: tl.constexpr,  #
    HAS_ROPE: tl.constexpr,  #
):  # fmt: skip
    """RMSNorm every head of T tokens of q (or k), then rotate their pairs. Loads and stores are flat [T, H, D]
    tiles (contiguous along D: 16-byte vectors); the pairs are split in registers (a reshape to [.., D/2, 2] keeps
    each pair in one thread, so the split costs no shuffles)."""
    w = tl.load(W + dims, mask=d_ok, other=0.0).to(tl.float32)  # [D]
    offs = src[:, None, None] + heads[None, :, None] * s_h + dims[None, None, :]
    x = tl.load(offs, mask=mask, other=0.0).to(tl.float32)  # [T, H, D]
    var = tl.sum(x * x, axis=2) * inv_d  # [T, H] fp32 mean of squares
    r = tl.math.rsqrt(var + eps)[:, :, None]
    # RMSNorm with eager's roundings: x * rsqrt in fp32 -> weight dtype, times the weight -> weight dtype.
    y = round_to(round_to(x * r, DTYPE) * w[None, None, :], DTYPE)
    if HAS_ROPE:
        # (a + ib)(cos + i sin) in fp32 on the rounded norm output; rounded once, at the store.
        a, b = tl.split(tl.reshape(y, [BLOCK_T, BLOCK_H, BLOCK_D // 2, 2]))  # [T, H, D/2] even / odd of each pair
        c = cos[:, None, :]
        s = sin[:, None, :]
        re = a * c - b * s
        im = a * s + b * c
        y = tl.reshape(tl.join(re, im), [BLOCK_T, BLOCK_H, BLOCK_D])  # interleaved pairs again
    out = dst[:, None, None] + heads[None, :, None] * s_oh + dims[None, None, :]
    tl.store(out, y.to(DTYPE), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    QOut, s_qob, s_qon, s_qoh,  # [B, N, H, D] normalised + rotated q
    KOut, s_kob, s_kon, s_koh,  # [B, N, H, D] normalised + rotated k
    Q, s_qb, s_qn, s_qh,  # [B, N, H, D] input q, unit stride along D
    K, s_kb, s_kn, s_kh,  # [B, N, H, D] input k, unit stride along D
    QW, KW,  # [D] norm weights
    Freqs, s_fb, s_fn,  # [B, N, D/2, 2] fp32 (cos, sin) = view_as_real(freqs_cis); s_fb may be 0 (broadcast)
    T, N, H, D, eps, inv_d,  # T = B·N tokens
    BLOCK_T: tl.constexpr,  # tokens per program (1 at Z-Image's 30 x 128 heads)
    BLOCK_H: tl.constexpr,  # next_pow2(H)
    BLOCK_D: tl.constexpr,  # next_pow2(D)
    HAS_ROPE: tl.constexpr,  #
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64 token bases
    b = tok // N
    n = tok % N
    dtype = QOut.dtype.element_ty

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D
    tok_ok = tok < T
    mask = tok_ok[:, None, None] & (heads < H)[None, :, None] & d_ok[None, None, :]

    if HAS_ROPE:
        # the (cos, sin) row of each token, flat [T, D] fp32 (16-byte vectors), split in registers
        f_mask = tok_ok[:, None] & d_ok[None, :]
        f = tl.load(Freqs + (b * s_fb + n * s_fn)[:, None] + dims[None, :], mask=f_mask, other=0.0)
        cos, sin = tl.split(tl.reshape(f, [BLOCK_T, BLOCK_D // 2, 2]))  # [T, D/2]: freqs_cis = cos + i·sin
    else:
        cos = tl.zeros([BLOCK_T, BLOCK_D // 2], dtype=tl.float32)
        sin = cos

    _norm_rope_heads(QOut + b * s_qob + n * s_qon, s_qoh, Q + b * s_qb + n * s_qn, s_qh, QW, cos, sin,
                     heads, dims, d_ok, mask, eps, inv_d, BLOCK_T, BLOCK_H, BLOCK_D, dtype, HAS_ROPE)  # fmt: skip
    _norm_rope_heads(KOut + b * s_kob + n * s_kon, s_koh, K + b * s_kb + n * s_kn, s_kh, KW, cos, sin,
                     heads, dims, d_ok, mask, eps, inv_d, BLOCK_T, BLOCK_H, BLOCK_D, dtype, HAS_ROPE)  # fmt: skip


def _freqs_ok(freqs_cis: torch.Tensor | None, B: int, N: int, D: int) -> bool:
    if freqs_cis is None:
        return True
    return (
        freqs_cis.dtype == torch.complex64
        and freqs_cis.dim() == 3
        and freqs_cis.shape[0] in (1, B)
        and tuple(freqs_cis.shape[1:]) == (N, D // 2)
        and freqs_cis.stride(-1) == 1
    )


def supports(q, k, q_weight, k_weight, freqs_cis) -> bool:
    if q.dim() != 4 or q.shape != k.shape or q.dtype != k.dtype or q.dtype not in FLOAT_DTYPES:
        return False
    B, N, H, D = q.shape
    if D % 2 or q.stride(-1) != 1 or k.stride(-1) != 1 or not supported_device(q) or k.device != q.device:
        return False
    for w in (q_weight, k_weight):
        if w.shape != (D,) or w.dtype != q.dtype or w.device != q.device:
            return False
    return _freqs_ok(freqs_cis, B, N, D) and (freqs_cis is None or freqs_cis.device == q.device)


def _launch(q, k, q_weight, k_weight, freqs_cis, eps):
    assert supports(q, k, q_weight, k_weight, freqs_cis), "qk_norm_rope: unsupported inputs reached the launcher"
    B, N, H, D = q.shape
    q_out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, N, H, D), dtype=k.dtype, device=k.device)
    if q_out.numel() == 0:
        return q_out, k_out
    check_int32_indexable(q[0, 0], "q token")
    check_int32_indexable(k[0, 0], "k token")
    if freqs_cis is not None:
        fr = torch.view_as_real(freqs_cis.expand(B, N, D // 2))  # [B, N, D/2, 2] fp32, no copy
        s_fb, s_fn = fr.stride(0), fr.stride(1)
    else:
        fr, s_fb, s_fn = q, 0, 0  # never read
    block_h, block_d = next_pow2(H), next_pow2(D)
    block_t, warps = row_block(B * N, block_h * block_d)
    with launcher_device(q):
        _qk_norm_rope_kernel[(triton.cdiv(B * N, block_t),)](
            q_out, *q_out.stride()[:3],
            k_out, *k_out.stride()[:3],
            q, *q.stride()[:3],
            k, *k.stride()[:3],
            q_weight.contiguous(), k_weight.contiguous(),
            fr, s_fb, s_fn,
            B * N, N, H, D, float(eps), fp32_reciprocal(D),
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, HAS_ROPE=freqs_cis is not None,
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return q_out, k_out


@torch.library.custom_op("zimage::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    freqs_cis: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, q_weight, k_weight, freqs_cis, eps)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, freqs_cis, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    freqs_cis: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights ``[D]``) then interleaved RoPE; q, k ``[B, N, H, D]``,
    freqs_cis complex64 ``[B, N, D/2]`` or None. Same result as ``zimage_kernels.reference.qk_norm_rope``."""
    if not supports(q, k, q_weight, k_weight, freqs_cis):
        return reference.qk_norm_rope(q, k, q_weight, k_weight, freqs_cis, eps)
    if use_custom_op():
        return _qk_norm_rope_op(q, k, q_weight, k_weight, freqs_cis, eps)
    return _launch(q, k, q_weight, k_weight, freqs_cis, eps)
