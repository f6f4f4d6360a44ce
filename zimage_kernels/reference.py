"""Pure-torch reference implementation of every op that has (or will have) a Triton kernel.

This is the single source of truth for what each op computes: the model runs on it on CPU, the Triton kernels are
tested against it, and the benchmarks compare with it. Each function reproduces diffusers 0.42.1's Z-Image numerics
down to the cast points:

- RMSNorm: variance in fp32, ``x * rsqrt(var + eps)`` (promotes to fp32), cast to the *weight* dtype, then times
  the weight (``diffusers.models.normalization.RMSNorm``).
- adaLN terms (``1 + scale``, ``tanh(gate)``) and their products are computed in the activation dtype.
- RoPE: complex multiplication on interleaved pairs in fp32/complex64, cast back to the input dtype.
- Attention: ``scaled_dot_product_attention`` with a boolean key-padding mask only when the batch is ragged.

Tensor layouts follow what diffusers hands its attention backends: ``[B, N, H, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``RMSNorm(x) * weight`` with diffusers' cast points. ``weight=None`` means no affine."""
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)  # fp32 from here on (type promotion)
    if weight is None:
        return x.to(input_dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)  # cast to the weight dtype *before* the weight multiply
    return x * weight


def rms_norm_modulate(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Pre-norm with adaLN scale: ``RMSNorm(x) * (1 + scale)``.

    x: [B, N, C]; weight: [C]; scale: [B, 1, C] (raw adaLN output, ``1 +`` is added here) or None (plain RMSNorm).
    """
    y = rms_norm(x, weight, eps)
    if scale is None:
        return y
    return y * (1.0 + scale)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Post-norm gated residual: ``x + tanh(gate) * RMSNorm(y)``; ``gate=None`` means ``x + RMSNorm(y)``.

    x, y: [B, N, C]; weight: [C]; gate: [B, 1, C] raw adaLN output (tanh applied here) or None.
    """
    y = rms_norm(y, weight, eps)
    if gate is None:
        return x + y
    return x + gate.tanh() * y


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate of the feed-forward: ``silu(a) * b`` (a = w1 x, b = w3 x)."""
    return F.silu(a) * b


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Final layer: ``LayerNorm(x, no affine) * (1 + scale)``. x: [B, N, C]; scale: [B, 1, C] raw."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1.0 + scale)


def rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding, in fp32/complex64, cast back to x's dtype.

    x: [B, N, H, D]; freqs_cis: complex64 [B, N, D/2].
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, N, H, D/2] complex64
    out = torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3)  # [B, N, H, D] fp32
    return out.type_as(x)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    freqs_cis: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights [D]) followed by RoPE. q, k: [B, N, H, D]."""
    q = rms_norm(q, q_weight, eps)
    k = rms_norm(k, k_weight, eps)
    if freqs_cis is not None:
        q = rope(q, freqs_cis)
        k = rope(k, freqs_cis)
    return q, k


def key_padding_mask(kv_lens: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean [B, 1, 1, N] mask, True where key j < kv_lens[b] (what diffusers passes to SDPA)."""
    ar = torch.arange(n, device=kv_lens.device)
    return (ar[None, :] < kv_lens[:, None])[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention on ``[B, N, H, D]`` tensors; keys ``j >= kv_lens[b]`` are ignored.

    Query rows beyond ``kv_lens[b]`` are computed too (they are batch padding and the caller discards them).
    """
    mask = None if kv_lens is None else key_padding_mask(kv_lens, k.shape[1])
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=mask, scale=scale
    )  # [B, H, N, D]
    return out.permute(0, 2, 1, 3)  # [B, N, H, D]


# ---- step-cache ops: the decision metric's two L1 sums, and the residual apply of a cache hit ----


def l1_sums(a: torch.Tensor, b: torch.Tensor, a_sub: torch.Tensor | None = None) -> torch.Tensor:
    """The step caches' decision metric in one pass: ``Σ|(a − a_sub) − b|`` and ``Σ|b|``, accumulated in fp32 from
    bf16/fp16/fp32 inputs (their ratio is the relative L1 change; ``a_sub`` lets a cache measure a residual without
    materialising it). fp32 tensor ``[Σ|(a − a_sub) − b|, Σ|b|]`` over all elements (shapes must match)."""
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
    """``hidden + residual + coef·delta`` in fp32, rounded once to ``hidden.dtype`` (a new tensor): a cache hit's
    reuse of a cached residual, or its order-1 Taylor extrapolation (``delta`` the difference of the last two cached
    residuals, ``coef`` = elapsed / spacing, a host float)."""
    if hidden.shape != residual.shape or (delta is not None and delta.shape != hidden.shape):
        raise ValueError(f"apply_residual: shapes differ: {tuple(hidden.shape)} vs {tuple(residual.shape)}")
    out = hidden.float() + residual.float()
    if delta is not None and coef != 0.0:
        out = out + coef * delta.float()
    return out.to(hidden.dtype)


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention(...), lse)``: lse is the fp32 ``[B, H, N_q]`` natural log-sum-exp over the valid keys of each
    query row's scaled scores (``-inf`` for a row with no valid key); output and lse in fp32 arithmetic."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if kv_lens is not None:
        scores = scores.masked_fill(~key_padding_mask(kv_lens, k.shape[1]), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where every key is masked
    return attention(q, k, v, kv_lens=kv_lens, scale=scale), lse
