"""Our attention as an attention processor for diffusers' own ``ZImageTransformer2DModel``.

For users who keep diffusers' transformer: ``set_fast_attention(pipe.transformer)`` puts :class:`ZImageAttnProcessor`
on every attention module. It runs QK-RMSNorm + RoPE and the attention itself through our op switch (the fused Triton
kernels on CUDA, the torch reference elsewhere) with per-sample key lengths instead of a dense mask.

``freqs_cis`` is an explicit parameter of ``__call__``: diffusers' ``Attention.forward`` passes a processor only the
keyword arguments its signature names (others are dropped with a warning), so a processor without it would run
without RoPE.
"""

from __future__ import annotations

import torch

from zimage_kernels import get_ops, reference


class ZImageAttnProcessor:
    """Drop-in for diffusers' ``ZSingleStreamAttnProcessor`` (same call, same numerics up to the op backend)."""

    def __init__(self, kernel_backend: str | None = None):
        self.kernel_backend = kernel_backend
        self._mask: torch.Tensor | None = None  # the last key-padding mask seen and its key lengths: one
        self._kv_lens: torch.Tensor | None = None  # conversion per stage of a forward, not one per layer

    def _lengths(self, mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Key lengths of a [B, N] (or [B, 1, 1, N]) boolean key-padding mask whose valid keys come first."""
        if mask is None:
            return None
        if mask is self._mask:
            return self._kv_lens
        m = mask.reshape(mask.shape[0], -1).bool()
        if m.shape[1] != n:
            raise ValueError(f"attention_mask covers {m.shape[1]} keys but the sequence has {n}")
        lens = m.sum(dim=1).to(torch.int32)
        if not torch.equal(m, torch.arange(n, device=m.device)[None] < lens[:, None]):
            raise ValueError("ZImageAttnProcessor needs a key-padding mask whose valid keys come first")
        kv_lens = None if bool((lens == n).all()) else lens
        self._mask, self._kv_lens = mask, kv_lens
        return kv_lens

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("ZImageAttnProcessor is single-stream self-attention: encoder_hidden_states must be None")
        ops = get_ops(self.kernel_backend, hidden_states.device)
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, N, H, D]
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None and attn.norm_k is not None and freqs_cis is not None:
            q, k = ops.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, freqs_cis, attn.norm_q.eps)
        else:
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            if freqs_cis is not None:
                q, k = reference.rope(q, freqs_cis), reference.rope(k, freqs_cis)
        out = ops.attention(q, k, v, kv_lens=self._lengths(attention_mask, k.shape[1]))  # [B, N, H, D]
        out = attn.to_out[0](out.flatten(2).to(q.dtype))
        if len(attn.to_out) > 1:  # dropout
            out = attn.to_out[1](out)
        return out


def set_fast_attention(transformer: torch.nn.Module, kernel_backend: str | None = None) -> int:
    """Set :class:`ZImageAttnProcessor` on every attention module of a diffusers Z-Image transformer (one
    processor per module). Returns how many modules were changed."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for module in transformer.modules():
        if isinstance(module, Attention):
            module.set_processor(ZImageAttnProcessor(kernel_backend))
            n += 1
    if n == 0:
        raise ValueError(f"{type(transformer).__name__} has no diffusers Attention modules to set a processor on")
    return n


__all__ = ["ZImageAttnProcessor", "set_fast_attention"]
